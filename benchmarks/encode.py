"""`latentpipe encode` benchmark: two ratios measured side by side in one run.

1. Job efficiency: end-to-end samples/s of the Ray job (decode tasks -> encoder actors ->
   atomic writes) against the encoders' own forward throughput on tensors already in memory,
   at the same batch size and on the same compute: the job's actor class with the same
   resources, fed pre-decoded shards from the object store (measured before and after the
   job). Goal >= 0.9: I/O and decode hide behind the encoders. Reported in steady state
   (after the actors loaded their models) and wall-clock, plus the encoder actor's busy
   fraction (a ratio that does not depend on other load on the machine).
2. Training speed-up: steps/s of a latent prior (diffusers ``UNet2DConditionModel`` with
   cross-attention, DDPM eps loss, AdamW) reading the precomputed latent shards against the
   same prior encoding the images (KL-VAE) and captions (MiniLM) at every step.

Usage: python benchmarks/encode.py [--n 512] [--size 32] [--batch-size 32] [--steps 30]
Encoders are randomly initialised (throughput does not depend on the weights); the KL-VAE and
VQGAN use the 32 px demo layout (factor 4, ~1 M parameters each), text is the bundled MiniLM.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch

from latentpipe.pipeline.encode import (
    EncodeConfig,
    EncoderWorker,
    decode_shard,
    list_inputs,
    run_encode,
)
from latentpipe.pipeline.encoder_sources import resolve_source
from latentpipe.pipeline.shard_store import OutputDir
from latentpipe.preprocessing.encoders import KLVAEEncoder, TextEncoder


def make_autoencoders(root: Path) -> tuple[Path, Path]:
    """Random KL-VAE and VQGAN in the 32 px demo layout, saved as diffusers folders."""
    from diffusers import AutoencoderKL, VQModel

    kw: dict[str, Any] = dict(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                              block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
                              norm_num_groups=16)
    torch.manual_seed(0)
    vae: Any = AutoencoderKL(**kw, scaling_factor=0.5)
    vq: Any = VQModel(**kw, num_vq_embeddings=512, vq_embed_dim=4)
    vae.save_pretrained(root / "vae")
    vq.save_pretrained(root / "vqgan")
    return root / "vae", root / "vqgan"


def make_images(root: Path, n: int, size: int, per_shard: int) -> Path:
    from latentpipe.pipeline.shard import ShardConfig, run_shard_job
    from latentpipe.preprocessing.config import from_dict

    cfg = from_dict(ShardConfig, {"source": {"spec": f"synthetic:{n}", "synthetic_size": size}, "out": str(root),
                                  "samples_per_shard": per_shard, "image": {"size": size, "format": "jpg"}})
    run_shard_job(cfg, progress=False)
    return root / "images"


def forward_throughput(cfg: EncodeConfig, device: str) -> float:
    """samples/s of the encoders alone: the job's own actor class and batch size, fed shards that
    are already decoded and in the object store (no tar reading, no decode, no writes)."""
    import ray

    inp = OutputDir(cfg.images)
    decoded = [ray.put(decode_shard(inp, i, True)) for i in sorted(list_inputs(inp)[0])]
    n = sum(len(ray.get(d)["keys"]) for d in decoded)
    sources = [resolve_source("vae", str(cfg.vae)), resolve_source("vqgan", str(cfg.vqgan)),
               resolve_source("text", "minilm")]
    opts: dict[str, Any] = {"num_cpus": cfg.actor_cpus, **({"num_gpus": 1} if device == "cuda" else {})}
    worker: Any = ray.remote(EncoderWorker).options(**opts).remote(sources, cfg, device, int(cfg.actor_cpus))
    try:
        ray.get(worker.encode_shard.remote(decoded[0]))  # warm-up (and waits for the models to load)
        t0 = time.perf_counter()
        ray.get([worker.encode_shard.remote(d) for d in decoded])
        return n / (time.perf_counter() - t0)
    finally:
        ray.kill(worker)


def train_steps_per_s(root: Path, latents: str, images: Path, vae: Path, batch: int, steps: int,
                      on_the_fly: bool) -> float:
    """steps/s of a small text-conditioned UNet (DDPM eps loss) on precomputed or on-the-fly latents."""
    from diffusers import UNet2DConditionModel

    from latentpipe.training.data import DataConfig, ShardStream

    kind: Literal["images", "latents"] = "images" if on_the_fly else "latents"
    stream = ShardStream(DataConfig(shards=str(images if on_the_fly else latents), kind=kind, batch_size=batch,
                                    num_workers=1, max_text_len=77), 0, 1)
    vae_enc = KLVAEEncoder.from_pretrained(vae, "cpu") if on_the_fly else None
    text_enc = TextEncoder(None, device="cpu") if on_the_fly else None
    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=384, attention_head_dim=8, norm_num_groups=32)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)  # linear schedule (Ho et al. 2020)
    sf = 0.5
    it = stream.batches()
    t0 = 0.0
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            t0 = time.perf_counter()
        b = next(it)
        if on_the_fly:
            assert vae_enc is not None and text_enc is not None
            moments = torch.from_numpy(vae_enc.encode(b["image"])["latent"])  # [B, 8, h, w] from [B, 3, H, W]
            t = text_enc.encode(b["caption"])
            text = torch.zeros(batch, 77, 384)
            mask = torch.zeros(batch, 77, dtype=torch.bool)
            n = min(t["text"].shape[1], 77)
            text[:, :n], mask[:, :n] = torch.from_numpy(t["text"][:, :n]), torch.from_numpy(t["text_mask"][:, :n])
        else:
            moments, text, mask = b["latent"], b["text"], b["text_mask"]
        mean, logvar = moments.chunk(2, dim=1)
        z0 = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * sf  # a fresh posterior sample
        tt = torch.randint(0, 1000, (batch,))
        eps = torch.randn_like(z0)
        a = abar[tt].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(xt, tt, encoder_hidden_states=text, encoder_attention_mask=mask).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="samples")
    ap.add_argument("--size", type=int, default=32, help="image side (px)")
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--actor-cpus", type=int, default=1, help="threads of the encoder actor and of the baseline")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-encode-"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=30)
    try:
        images = make_images(root, args.n, args.size, args.per_shard)
        vae, vq = make_autoencoders(root)
        cfg = EncodeConfig(images=str(images), out=str(root), vae=str(vae), vqgan=str(vq), text_encoder="minilm",
                           batch_size=args.batch_size, num_actors=1, actor_cpus=float(args.actor_cpus),
                           overwrite=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # the baseline is measured before and after the job (the mean is used): drift on a shared machine
        fwd_runs = [forward_throughput(cfg, device)]
        job = run_encode(cfg, show_progress=False)
        fwd_runs.append(forward_throughput(cfg, device))
    finally:
        ray.shutdown()
    fwd = sum(fwd_runs) / len(fwd_runs)
    steady = job["written_now"] / job["encode_seconds"]
    out = OutputDir(job["out_dir"])
    busy = sum(st.extra["seconds"]["encode"] for st in (out.read_stats(i) for i in out.complete_shards()) if st)
    wall = job["written_now"] / job["seconds"]
    torch.set_num_threads(args.actor_cpus)
    pre = train_steps_per_s(root, job["out_dir"], images, vae, args.batch_size, args.steps, on_the_fly=False)
    fly = train_steps_per_s(root, job["out_dir"], images, vae, args.batch_size, args.steps, on_the_fly=True)
    bps = job["totals"]["bytes_per_sample"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}; {args.n} samples of {args.size} px, "
          f"batch {args.batch_size}, 1 encoder actor x {args.actor_cpus} thread(s)")
    print("\n| measure | value |\n|---|---|")
    print(f"| encoders' forward on in-memory tensors (VAE + VQGAN + MiniLM), before / after the job | "
          f"{fwd_runs[0]:,.1f} / {fwd_runs[1]:,.1f} samples/s |")
    print(f"| job end-to-end, steady state (models loaded) | {steady:,.1f} samples/s |")
    print(f"| **ratio (1): job / forward** | **{steady / fwd:.2f}** |")
    print(f"| encoder actor busy (sum of its encode time / job steady-state wall) | {busy / job['encode_seconds']:.2f} |")
    print(f"| job wall-clock incl. Ray start + model loading | {wall:,.1f} samples/s ({wall / fwd:.2f} of forward) |")
    print(f"| prior training, precomputed latent shards | {pre:,.2f} steps/s |")
    print(f"| prior training, encoding images + captions on the fly | {fly:,.2f} steps/s |")
    print(f"| **ratio (2): speed-up of precomputed latents** | **{pre / fly:.2f}x** |")
    print("| bytes/sample: " + ", ".join(f"{k} {v:,.0f}" for k, v in bps.items()) + " | |")


if __name__ == "__main__":
    main()
