"""GPU paths and throughput on one CUDA device, in one short run (a lent GPU is held for minutes).

What it checks and measures, each section on its own (a failing section is recorded and the
next one runs):

- ``env``: torch / CUDA / NCCL / DeepSpeed versions and the device.
- ``train``: the real trainer (``latentpipe.training.engine.Trainer``: DeepSpeed ZeRO-2 on the NCCL
  backend, EMA on, data from latent shards through the WebDataset loader, tracking off) for the
  three 256 px priors (configs/prior_{ddpm,flow,ar}_256.yaml) in bf16 and in fp32, side by side:
  samples/s from the median step time after warm-up, peak GPU memory, finite losses.
- ``encode``: the 256 px KL-VAE and VQGAN encoders (preprocessing/encoders.py, fp32, randomly
  initialised: no weights can be fetched there) - images/s, and whether the latents / token ids
  of the same images are identical at batch sizes 1, 8 and 32 (the encode contract).
- ``sample``: DDIM-50 (DDPM prior, SD-sized UNet) and Euler-50 (flow prior, DiT-XL/2) with CFG,
  latents/s; AR token sampling with and without the KV cache on a 16x16 grid (tokens/s, and the
  two must give identical tokens for one seed).

``--smoke`` runs every section with the demo configs and a few steps on CPU (to check this
script before spending GPU time on it).

Usage: python benchmarks/gpu.py --out DIR [--smoke]   (writes DIR/gpu.jsonl and prints a summary)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latentpipe.preprocessing.config import load_config  # noqa: E402
from latentpipe.training.config import TrainConfig  # noqa: E402

SMOKE = False
OUT: Path = Path(".")
ONLY: list[str] = []  # --priors: substrings of the prior labels to run (empty: all)
PRECISIONS = ["bf16", "fp32"]
SAMPLERS = ["ddim", "euler", "ar"]


def wanted(label: str) -> bool:
    return not ONLY or any(o in label for o in ONLY)


def record(section: str, **fields: Any) -> None:
    row = {"section": section, **fields}
    with open(OUT / "gpu.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def guarded(section: str, fn: Callable[[], None]) -> None:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # recorded, and the next section runs
        traceback.print_exc()
        record(section, error=f"{type(e).__name__}: {e}"[:500])
    print(f"[{section}] {time.perf_counter() - t0:.1f}s", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def env() -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    cuda = torch.cuda.is_available()
    record("env", torch=torch.__version__, cuda=torch.version.cuda, deepspeed=deepspeed.__version__,
           accelerator=get_accelerator().device_name(),
           device=torch.cuda.get_device_name() if cuda else "cpu",
           capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
           memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
           nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
           bf16=cuda and torch.cuda.is_bf16_supported())


# ----------------------------------------------------------------------------- train

PRIORS: list[tuple[str, str, int, list[str]]] = [  # label, config, latent grid (h = w), overrides
    ("ddpm / unet_sd", "prior_ddpm_256.yaml", 32, []),
    ("flow / dit_xl2", "prior_flow_256.yaml", 32, []),
    ("ar / llama 24x1024, 32x32 tokens", "prior_ar_256.yaml", 32, []),
]
SMOKE_PRIORS: list[tuple[str, str, int, list[str]]] = [
    ("ddpm / unet_demo", "prior_ddpm_demo.yaml", 8, []),
    ("flow / dit_demo", "prior_flow_demo.yaml", 8, ["model.backbone=dit_demo"]),
    ("ar / demo", "prior_ar_demo.yaml", 8, []),
]


def train() -> None:
    import torch.distributed as dist

    from latentpipe.training.engine import Trainer
    from tests.shards import make_latent_shards

    steps, warmup = (3, 1) if SMOKE else (12, 4)
    with tempfile.TemporaryDirectory() as tmp:
        shard_sets: dict[tuple[int, int, int], Path] = {}
        for label, config, grid, extra in (SMOKE_PRIORS if SMOKE else PRIORS):
            if not wanted(label):
                continue
            base = load_config(TrainConfig, ROOT / "configs" / config)
            batch = 4 if SMOKE else base.data.batch_size
            text_dim, max_len = 384, base.data.max_text_len
            key = (grid, text_dim, max_len)
            if key not in shard_sets:
                codebook = 16384 if not SMOKE else 512
                shard_sets[key] = make_latent_shards(Path(tmp) / f"lat{grid}", n=2, per_shard=2 * batch, C=4,
                                                     h=grid, w=grid, text_dim=text_dim, max_len=max_len,
                                                     codebook=codebook)
            for precision in PRECISIONS:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                cfg = load_config(TrainConfig, ROOT / "configs" / config, [
                    f"data.shards={shard_sets[key]}", f"data.batch_size={batch}", "data.num_workers=2",
                    f"steps={warmup + steps}", "eval_every=0", "sample_every=0", "log_every=1",
                    "checkpoint.every_steps=0", "checkpoint.export=false", "optim.warmup_steps=0",
                    "tracking.enabled=false", "ema.start_step=0", f"deepspeed.precision={precision}",
                    f"workdir={tmp}/run-{config}-{precision}", *extra])
                t0 = time.perf_counter()
                result = Trainer(cfg).run()
                wall = time.perf_counter() - t0
                shutil.rmtree(cfg.workdir)  # its final checkpoint: GBs for the 256 px models
                timed = result.step_times[warmup:]
                step_s = statistics.median(timed)
                record("train", prior=label, precision=precision, batch=batch, steps=len(timed),
                       samples_per_s=round(batch / step_s, 2), step_ms=round(step_s * 1e3, 1),
                       data_wait_ms=round(statistics.median(result.data_waits[warmup:]) * 1e3, 2),
                       peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)
                       if torch.cuda.is_available() else None,
                       losses_finite=all(map(lambda v: v == v and abs(v) != float("inf"), result.losses)),
                       first_loss=round(result.losses[0], 4), last_loss=round(result.losses[-1], 4),
                       backend=dist.get_backend(), run_s=round(wall, 1))
                torch.cuda.empty_cache()  # a no-op without CUDA


# ----------------------------------------------------------------------------- encode


def encode() -> None:
    import numpy as np

    from latentpipe.preprocessing.encoders import KLVAEEncoder, VQGANEncoder
    from latentpipe.training.models.autoencoders import AutoencoderArchConfig, build_autoencoder

    size, n = (32, 8) if SMOKE else (256, 32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for kind, preset, cls, key in (("kl", "kl_demo" if SMOKE else "kl_f8_256", KLVAEEncoder, "latent"),
                                   ("vq", "vq_demo" if SMOKE else "vq_f8_256", VQGANEncoder, "tokens")):
        torch.manual_seed(0)
        enc = cls(build_autoencoder(AutoencoderArchConfig(preset=preset), kind), {}, device=device)  # type: ignore[arg-type]
        whole = enc.encode(images)[key]
        diffs = {}
        for bs in (1, 8):
            parts = np.concatenate([enc.encode(images[i:i + bs])[key] for i in range(0, n, bs)])
            diffs[bs] = (float(np.abs(parts.astype(np.float64) - whole.astype(np.float64)).max()) if key == "latent"
                         else float((parts != whole).mean()))  # ids: the fraction that differ
        sync()
        reps = 2 if SMOKE else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            enc.encode(images)
        sync()
        rate = reps * n / (time.perf_counter() - t0)
        record("encode", encoder=preset, batch=n, image_px=size, images_per_s=round(rate, 1),
               **{("max_abs_diff_vs_batch" if key == "latent" else "fraction_of_ids_differing_vs_batch"):
                  {str(k): v for k, v in diffs.items()}}, identical=all(v == 0 for v in diffs.values()))


# ----------------------------------------------------------------------------- sample


def _timed_generate(fam: Any, model: torch.nn.Module, cond: Any, gen: torch.Generator, steps: int,
                    dtype: torch.dtype | None) -> float:
    device = next(model.parameters()).device
    sync()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        fam.generate(model, cond, gen, steps=steps)
    sync()
    return time.perf_counter() - t0


def _plain_step(fam: Any, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                batch: dict[str, Any], i: int) -> None:
    device = batch["latent"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss, _ = fam.loss("model", modules, batch, i)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sample() -> None:
    from latentpipe.training.families import family_from_config
    from latentpipe.training.guidance import TextCond

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = 2 if SMOKE else 16
    for label, config, steps in (("ddpm / unet_sd, DDIM", "prior_ddpm_256.yaml", 50),
                                 ("flow / dit_xl2, Euler", "prior_flow_256.yaml", 50)):
        if label.split(", ")[1].lower() not in SAMPLERS:
            continue
        if SMOKE:
            config, steps = config.replace("256", "demo"), 4
        cfg = load_config(TrainConfig, ROOT / "configs" / config)
        fam = family_from_config(cfg.model)
        model = fam.build()["model"].to(device).eval()
        gen = torch.Generator(device).manual_seed(0)
        text = torch.randn(b, cfg.data.max_text_len, 384, device=device)
        for precision, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
            dt = min(_timed_generate(fam, model, TextCond.of(text), gen, steps, dtype) for _ in range(2))  # 1st: warm-up
            record("sample", prior=label, steps=steps, batch=b, precision=precision, cfg=True,
                   latents_per_s=round(b / dt, 2), s_per_batch=round(dt, 2))
        del model
        torch.cuda.empty_cache()  # a no-op without CUDA

    from latentpipe.training.ar_sampling import ARSampleConfig, sample_tokens

    if "ar" not in SAMPLERS:
        return
    grid = 4 if SMOKE else 16
    cfg = load_config(TrainConfig, ROOT / "configs" / ("prior_ar_demo.yaml" if SMOKE else "prior_ar_256.yaml"),
                      [f"model.net.grid=[{grid},{grid}]"])
    fam = family_from_config(cfg.model)
    net = fam.build()["model"].to(device).eval()
    text = torch.randn(b, fam.cfg.net.text_len, 384, device=device)  # type: ignore[attr-defined]
    out = {}
    # fp32 for the cache / no-cache identity (the contract), then the bf16 speed with the cache
    for use_cache, dtype in ((True, None), (False, None), (True, torch.bfloat16)):
        sc = ARSampleConfig(temperature=1.0, top_k=100, guidance=3.0, use_cache=use_cache)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            tokens = sample_tokens(net, text, None, sc, torch.Generator(device).manual_seed(0))  # type: ignore[arg-type]
        sync()
        dt = time.perf_counter() - t0
        if dtype is None:
            out[use_cache] = tokens
        record("sample", prior=f"ar / {grid}x{grid} tokens, CFG 3", precision="bf16 autocast" if dtype else "fp32",
               kv_cache=use_cache, batch=b, tokens_per_s=round(b * grid * grid / dt, 1), s_per_batch=round(dt, 2))
    record("sample", prior="ar, fp32", cache_and_no_cache_identical=bool(torch.equal(out[True], out[False])),
           agreement=float((out[True] == out[False]).float().mean()))


# ----------------------------------------------------------------------------- plain


def plain() -> None:
    """The model alone (loss + backward + torch AdamW under bf16 autocast, no DeepSpeed, no loader),
    and the CUDA kernel time of one such step (torch.profiler): what the trainer's step costs on top."""
    from torch.profiler import ProfilerActivity, profile

    from latentpipe.training.families import family_from_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = 4 if SMOKE else 32
    for label, config, backbone in (("ddpm / unet_sd", "prior_ddpm_256.yaml", None),
                                    ("flow / dit_xl2", "prior_flow_256.yaml", None)):
        if not wanted(label):
            continue
        if SMOKE:
            config, backbone = config.replace("256", "demo"), "dit_demo" if "flow" in config else None
        cfg = load_config(TrainConfig, ROOT / "configs" / config, [f"model.backbone={backbone}"] if backbone else [])
        fam = family_from_config(cfg.model)
        modules = {k: m.to(device) for k, m in fam.build().items()}
        opt = torch.optim.AdamW(modules["model"].parameters(), lr=1e-4, foreach=True)
        side = cfg.model["latent_size"]  # type: ignore[index]
        mask = torch.ones(b, cfg.data.max_text_len, dtype=torch.bool, device=device)
        batch = {"latent": torch.randn(b, 8, side, side, device=device),
                 "text": torch.randn(b, cfg.data.max_text_len, 384, device=device), "text_mask": mask,
                 "caption": [""] * b, "__key__": [""] * b}

        times = []
        for i in range(12):
            sync()
            t0 = time.perf_counter()
            _plain_step(fam, modules, opt, batch, i)
            sync()
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times[4:])
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            _plain_step(fam, modules, opt, batch, 99)
            sync()
        events = prof.key_averages()
        kernel_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else None
        top = sorted(events, key=lambda e: e.self_device_time_total if device.type == "cuda"
                     else e.self_cpu_time_total, reverse=True)[:8]
        record("plain", prior=label, precision="bf16 autocast", batch=b, samples_per_s=round(b / step_s, 2),
               step_ms=round(step_s * 1e3, 1), cuda_kernel_ms=None if kernel_us is None else round(kernel_us / 1e3, 1),
               params_m=round(sum(p.numel() for p in modules["model"].parameters()) / 1e6, 1),
               top_ops=[(e.key[:60], round((e.self_device_time_total if device.type == "cuda"
                                           else e.self_cpu_time_total) / 1e3, 2)) for e in top])
        del modules, opt
        torch.cuda.empty_cache()  # a no-op without CUDA


def main() -> None:
    global SMOKE, OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="demo configs, a few steps (checks the script on CPU)")
    ap.add_argument("--sections", default="env,train,encode,sample,plain")
    ap.add_argument("--samplers", default="ddim,euler,ar", help="sample: which of ddim, euler, ar")
    ap.add_argument("--precisions", default="bf16,fp32", help="trainer precisions (train)")
    ap.add_argument("--priors", default="", help="comma-separated substrings of prior labels (train, plain)")
    args = ap.parse_args()
    SMOKE, OUT = args.smoke, args.out
    ONLY[:] = [p for p in args.priors.split(",") if p]
    PRECISIONS[:] = args.precisions.split(",")
    SAMPLERS[:] = args.samplers.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sections = {"env": env, "train": train, "encode": encode, "sample": sample, "plain": plain}
    for name in args.sections.split(","):
        guarded(name, sections[name])


if __name__ == "__main__":
    main()
