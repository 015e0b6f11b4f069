"""The trainer against the bare model loop, side by side, with a per-phase host breakdown.

    python benchmarks/profile_trainer.py --out DIR [--hidden 1344 --depth 12] [--steps 30] [--rounds 2]
        [--precision fp32] [--stage 2] [--config configs/prior_ddpm_256.yaml --batch 32]   (GPU: see RESULTS.md)

Each run is a fresh subprocess (``--worker trainer|bare``), alternating bare, trainer, bare,
trainer ... so both see the same machine load. The trainer is ``latentpipe.training.engine.Trainer`` (real
image or latent shards, the WebDataset loader, DeepSpeed, EMA on, tracking and checkpoints
off); the bare loop is the same recipe by hand: the family's loss, ``backward``, torch's
multi-tensor clip, fused AdamW and (when the config's EMA is on) a multi-tensor lerp of an fp32
EMA, on one in-memory batch from the same shards (bf16: a bf16 module with fp32 master weights,
as DeepSpeed). Every step appends a JSONL row to DIR/steps.jsonl (so a timeout keeps what was
measured): wall time per step and host seconds per phase (data,
loss, backward, overflow check, norm, optimizer, EMA, syncs: the trainer's methods timed by
wrappers installed here), and for a few steps the ``torch.profiler`` busy time (CPU: self time
of the ops; CUDA: kernel time). The summary (DIR/summary.json, printed) is samples/s of each
side from the median step after warm-up, per round, and their ratio trainer / bare, in wall time
and in process CPU time (one thread per side by default: on a shared, loaded CPU the CPU-time
ratio is the stable one; the trainer's data loader runs in-process with ``--workers 0``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES: dict[str, float] = defaultdict(float)  # host seconds per phase in the current step
PROFILE_STEPS = (6, 7, 8)  # steps run under torch.profiler (after warm-up; excluded from the timing)


def timed(obj: Any, name: str, phase: str) -> None:
    """Replace ``obj.name`` with a wrapper adding its host seconds to PHASES[phase]."""
    fn = getattr(obj, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            PHASES[phase] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


class Recorder:
    """Writes one JSONL row per step; runs a few steps under torch.profiler."""

    def __init__(self, out: Path, side: str, round_: int, samples: int, sync: Callable[[], None]) -> None:
        self.out, self.side, self.round, self.samples, self.sync = out, side, round_, samples, sync
        self.step, self.t, self.cpu = 0, time.perf_counter(), time.process_time()
        self.prof: Any = None

    def boundary(self) -> None:
        """Call between steps (before the next step's data)."""
        import torch

        self.sync()
        now, cpu = time.perf_counter(), time.process_time()
        if self.step > 0:
            row: dict[str, Any] = {"side": self.side, "round": self.round, "step": self.step - 1,
                                   "step_s": now - self.t, "cpu_s": cpu - self.cpu, "samples": self.samples,
                                   "phases": {k: round(v, 6) for k, v in PHASES.items()}}
            if self.prof is not None:
                self.prof.stop()
                ev = self.prof.key_averages()
                dev = sum(e.self_device_time_total for e in ev) / 1e6
                row["busy_s"] = dev if dev > 0 else sum(e.self_cpu_time_total for e in ev) / 1e6
                row["profiled"] = True
                self.prof = None
            with open(self.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        PHASES.clear()
        if self.step in PROFILE_STEPS:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.start()
        self.step += 1
        self.t, self.cpu = time.perf_counter(), time.process_time()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _train_cfg(args: argparse.Namespace, shards: Path, workdir: Path) -> Any:
    from latentpipe.preprocessing.config import load_config
    from latentpipe.training.config import TrainConfig

    config = ROOT / (args.config or "configs/train_toy.yaml")
    extra = [] if args.config else [f"model.hidden={args.hidden}", f"model.depth={args.depth}", "model.channels=32"]
    return load_config(TrainConfig, config, [
        f"data.shards={shards}", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        f"steps={args.steps}", "eval_every=0", "sample_every=0", f"log_every={args.log_every}",
        "checkpoint.every_steps=0", "checkpoint.export=false", "optim.warmup_steps=0", "tracking.enabled=false",
        "ema.start_step=0", f"deepspeed.precision={args.precision}", f"deepspeed.zero_stage={args.stage}",
        f"workdir={workdir}", *extra, *args.override])


def worker_trainer(args: argparse.Namespace, shards: Path, out: Path) -> None:
    from latentpipe.training import engine as eng
    from latentpipe.training.engine import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _train_cfg(args, shards, Path(tmp) / "run")
        trainer = Trainer(cfg)
        samples = cfg.data.batch_size * cfg.deepspeed.grad_accum * trainer.di.world_size
        rec = Recorder(out, "trainer", args.round, samples, _sync)
        orig_next = trainer._next_batches

        def next_batches(it: Any) -> Any:
            rec.boundary()
            t0 = time.perf_counter()
            try:
                return orig_next(it)
            finally:
                PHASES["data"] += time.perf_counter() - t0

        trainer._next_batches = next_batches  # type: ignore[method-assign]
        timed(trainer.family, "loss", "loss")
        for engine in trainer.engines.values():
            timed(engine, "backward", "backward")
            timed(engine, "step", "step (all)")
            inner = engine.optimizer
            timed(engine.optimizer, "step", "optimizer")
            for name, phase in (("check_overflow", "overflow check"), ("scaled_global_norm", "norm"),
                                ("has_overflow", "overflow check")):
                if hasattr(inner, name):
                    timed(inner, name, phase)
            if hasattr(engine, "clip_fp32_gradients"):
                timed(engine, "clip_fp32_gradients", "norm")
        import torch.nn.utils as nn_utils

        timed(nn_utils, "clip_grad_norm_", "norm")
        if trainer.ema is not None:
            timed(trainer.ema, "update", "ema")
        for fn, phase in (("_flush", "syncs (log points)"),):
            timed(trainer, fn, phase)
        timed(eng, "_allreduce", "syncs")
        trainer.run()
        rec.boundary()


def worker_bare(args: argparse.Namespace, shards: Path, out: Path) -> None:
    import torch

    from latentpipe.training.data import ShardStream
    from latentpipe.training.families import family_for_data

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _train_cfg(args, shards, Path(tmp) / "run")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fam = family_for_data(cfg.model, cfg.data.kind)
    torch.manual_seed(cfg.seed)
    modules = {k: m.to(device) for k, m in fam.build().items()}
    params = [p for p in modules["model"].parameters() if p.requires_grad]
    it = ShardStream(cfg.data, 0, 1).batches(0)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(it).items()}
    del it
    # bf16 as DeepSpeed does it, by hand: the module computes in bf16, AdamW updates fp32 masters
    # (fed the bf16 gradients, upcast), and the weights are copied back; fp32: the weights are the masters.
    bf16 = cfg.deepspeed.precision == "bf16"
    if bf16:
        masters = [p.detach().float().clone() for p in params]
        modules = {k: m.to(torch.bfloat16) for k, m in modules.items()}
        params = [p for p in modules["model"].parameters() if p.requires_grad]
    else:
        masters = params
    opt = torch.optim.AdamW(masters, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, fused=True)
    # The same EMA the trainer keeps, by hand (a multi-tensor lerp of the fp32 masters every
    # ``ema.every`` steps), so the ratio is what the trainer adds, not what the recipe costs.
    ema = [m.detach().clone() for m in masters] if cfg.ema.enabled else []
    rec = Recorder(out, "bare", args.round, cfg.data.batch_size, _sync)
    for i in range(args.steps):
        rec.boundary()
        t0 = time.perf_counter()
        loss, _ = fam.loss("model", modules, batch, i)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if bf16:
            for m, p in zip(masters, params):
                m.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(masters, cfg.optim.grad_clip, foreach=True)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bf16:
            with torch.no_grad():
                torch._foreach_copy_(params, masters)
            for p in params:
                p.grad = None
        t4 = time.perf_counter()
        if ema and (i + 1) % cfg.ema.every == 0:
            with torch.no_grad():
                torch._foreach_lerp_(ema, masters, 1.0 - cfg.ema.decay ** cfg.ema.every)
        t5 = time.perf_counter()
        PHASES.update({"loss": t1 - t0, "backward": t2 - t1, "norm": t3 - t2, "optimizer": t4 - t3, "ema": t5 - t4})
    rec.boundary()


def summarize(rows: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": []}
    for r in sorted({row["round"] for row in rows}):
        entry: dict[str, Any] = {"round": r}
        for side in ("bare", "trainer"):
            sel = [x for x in rows if x["round"] == r and x["side"] == side and x["step"] >= warmup
                   and not x.get("profiled")]
            if not sel:
                continue
            step_s = statistics.median(x["step_s"] for x in sel)
            cpu_s = statistics.median(x["cpu_s"] for x in sel)
            phases: dict[str, float] = defaultdict(float)
            for x in sel:
                for k, v in x["phases"].items():
                    phases[k] += v / len(sel)
            prof = [x["busy_s"] / x["step_s"] for x in rows if x["round"] == r and x["side"] == side
                    and x.get("profiled")]
            entry[side] = {"samples_per_s": round(sel[0]["samples"] / step_s, 2), "step_ms": round(step_s * 1e3, 2),
                           "samples_per_cpu_s": round(sel[0]["samples"] / cpu_s, 2), "cpu_ms": round(cpu_s * 1e3, 2),
                           "steps": len(sel), "phases_ms": {k: round(v * 1e3, 2) for k, v in sorted(phases.items())},
                           "profiler_busy_share": round(statistics.mean(prof), 3) if prof else None}
        if "bare" in entry and "trainer" in entry:
            entry["ratio"] = round(entry["trainer"]["samples_per_s"] / entry["bare"]["samples_per_s"], 3)
            entry["ratio_cpu"] = round(entry["trainer"]["samples_per_cpu_s"] / entry["bare"]["samples_per_cpu_s"], 3)
        out["rounds"].append(entry)
    for key in ("ratio", "ratio_cpu"):
        ratios = [e[key] for e in out["rounds"] if key in e]
        out[f"{key}_median"] = statistics.median(ratios) if ratios else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--worker", choices=["trainer", "bare"])
    ap.add_argument("--shards", type=Path)
    ap.add_argument("--round", type=int, default=0)
    ap.add_argument("--config", help="a train config under the repo (default: the toy family, --hidden/--depth)")
    ap.add_argument("--hidden", type=int, default=1344)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="data.num_workers of the trainer")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--latent", type=int, default=0, help="latent shards of this grid (for --config priors)")
    ap.add_argument("override", nargs="*", help="extra key=value overrides of the train config")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side (0: torch's default)")
    args = ap.parse_args()
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        {"trainer": worker_trainer, "bare": worker_bare}[args.worker](args, args.shards, args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    steps_file = args.out / "steps.jsonl"
    steps_file.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.latent:
            from latentpipe.preprocessing.config import load_config
            from latentpipe.training.config import TrainConfig
            from tests.shards import make_latent_shards

            max_len = load_config(TrainConfig, ROOT / args.config).data.max_text_len if args.config else 32
            shards = make_latent_shards(Path(tmp) / "lat", n=2, per_shard=2 * args.batch, C=4, h=args.latent,
                                        w=args.latent, text_dim=384, max_len=max_len, codebook=16384)
        else:
            from tests.shards import make_image_shards

            shards = make_image_shards(Path(tmp) / "img", 2, 2 * args.batch)
        env = {**os.environ}
        passthrough = [a for a in sys.argv[1:]]
        for r in range(args.rounds):
            for side in ("bare", "trainer"):
                cmd = [sys.executable, __file__, *passthrough, "--worker", side, "--shards", str(shards),
                       "--round", str(r)]
                cmd[cmd.index("--out") + 1] = str(steps_file)
                t0 = time.perf_counter()
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                status = "ok" if p.returncode == 0 else f"failed ({p.returncode}): {p.stderr[-2000:]}"
                print(f"round {r} {side}: {status} in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = [json.loads(line) for line in steps_file.read_text().splitlines()]
    summary = {"command": " ".join(["python", "benchmarks/profile_trainer.py", *sys.argv[1:]]),
               "args": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
               **summarize(rows, args.warmup)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
