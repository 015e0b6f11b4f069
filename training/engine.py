"""The training loop: DeepSpeed engines per family part, sharded EMA, checkpoints, resume, SIGTERM.

One optimizer step = ``grad_accum`` micro-batches; the data stream's position is a global
sample count, so a resume (at any world size with the same global batch) reads exactly the
samples an uninterrupted run would have. Per step, for each part in ``family.parts(step)``
and each micro-batch: ``loss = family.loss(...)``, one all-reduce of (loss, non-finite flag),
``engine.backward(loss)``, ``engine.step()``. A non-finite loss anywhere makes every rank
drop that part's step (DeepSpeed's own overflow path under ZeRO/bf16/fp16; gradients
cleared before the step otherwise), is counted, and stops the run under ``nonfinite: stop``.
SIGTERM (preemption) is noticed by all ranks at the next step boundary (a MAX all-reduce):
they save a checkpoint and return normally, so the process exits 0.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from preprocessing.config import ConfigError, config_hash, save_config, to_dict
from training import checkpoint as ckpt
from training.config import TrainConfig
from training.data import DataConfig, ShardStream
from training.ema import ShardedEMA
from training.export import consolidated_state_dict, save_export
from training.families import Family, family_for_data, model_config_dict
from training.throughput import flops_per_sample, mfu, peak_flops
from training.tracking import Tracker
from training.zero import DistInfo, build_engines, build_modules, setup_distributed, uses_fp32_partitions

log = logging.getLogger("latentpipe.train")


class NonFiniteLossError(RuntimeError):
    """The run stopped on a non-finite loss (policy ``stop`` or too many skips)."""


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    stopped_by_signal: bool
    checkpoint: str | None
    export: str | None
    nonfinite_steps: int
    losses: list[float] = field(default_factory=list)  # primary part's mean loss per step of this process
    step_times: list[float] = field(default_factory=list)  # seconds per step of this process
    data_waits: list[float] = field(default_factory=list)  # seconds blocked on the loader per step


class _StopFlag:
    """Set by SIGTERM; handlers only in the main thread (Ray Train runs the loop in a worker thread)."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting")
        self.set = True

    def uninstall(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _allreduce(values: list[float], device: torch.device, op: Any = None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


class Trainer:
    """Builds everything from a ``TrainConfig`` on this rank; ``run()`` trains to ``cfg.steps``."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo | None = None) -> None:
        self.cfg = cfg
        t0 = time.perf_counter()
        self.stop = _StopFlag()
        self.stop.install()  # a preemption during the (slow) start-up is honoured after the first step
        self.di = dist_info or setup_distributed(cfg.deepspeed.backend)
        self.workdir = Path(cfg.workdir)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.workdir / "checkpoints"
        self.family: Family = family_for_data(cfg.model, cfg.data.kind)
        self.resume_from = self._find_resume()
        self.stream = ShardStream(cfg.data, self.di.rank, self.di.world_size)
        prev_world = int(self.resume_from.state["world_size"]) if self.resume_from else self.di.world_size
        # DeepSpeed's partitioned optimizer state only reloads at the same world size; otherwise
        # through DeepSpeed's universal checkpoint (ds_to_universal + load_universal).
        self.universal = bool(self.resume_from and prev_world != self.di.world_size
                              and self.resume_from.state.get("partitioned", True))
        modules = build_modules(self.family, cfg, self.di.world_size)
        self.engines = build_engines(modules, cfg, self.di.world_size, universal=self.universal)
        self.modules = {k: e for k, e in self.engines.items()}
        self.ema = (ShardedEMA(self.engines["model"], cfg.ema.decay, cfg.ema.every, cfg.ema.warmup_power)
                    if cfg.ema.enabled else None)
        t_engines = time.perf_counter()
        self.tracker = Tracker(cfg.tracking, self.workdir, active=self.di.rank == 0, resume=cfg.resume)
        log.info("rank %d/%d: %s, %d part(s), ZeRO-%d %s, ready in %.1fs (tracker %.1fs)", self.di.rank,
                 self.di.world_size, self.family.name, len(self.engines), cfg.deepspeed.zero_stage,
                 cfg.deepspeed.precision, time.perf_counter() - t0, time.perf_counter() - t_engines)
        self.step = 0
        self.nonfinite = 0
        self._flops: float | None = None
        self._eval_batch: dict[str, Any] | None = None
        self._start_step = 0

    # -- resume ----------------------------------------------------------------------------------

    def _find_resume(self) -> ckpt.CheckpointInfo | None:
        latest = ckpt.latest_complete(self.ckpt_root)
        if self.cfg.resume and latest is None:
            raise ConfigError(f"--resume: no complete checkpoint under {self.ckpt_root}")
        if not self.cfg.resume and latest is not None:
            raise ConfigError(f"{self.ckpt_root} already holds checkpoints (latest step {latest.step}): "
                              "pass --resume to continue, or use another workdir")
        return latest if self.cfg.resume else None

    def _restore(self, info: ckpt.CheckpointInfo) -> None:
        state = info.state
        if sorted(state["parts"]) != sorted(self.engines):
            raise ConfigError(f"checkpoint {info.path} has parts {state['parts']}, the family builds "
                              f"{sorted(self.engines)}")
        root = info.path
        if self.universal:
            root = self._universal(info)
        for part, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(root), tag=part, load_module_strict=True)
            if path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint for part {part!r} in {root}")
        ema_state = state.get("ema") or {}
        if self.ema is not None and ema_state.get("started"):
            self.ema.load(info.path / "ema")
            self.ema.updates = int(ema_state.get("updates", 0))
        elif self.ema is not None and info.step > self.cfg.ema.start_step:
            raise ConfigError(f"checkpoint {info.path} has no EMA but ema.start_step={self.cfg.ema.start_step} "
                              f"< step {info.step}")
        if not ckpt.load_rng(info.path / "rng", self.di.rank):
            torch.manual_seed(self.cfg.seed * 100_003 + info.step * 1009 + self.di.rank)
            log.warning("rank %d: no RNG state in the checkpoint (it was saved at %s ranks): reseeded",
                        self.di.rank, state["world_size"])
        self.step = info.step
        self.nonfinite = int(state.get("nonfinite_steps", 0))
        self._flops = state.get("flops_per_sample")
        log.info("resumed from %s (step %d, saved at %d ranks%s)", info.path, info.step, state["world_size"],
                 ", universal" if self.universal else "")

    def _universal(self, info: ckpt.CheckpointInfo) -> Path:
        """Rank 0 converts each part to DeepSpeed's universal format once (kept in the checkpoint)."""
        out = info.path / "universal"
        if self.di.rank == 0 and not out.is_dir():
            import argparse

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            tmp = info.path / "universal.tmp"
            for part in self.engines:
                ds_to_universal(argparse.Namespace(
                    input_folder=str(info.path / part), output_folder=str(tmp / part), num_extract_workers=1,
                    num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
            tmp.rename(out)
        if dist.is_initialized():
            dist.barrier()
        return out

    # -- checkpoints and export ------------------------------------------------------------------

    def _check_finite(self) -> None:
        """Never write non-finite weights: all ranks check their fp32 fragments before a save."""
        bad = 0.0
        for engine in self.engines.values():
            for p in engine.module.parameters():
                if p.numel() and not torch.isfinite(p.data).all():
                    bad = 1.0
        if self.ema is not None and self.ema.started and any(
                not torch.isfinite(t).all() for t in self.ema.shadow.values()):
            bad = 1.0
        if _allreduce([bad], self.di.device)[0]:
            raise NonFiniteLossError(f"non-finite weights at step {self.step}: not checkpointing them")

    def save(self) -> Path:
        self._check_finite()
        state = {
            "world_size": self.di.world_size, "parts": sorted(self.engines),
            "zero_stage": self.cfg.deepspeed.zero_stage, "precision": self.cfg.deepspeed.precision,
            "partitioned": any(uses_fp32_partitions(e) for e in self.engines.values()),
            "data": self.stream.state_dict(self.step * self.cfg.deepspeed.grad_accum),
            "nonfinite_steps": self.nonfinite, "ema": self.ema.state() if self.ema else None,
            "family": self.family.name, "config_hash": config_hash(self.cfg), "flops_per_sample": self._flops,
        }

        def write(tmp: Path) -> None:
            for part, engine in self.engines.items():
                engine.save_checkpoint(str(tmp), tag=part, save_latest=False, client_state={
                    "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
            if self.ema is not None and self.ema.started:
                self.ema.save(tmp / "ema")
            ckpt.save_rng(tmp / "rng", self.di.rank)

        path = ckpt.save_checkpoint(self.ckpt_root, self.step, state, write, self.cfg.checkpoint.keep_last)
        log.info("checkpoint %s", path)
        return path

    def export(self) -> Path:
        state = consolidated_state_dict(self.engines["model"], self.ema)
        out = self.workdir / "export"
        if self.di.rank == 0:
            manifest = self.stream.manifest or {}
            # Lineage: the data it saw and, for latent shards, the encoders that made them (the
            # text encoder identity is what `latentpipe sample` encodes prompts with).
            encoders = {role: {"identity": e.get("identity", {})}
                        for role, e in (manifest.get("encoders") or {}).items()}
            extra = {"step": self.step, "ema": bool(self.ema and self.ema.started),
                     "ema_decay": self.cfg.ema.decay if self.ema else None,
                     "config_hash": config_hash(self.cfg), "data_fingerprint": self.stream.fingerprint,
                     "data_manifest_hash": manifest.get("config_hash"), "encoder_id": manifest.get("encoder_id"),
                     "encoders": encoders, "git_commit": _git_commit()}
            save_export(out, self.family.name, model_config_dict(self.family), state, extra)
            (out / "train_config.json").write_text(json.dumps(to_dict(self.cfg), indent=1), encoding="utf-8")
            if self.cfg.tracking.register_as:
                tags = {k: str(v) for k, v in extra.items() if k != "encoders" and v is not None}
                for role, e in encoders.items():
                    ident = e["identity"]
                    tags[f"encoder.{role}"] = f"{ident.get('source', '?')}@{str(ident.get('sha256', ''))[:12]}"
                # "latest" is reserved by MLflow (models:/name/latest); "final" names the end-of-run export.
                self.tracker.register_model(out, self.cfg.tracking.register_as, tags=tags, aliases=("final",))
        if dist.is_initialized():
            dist.barrier()
        return out

    # -- the loop --------------------------------------------------------------------------------

    def _fixed_batch(self) -> dict[str, Any]:
        if self._eval_batch is None:
            dcfg = self.cfg.data
            if self.cfg.eval_shards:
                dcfg = DataConfig(**{**to_dict(dcfg), "shards": self.cfg.eval_shards, "num_workers": 0})
            stream = ShardStream(dcfg, self.di.rank, self.di.world_size) if self.cfg.eval_shards else self.stream
            it = stream.batches(0)
            self._eval_batch = _to_device(next(it), self.di.device)
            del it
        return self._eval_batch

    def _hooks(self) -> None:
        s, cfg = self.step, self.cfg
        if cfg.eval_every and s % cfg.eval_every == 0:
            for e in self.engines.values():
                e.eval()
            logs = self.family.evaluate(self.modules, self._fixed_batch(), s)
            keys = sorted(logs)
            vals = _allreduce([float(logs[k]) for k in keys], self.di.device)
            self.tracker.log_metrics({f"eval/{k}": v / self.di.world_size for k, v in zip(keys, vals)}, step=s)
            for e in self.engines.values():
                e.train()
        if cfg.sample_every and s % cfg.sample_every == 0:
            for e in self.engines.values():
                e.eval()
            images = self.family.log_images(self.modules, self._fixed_batch())
            for name, img in images.items():
                self.tracker.log_image(img, f"samples/{name}", step=s)
            for e in self.engines.values():
                e.train()

    def _train_step(self, batches: list[dict[str, Any]]) -> tuple[dict[str, float], bool]:
        """One optimizer step of every part on ``batches`` (the micro-batches)."""
        logs: dict[str, float] = {}
        any_bad = False
        for part in self.family.parts(self.step):
            engine = self.engines[part]
            # Other parts go in unwrapped: a DeepSpeed engine's forward hooks its outputs into the
            # *caller's* backward, which would run that engine's gradient epilogue (ZeRO-3 still
            # gathers their parameters: its hooks sit on the module itself).
            modules = {k: (e if k == part else e.module) for k, e in self.engines.items()}
            total, bad = 0.0, False
            extra_sums: dict[str, float] = {}
            for i, batch in enumerate(batches):
                loss, extra = self.family.loss(part, modules, batch, self.step)
                value = float(loss.detach().float())
                finite = bool(torch.isfinite(loss.detach()).all())
                red = _allreduce([value if finite else 0.0, 0.0 if finite else 1.0], self.di.device)
                bad = bad or red[1] > 0
                total += red[0] / self.di.world_size
                for k, v in extra.items():
                    extra_sums[k] = extra_sums.get(k, 0.0) + float(v) / len(batches)
                engine.backward(loss)
                skipped_before = engine.skipped_steps
                if bad and i == len(batches) - 1 and not uses_fp32_partitions(engine):
                    # Plain torch optimizer (ZeRO-0, fp32): no overflow check in DeepSpeed, so drop
                    # the gradients and skip its step the way DeepSpeed skips an overflowed one
                    # (the micro-step counter advances; no optimizer or LR-scheduler step).
                    engine.optimizer.zero_grad(set_to_none=True)
                    engine.micro_steps += 1
                    engine.skipped_steps += 1
                    continue
                engine.step()
                if bad and i == len(batches) - 1 and uses_fp32_partitions(engine) \
                        and engine.skipped_steps == skipped_before:
                    raise NonFiniteLossError(f"part {part!r}: DeepSpeed applied a step with a non-finite loss")
            any_bad = any_bad or bad
            logs[f"loss/{part}"] = float("nan") if bad else total / len(batches)
            logs.update({f"{part}/{k}": v for k, v in extra_sums.items()})
            logs[f"lr/{part}"] = float(engine.get_lr()[0])
            norm = engine.get_global_grad_norm()
            if norm is not None and not bad:
                logs[f"grad_norm/{part}"] = float(norm)
        return logs, any_bad

    def _next_batches(self, it: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for _ in range(self.cfg.deepspeed.grad_accum):
            batch = next(it)
            if self.cfg.log_keys:
                keys_dir = self.workdir / "keys"
                keys_dir.mkdir(parents=True, exist_ok=True)
                name = f"start-{self._start_step:06d}-rank-{self.di.rank:05d}.jsonl"
                with open(keys_dir / name, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": self.step, "keys": list(batch["__key__"])}) + "\n")
            out.append(_to_device(batch, self.di.device))
        return out

    def run(self) -> TrainResult:
        cfg, di = self.cfg, self.di
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.resume_from is not None:
            self._restore(self.resume_from)
        else:
            torch.manual_seed(cfg.seed + di.rank)  # per-rank RNG (e.g. noise draws) after identical init
        self._start_step = self.step
        if self.resume_from is None:
            self.tracker.log_config(to_dict(cfg))
        else:  # MLflow params are write-once: a resume's config (e.g. a new world size) is an artifact
            path = self.workdir / f"train_config.resume-{self.step:06d}.yaml"
            if di.rank == 0:
                save_config(cfg, path)
                self.tracker.log_artifact(path, "resumes")
                self.tracker.set_tags({"resumed_from_step": str(self.step), "world_size": str(di.world_size)})
        self.tracker.set_tags({"family": self.family.name, "git_commit": _git_commit(),
                               "data_fingerprint": self.stream.fingerprint})
        gas = cfg.deepspeed.grad_accum
        it = self.stream.batches(start_sample=self.step * gas * self.stream.samples_per_step)
        losses: list[float] = []
        times: list[float] = []
        waits: list[float] = []
        last_ckpt: Path | None = None
        stopped = False
        peak = peak_flops(di.device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.deepspeed.precision, torch.float32))
        try:
            while self.step < cfg.steps:
                if self.ema is not None and not self.ema.started and self.step >= cfg.ema.start_step:
                    self.ema.start()
                t0 = time.perf_counter()
                try:
                    batches = self._next_batches(it)
                except Exception as e:
                    if self.stop.set:  # the signal also reached (and killed) the loader workers
                        raise RuntimeError("SIGTERM killed the data-loader workers before this rank could "
                                           "checkpoint; resume from the last periodic checkpoint") from e
                    raise
                t_data = time.perf_counter() - t0
                # FLOPs are counted once per run, on rank 0's first step (FlopCounterMode changes the
                # float rounding of what it counts, so a resumed run reuses the checkpoint's count
                # and stays bit-identical to an uninterrupted one).
                if self._flops is None and di.rank == 0 and self.step == 0:
                    holder: dict[str, Any] = {}

                    def first(h: dict[str, Any] = holder, b: list[dict[str, Any]] = batches) -> None:
                        h["r"] = self._train_step(b)

                    self._flops = flops_per_sample(first, cfg.data.batch_size * gas)
                    logs, bad = holder["r"]
                else:
                    logs, bad = self._train_step(batches)
                if bad:
                    self.nonfinite += 1
                    log.warning("step %d: non-finite loss, step skipped (%d so far)", self.step, self.nonfinite)
                    if cfg.nonfinite == "stop" or self.nonfinite >= cfg.max_nonfinite:
                        raise NonFiniteLossError(f"non-finite loss at step {self.step} "
                                                 f"({self.nonfinite} non-finite steps; policy {cfg.nonfinite})")
                self.step += 1
                if self.ema is not None and self.ema.started and self.step % cfg.ema.every == 0:
                    self.ema.update()
                dt = time.perf_counter() - t0
                losses.append(logs.get("loss/model", float("nan")))
                times.append(dt)
                waits.append(t_data)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    sps = cfg.data.batch_size * gas * di.world_size / dt
                    logs.update({"samples_per_s": sps, "data_wait": t_data / dt, "step_time": dt,
                                 "nonfinite_steps": float(self.nonfinite)})
                    if peak and self._flops:
                        logs["mfu"] = mfu(sps, self._flops, peak, di.world_size)
                    self.tracker.log_metrics(logs, step=self.step)
                self._hooks()
                stop_now = _allreduce([1.0 if self.stop.set else 0.0], di.device, dist.ReduceOp.MAX)[0] > 0
                every = cfg.checkpoint.every_steps
                if stop_now or (every and self.step % every == 0 and self.step < cfg.steps):
                    last_ckpt = self.save()
                if stop_now:
                    stopped = True
                    break
            export = None
            if not stopped:
                latest = ckpt.latest_complete(self.ckpt_root)
                if latest is None or latest.step != self.step:
                    last_ckpt = self.save()
                if cfg.checkpoint.export:
                    export = str(self.export())
            # A preempted job has a short grace period: unsent tracking events stay in the spool.
            self.tracker.close("KILLED" if stopped else "FINISHED", timeout=5.0 if stopped else 30.0)
            return TrainResult(self.step, stopped, str(last_ckpt) if last_ckpt else None, export,
                               self.nonfinite, losses, times, waits)
        except BaseException:
            self.tracker.close("FAILED")
            raise
        finally:
            self.stop.uninstall()
            del it


def train_loop(cfg: TrainConfig) -> TrainResult:
    """Train on this rank (the process group comes from the environment)."""
    return Trainer(cfg).run()


__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "train_loop"]
