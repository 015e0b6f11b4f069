"""AR prior throughput at a preset size: training image tokens/s, and sampling image tokens/s with
and without the KV cache (CFG on, so each sampling step runs 2B rows), side by side in one run.

Inputs are random code ids and text embeddings of the preset's shapes (throughput does not depend
on the values). Usage: python benchmarks/ar.py [--preset demo] [--batch 32] [--sample-batch 16]
[--steps 10] [--repeats 3] [--device cpu|cuda] [--threads N]. Each figure is the best of
``--repeats`` timed windows (a shared machine only ever slows a window down).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from latentpipe.training.ar_sampling import ARSampleConfig, sample_tokens
from latentpipe.training.models.ar import PRESETS, ARConfig, build_ar
from latentpipe.training.objectives.autoregressive import AutoregressiveObjective


def batch(cfg: ARConfig, b: int, device: torch.device, g: torch.Generator) -> dict[str, torch.Tensor]:
    lens = torch.randint(4, cfg.text_len + 1, (b,), generator=g)
    mask = torch.arange(cfg.text_len)[None, :] < lens[:, None]  # [B, L]
    text = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g) * mask[..., None]
    tokens = torch.randint(0, cfg.codebook_size, (b, cfg.num_image_tokens), generator=g)
    return {k: v.to(device) for k, v in {"tokens": tokens, "text": text, "text_mask": mask}.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(cfg: ARConfig, b: int, steps: int, device: torch.device, windows: int) -> float:
    """Image tokens per second of AdamW training steps (forward + backward + update); best window."""
    model = build_ar(cfg).to(device).train()
    obj = AutoregressiveObjective(cfg.codebook_size, cond_drop=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = [batch(cfg, b, device, g) for _ in range(4)]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int) -> None:
        with amp:
            loss, _ = obj.loss(model, data[i % len(data)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):  # warm-up
        step(i)
    best = 0.0
    for _ in range(windows):
        sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        sync(device)
        best = max(best, steps * b * cfg.num_image_tokens / (time.perf_counter() - t0))
    return best


def sample_rates(cfg: ARConfig, b: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Image tokens per second of guided sampling (2B rows per step) of whole grids, with and without
    the KV cache, timed alternately (best of ``repeats`` each, so both see the same machine load)."""
    model = build_ar(cfg).to(device).eval()
    text = batch(cfg, b, device, torch.Generator().manual_seed(1))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    best = {True: 0.0, False: 0.0}
    with amp:
        for r in range(repeats + 1):
            for use_cache in (True, False):
                sc = ARSampleConfig(guidance=3.0, top_p=0.95, use_cache=use_cache)
                gen = torch.Generator(device=device).manual_seed(r)
                sync(device)
                t0 = time.perf_counter()
                sample_tokens(model, text["text"], text["text_mask"], sc, gen)
                sync(device)
                if r:  # the first round is a warm-up
                    best[use_cache] = max(best[use_cache], b * cfg.num_image_tokens / (time.perf_counter() - t0))
    return best[True], best[False]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=32, help="training batch size")
    ap.add_argument("--sample-batch", type=int, default=16, help="captions sampled at once")
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed window")
    ap.add_argument("--repeats", type=int, default=3, help="timed windows / sampling runs per mode (best kept)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = PRESETS[args.preset]()
    torch.manual_seed(0)
    n_params = sum(p.numel() for p in build_ar(cfg).parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {where}; {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
          f"preset {args.preset}: {cfg.arch}, {n_params / 1e6:.1f}M params, grid {cfg.grid[0]}x{cfg.grid[1]}, "
          f"{cfg.codebook_size} codes, text prefix {cfg.text_len}"
          + (", bf16 autocast" if device.type == "cuda" else ", fp32"))
    train = train_rate(cfg, args.batch, args.steps, device, args.repeats)
    cached, recompute = sample_rates(cfg, args.sample_batch, device, args.repeats)
    print("| measure | image tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| training (batch {args.batch}, AdamW step) | {train:,.0f} | |")
    print(f"| sampling, KV cache (batch {args.sample_batch}, CFG: {2 * args.sample_batch} rows) | {cached:,.0f} "
          f"| {cached / recompute:.2f}x |")
    print(f"| sampling, no cache (recompute the prefix each step) | {recompute:,.0f} | 1.00x |")


if __name__ == "__main__":
    main()
