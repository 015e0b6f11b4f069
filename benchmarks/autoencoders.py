"""Stage-1 autoencoder benchmark: PSNR of the KL-VAE and the VQGAN on held-out 32 px synthetic scenes.

Trains both demo presets (``configs/ae_kl_demo.yaml``, ``configs/ae_vq_demo.yaml``: same model,
loss and optimiser settings) with the families' own ``loss()`` in a plain single-process loop
(AdamW, linear warmup + cosine decay, global-norm clipping at 1.0: what the trainer's DeepSpeed
engines do, without the process group), on a fresh stream of scenes (``make_scene(seed=0, i)``),
then scores reconstructions of held-out scenes (``make_scene(seed=1, i)``): mean per-image PSNR,
codebook usage (fraction of the codes used over all held-out tokens) and perplexity. Writes a
reconstruction grid (rows: input, KL-VAE, VQGAN) and prints a markdown table with the budget.

    python benchmarks/autoencoders.py                      # defaults: the recorded run
    python benchmarks/autoencoders.py --kl-steps 200 --vq-steps 200 --held-out 64   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from latentpipe.preprocessing.config import load_config
from latentpipe.preprocessing.pixels import grid, to_unit_tensor
from latentpipe.preprocessing.synthetic import make_scene
from latentpipe.training.families import family_from_config
from latentpipe.training.families.base import Family
from latentpipe.training.models.autoencoders import compute_scaling_factor, reconstruct, vq_encode_tokens
from latentpipe.training.objectives.autoencoder import code_histogram, codebook_stats, psnr

ROOT = Path(__file__).resolve().parents[1]


def scenes(seed: int, start: int, n: int, size: int = 32) -> torch.Tensor:
    """Scenes ``start .. start+n-1`` of ``seed`` as [n,3,size,size] in [-1,1]."""
    return to_unit_tensor([make_scene(seed, start + i, size).image for i in range(n)])  # [n,3,H,W]


def lr_at(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``lr * min_ratio`` (DeepSpeed WarmupCosineLR's shape)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(config: Path, steps: int, batch: int, seed: int, log_every: int) -> tuple[Family, dict[str, Any], float]:
    """Train the family of ``config`` for ``steps``; returns (family, modules, wall seconds)."""
    from latentpipe.training.config import TrainConfig

    cfg = load_config(TrainConfig, config)
    fam = family_from_config(cfg.model)
    torch.manual_seed(seed)
    mods = fam.build()
    opt_cfg = cfg.optim
    opts = {part: torch.optim.AdamW(m.parameters(), lr=opt_cfg.part_lr.get(part, opt_cfg.lr),
                                    betas=opt_cfg.betas, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
            for part, m in mods.items()}
    t0 = time.perf_counter()
    for step in range(steps):
        data = {"image": scenes(seed, step * batch, batch)}
        for part in fam.parts(step):
            for group in opts[part].param_groups:
                group["lr"] = lr_at(step, steps, opt_cfg.part_lr.get(part, opt_cfg.lr), opt_cfg.warmup_steps,
                                    opt_cfg.min_lr_ratio)
            loss, logs = fam.loss(part, mods, data, step)
            opts[part].zero_grad(set_to_none=True)
            loss.backward()
            if opt_cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(mods[part].parameters(), opt_cfg.grad_clip)
            opts[part].step()
            if log_every and (step % log_every == 0 or step == steps - 1):
                shown = {k: round(v, 4) for k, v in logs.items()}
                print(f"  [{fam.name} {step:5d} {time.perf_counter() - t0:6.0f}s] {part}: {shown}", flush=True)
    return fam, mods, time.perf_counter() - t0


@torch.no_grad()
def score(fam: Family, model: torch.nn.Module, held: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR (and codebook stats for VQ) of ``model`` on ``held`` [N,3,H,W]; returns (metrics, reconstructions)."""
    model.eval()
    recs = torch.cat([reconstruct(model, held[i:i + 64]) for i in range(0, len(held), 64)])
    out = {"psnr_db": float(psnr(held, recs).mean()), "rec_l1": float((held - recs).abs().mean())}
    if fam.name == "vqgan":
        tokens = torch.cat([vq_encode_tokens(model, held[i:i + 64]) for i in range(0, len(held), 64)])
        k = int(model.quantize.n_e)
        usage, perplexity = codebook_stats(code_histogram(tokens, k))
        out.update(codebook_usage=usage, codes_used=usage * k, num_codes=k, perplexity=perplexity)
    out["scaling_factor"] = compute_scaling_factor(model, [held[i:i + 64] for i in range(0, len(held), 64)], 512)
    return out, recs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kl-config", type=Path, default=ROOT / "configs/ae_kl_demo.yaml")
    p.add_argument("--vq-config", type=Path, default=ROOT / "configs/ae_vq_demo.yaml")
    p.add_argument("--kl-steps", type=int, default=None, help="default: the config's steps")
    p.add_argument("--vq-steps", type=int, default=None, help="default: the config's steps")
    p.add_argument("--batch", type=int, default=None, help="default: the config's data.batch_size")
    p.add_argument("--held-out", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--grid", type=Path, default=ROOT / "benchmarks/autoencoders_recon.png")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from latentpipe.training.config import TrainConfig

    held = scenes(1, 0, args.held_out)
    results: dict[str, dict[str, Any]] = {}
    recs: dict[str, torch.Tensor] = {}
    load0 = os.getloadavg()[0]
    for name, config, steps in (("kl_vae", args.kl_config, args.kl_steps), ("vqgan", args.vq_config, args.vq_steps)):
        cfg = load_config(TrainConfig, config)
        steps = cfg.steps if steps is None else steps
        batch = cfg.data.batch_size if args.batch is None else args.batch
        print(f"{name}: {config.name}, {steps} steps of batch {batch}", flush=True)
        fam, mods, wall = train(config, steps, batch, args.seed, args.log_every)
        metrics, recs[name] = score(fam, mods["model"], held)
        params = sum(p.numel() for p in mods["model"].parameters())
        results[name] = {**metrics, "steps": steps, "batch": batch, "wall_min": wall / 60, "params": params,
                         "config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config)}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    load1 = os.getloadavg()[0]
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    grid([held, recs["kl_vae"], recs["vqgan"]], 12, 2).save(args.grid, optimize=True)
    kl, vq = results["kl_vae"], results["vqgan"]
    print("\n| model | params | steps x batch | wall (min) | held-out PSNR (dB) | codes used | perplexity | goal |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| KL-VAE (kl_demo, f4, 8x8x4) | {kl['params'] / 1e6:.2f} M | {kl['steps']} x {kl['batch']} | "
          f"{kl['wall_min']:.1f} | {kl['psnr_db']:.2f} | - | - | >= 28 dB: {'met' if kl['psnr_db'] >= 28 else 'NOT met'} |")
    ok = vq["psnr_db"] >= 24 and vq["codebook_usage"] >= 0.8
    print(f"| VQGAN (vq_demo, f4, 8x8 of {vq['num_codes']}) | {vq['params'] / 1e6:.2f} M | {vq['steps']} x "
          f"{vq['batch']} | {vq['wall_min']:.1f} | {vq['psnr_db']:.2f} | {vq['codes_used']:.0f} "
          f"({100 * vq['codebook_usage']:.0f}%) | {vq['perplexity']:.0f} | >= 24 dB, >= 80% codes: "
          f"{'met' if ok else 'NOT met'} |")
    print(f"\nheld-out: {args.held_out} scenes (seed 1); training stream: seed 0; {args.threads} torch threads; "
          f"1-min load average {load0:.1f} at start, {load1:.1f} at end (2 shared cores); grid: {args.grid.name}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "load": [load0, load1]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
