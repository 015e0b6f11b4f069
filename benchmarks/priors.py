"""Training throughput of the latent priors (ddpm, flow) at the demo size, side by side in one run.

For each prior (the demo configs: 4x8x8 latents, 32 x 384-d text tokens, batch 32, fp32):

- ``plain``: the family's loss + backward + torch AdamW step on in-memory tensors (compute only);
- ``trainer``: the real trainer (DeepSpeed ZeRO-2, one local rank, EMA on, data from latent shards
  written by ``tests/shards.py`` and loaded in-process; MLflow tracking, eval and grids off),
  timed as the difference between a run of ``warmup`` steps and one of ``warmup + steps`` (after a
  1-step run that pays one-time costs).

Each is reported per wall-clock second and per CPU-second of this process (the second is the
stable figure on a shared machine: it does not change with other processes' load).

Usage: python benchmarks/priors.py [--steps 40] [--warmup 3] [--batch 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from latentpipe.preprocessing.config import load_config
from latentpipe.training.config import TrainConfig
from latentpipe.training.families import family_from_config

ROOT = Path(__file__).resolve().parents[1]
PRIORS = [  # (label, config, backbone)
    ("ddpm / unet_demo", ROOT / "configs/prior_ddpm_demo.yaml", "unet_demo"),
    ("flow / dit_demo", ROOT / "configs/prior_flow_demo.yaml", "dit_demo"),
    ("flow / unet_demo", ROOT / "configs/prior_flow_demo.yaml", "unet_demo"),
]



def random_batch(b: int, text_len: int = 32, text_dim: int = 384) -> dict[str, Any]:
    mask = torch.arange(text_len)[None, :] < torch.randint(4, text_len + 1, (b, 1))
    return {"latent": torch.randn(b, 8, 8, 8), "text": torch.randn(b, text_len, text_dim) * mask[..., None],
            "text_mask": mask, "caption": [""] * b, "__key__": [""] * b}


class Clock:
    """Wall and process-CPU seconds since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def plain_rate(model_cfg: dict[str, Any], batch_size: int, steps: int, warmup: int
               ) -> tuple[tuple[float, float], int]:
    """(samples per wall-s, per CPU-s) of loss + backward + AdamW on in-memory batches; parameters."""
    torch.manual_seed(0)
    fam = family_from_config(model_cfg)
    modules = fam.build()
    opt = torch.optim.AdamW(modules["model"].parameters(), lr=1e-4)
    batch = random_batch(batch_size)
    clock = Clock()
    for i in range(warmup + steps):
        if i == warmup:
            clock = Clock()
        loss, _ = fam.loss("model", modules, batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    wall, cpu = clock.since()
    params = sum(p.numel() for p in modules["model"].parameters())
    return (steps * batch_size / wall, steps * batch_size / cpu), params


def trainer_run(config: Path, backbone: str, shards: Path, work: Path, batch_size: int, steps: int
                ) -> tuple[float, float]:
    """Wall and CPU seconds of a whole ``steps``-step local trainer run (build included)."""
    from latentpipe.training.engine import Trainer

    cfg = load_config(TrainConfig, config, [
        f"model.backbone={backbone}", f"data.shards={shards}", f"data.batch_size={batch_size}",
        "data.num_workers=0", f"steps={steps}", "eval_every=0", "sample_every=0", "log_every=1",
        "checkpoint.every_steps=0", "checkpoint.export=false", "optim.warmup_steps=0",
        f"workdir={work}", "tracking.enabled=false", "ema.start_step=0",
    ])
    clock = Clock()
    Trainer(cfg).run()
    return clock.since()


def trainer_rate(config: Path, backbone: str, shards: Path, work: Path, batch_size: int, steps: int,
                 warmup: int) -> tuple[float, float]:
    """(samples per wall-s, per CPU-s) of trainer steps: run(warmup + steps) - run(warmup)."""
    trainer_run(config, backbone, shards, work / "first", batch_size, 1)  # one-time costs (op builds, caches)
    w0, c0 = trainer_run(config, backbone, shards, work / "short", batch_size, warmup)
    w1, c1 = trainer_run(config, backbone, shards, work / "long", batch_size, warmup + steps)
    return steps * batch_size / (w1 - w0), steps * batch_size / (c1 - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available() and os.environ["DS_ACCELERATOR"] != "cpu"
    device = "CUDA " + torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    print(f"machine: {device}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}; batch {args.batch}, 4x8x8 latents, 32 x 384 text tokens, "
          f"fp32; {args.steps} timed steps after {args.warmup} warm-up steps")
    sys.path.insert(0, str(ROOT))  # the shard fixture writer lives in tests/
    from tests.shards import make_latent_shards

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_latent_shards(Path(tmp), n=2, per_shard=4 * args.batch, C=4, h=8, w=8, text_dim=384,
                                    max_len=32, with_tokens=False)
        for i, (label, config, backbone) in enumerate(PRIORS):
            model_cfg = dict(load_config(TrainConfig, config).model, backbone=backbone)
            plain, params = plain_rate(model_cfg, args.batch, args.steps, args.warmup)
            engine = trainer_rate(config, backbone, shards, Path(tmp) / f"run{i}", args.batch, args.steps,
                                  args.warmup)
            rows.append((label, params, plain, engine))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("| prior / backbone | parameters | plain: samples/CPU-s | trainer: samples/CPU-s | trainer / plain "
          "| plain: samples/s (wall) | trainer: samples/s (wall) |")
    print("|---|---|---|---|---|---|---|")
    for label, params, plain, engine in rows:
        print(f"| {label} | {params / 1e6:.2f}M | {plain[1]:,.0f} | {engine[1]:,.0f} | {engine[1] / plain[1]:.2f} "
              f"| {plain[0]:,.0f} | {engine[0]:,.0f} |")


if __name__ == "__main__":
    main()
