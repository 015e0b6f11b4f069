"""The training loop: DeepSpeed engines per family part, sharded EMA, checkpoints, resume, SIGTERM.

One optimizer step = ``grad_accum`` micro-batches; the data stream's position is a global
sample count, so a resume (at any world size with the same global batch) reads exactly the
samples an uninterrupted run would have. Per step, for each part in ``family.parts(step)``:
``loss = family.loss(...)`` and ``engine.backward(loss)`` per micro-batch, one all-reduce of
(loss sum, non-finite count) as a device tensor, ``engine.step()``. Losses, logs and the
non-finite flag stay on the device between log points (every ``log_every`` steps, before a
checkpoint and at the end): the host reads them there in one transfer, so the loop itself
never waits for the device. A non-finite loss anywhere makes every rank drop that part's step
exactly (no change to weights, Adam moments or Adam's step count): the flag is the fused
AdamW's ``found_inf`` (a skip on the device), or DeepSpeed's own overflow path where it checks
itself (ZeRO-3, fp16); the LR schedule advances with the step count either way. The skip is
counted and warned about at the next log point, which stops the run under ``nonfinite: stop``
(or after ``max_nonfinite`` skips) before anything after the bad step is checkpointed.
SIGTERM (preemption) is noticed by all ranks at a step boundary (a MAX all-reduce, read one
step later so it never stalls the device): they save a checkpoint and return normally, so the
process exits 0.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from latentpipe.preprocessing.config import ConfigError, config_hash, save_config, to_dict
from latentpipe.training import checkpoint as ckpt
from latentpipe.training.config import TrainConfig
from latentpipe.training.data import DataConfig, ShardStream
from latentpipe.training.ema import ShardedEMA
from latentpipe.training.export import consolidated_state_dict, publish, run_lineage
from latentpipe.training.families import Family, family_for_data
from latentpipe.training.monitor import TrainMonitor, quiet_known_noise
from latentpipe.training.pending import Pending, SigtermFlag, StopPoll
from latentpipe.training.safe_load import weights_only_loads
from latentpipe.training.throughput import flops_per_sample, mfu, peak_flops
from latentpipe.training.tracking import Tracker, default_run_name, git_commit
from latentpipe.training.zero import (
    DistInfo,
    build_engines,
    build_modules,
    deepspeed_skips_overflow,
    effective_stage,
    setup_distributed,
    step_optimizer,
    trainer_clips,
)

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
        quiet_known_noise()
        t0 = time.perf_counter()
        self.stop = SigtermFlag()
        self.stop.install()  # a preemption during the (slow) start-up is honoured after the first step
        self.di = dist_info or setup_distributed(cfg.deepspeed.backend)
        self.workdir = Path(cfg.workdir)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.workdir / "checkpoints"
        self.family: Family = family_for_data(cfg.model, cfg.data.kind)
        self.resume_from = self._find_resume()
        self.stream = ShardStream(cfg.data, self.di.rank, self.di.world_size)
        self.family.bind_data(self.stream.manifest)  # e.g. the latent priors' VAE scaling/shift factors
        self._data_start = 0  # the global sample position the stream continues from
        if self.resume_from is not None:  # refuse other data before any engine is built
            self._data_start = self.stream.resume_position(
                self.resume_from.state.get("data") or {}, self.resume_from.step * cfg.deepspeed.grad_accum,
                cfg.resume_on_changed_data)
        prev_world = int(self.resume_from.state["world_size"]) if self.resume_from else self.di.world_size
        # DeepSpeed's partitioned optimizer state only reloads at the same world size; otherwise
        # through DeepSpeed's universal checkpoint (ds_to_universal + load_universal).
        self.universal = bool(self.resume_from and prev_world != self.di.world_size
                              and self.resume_from.state.get("partitioned", True))
        modules = build_modules(self.family, cfg, self.di.world_size)
        self.stage = effective_stage(cfg, self.di.world_size, self.resume_from.state if self.resume_from else None)
        self.engines = build_engines(modules, cfg, self.di.world_size, universal=self.universal, stage=self.stage)
        self.modules = {k: e for k, e in self.engines.items()}
        self.ema = (ShardedEMA(self.engines["model"], cfg.ema.decay, cfg.ema.every, cfg.ema.warmup_power)
                    if cfg.ema.enabled else None)
        t_engines = time.perf_counter()
        self.tracker = Tracker(cfg.tracking, self.workdir, active=self.di.rank == 0, resume=cfg.resume,
                               default_name=default_run_name(cfg.model, self.workdir))
        log.info("rank %d/%d: %s, %d part(s), ZeRO-%d %s, ready in %.1fs (tracker %.1fs)", self.di.rank,
                 self.di.world_size, self.family.name, len(self.engines), self.stage,
                 cfg.deepspeed.precision, time.perf_counter() - t0, time.perf_counter() - t_engines)
        self.step = 0
        self.nonfinite = 0
        self._flops: float | None = None
        self._eval_batch: dict[str, Any] | None = None
        self._start_step = 0
        self._clip = cfg.optim.grad_clip if trainer_clips(cfg, self.stage) else 0.0
        self._norms: dict[str, torch.Tensor] = {}  # per part: the norm the trainer clipped with
        self._expect_skip: dict[str, bool] = {}
        self._skips: dict[str, torch.Tensor] = {}  # per part: the step's skip flag when it covers more than the loss
        self._pending: list[Pending] = []
        self._registered: str | None = None

    # -- resume ----------------------------------------------------------------------------------

    def _find_resume(self) -> ckpt.CheckpointInfo | None:
        """Without --resume: None (refused if checkpoints exist). With it: the newest intact complete
        checkpoint (``ckpt.select_resume``), chosen by rank 0 (it alone hashes the files) for all."""
        if not self.cfg.resume:
            latest = ckpt.latest_complete(self.ckpt_root)
            if latest is not None:
                raise ConfigError(f"{self.ckpt_root} already holds checkpoints (latest step {latest.step}): "
                                  "pass --resume to continue, or use another workdir")
            return None
        error: ckpt.CheckpointError | None = None
        step = -1
        if self.di.rank == 0:
            try:
                step = ckpt.select_resume(self.ckpt_root).step
            except ckpt.CheckpointError as e:
                error = e
        if dist.is_initialized() and self.di.world_size > 1:
            t = torch.tensor([step], dtype=torch.int64, device=self.di.device)
            dist.broadcast(t, src=0)
            step = int(t.item())
        if error is not None:
            raise error
        found = [c for c in ckpt.list_complete(self.ckpt_root) if c.step == step]
        if not found:
            raise ckpt.CheckpointError(f"--resume: rank 0 found no intact checkpoint under {self.ckpt_root}")
        return found[0]

    def _restore(self, info: ckpt.CheckpointInfo) -> None:
        state = info.state
        if sorted(state["parts"]) != sorted(self.engines):
            raise ConfigError(f"checkpoint {info.path} has parts {state['parts']}, the family builds "
                              f"{sorted(self.engines)}")
        with weights_only_loads():  # every torch.load below (DeepSpeed's included) is weights-only
            root = self._universal(info) if self.universal else info.path
            for part, engine in self.engines.items():
                path, _ = engine.load_checkpoint(str(root), tag=part, load_module_strict=True)
                if path is None:
                    raise RuntimeError(f"DeepSpeed found no checkpoint for part {part!r} in {root}")
        if self.universal:
            if dist.is_initialized():
                dist.barrier()
            if self.di.rank == 0:
                shutil.rmtree(root, ignore_errors=True)
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
        """Rank 0 converts each part to DeepSpeed's universal format in a scratch folder of the
        workdir (the checkpoint itself stays exactly as its digests say); removed after loading."""
        out = self.workdir / f".universal-{info.step:06d}"
        if self.di.rank == 0:
            import argparse

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(out, ignore_errors=True)
            for part in self.engines:
                ds_to_universal(argparse.Namespace(
                    input_folder=str(info.path / part), output_folder=str(out / part), num_extract_workers=1,
                    num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
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
            "partitioned": any(e.zero_optimization() for e in self.engines.values()),  # per-rank ZeRO files
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
        """Collective: the consolidated (EMA) weights as ``workdir/export``, with the run's lineage;
        registered in MLflow when ``tracking.register_as`` is set."""
        state = consolidated_state_dict(self.engines["model"], self.ema)
        out = self.workdir / "export"
        if self.di.rank == 0:
            extra = run_lineage(self.cfg, self.step, bool(self.ema and self.ema.started), self.stream.manifest,
                                self.stream.fingerprint)
            self._registered = publish(out, self.family, self.cfg, state, extra, self.tracker)
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
            metrics = {f"eval/{k}": v / self.di.world_size for k, v in zip(keys, vals)}
            self.tracker.log_metrics(metrics, step=s)
            self.monitor.evaluated(metrics, s)
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

    def _train_step(self, batches: list[dict[str, Any]]) -> tuple[dict[str, Any], torch.Tensor]:
        """One optimizer step of every part on ``batches`` (the micro-batches).

        Returns the logs (0-dim device tensors or floats) and the step's non-finite flag (a 0-dim
        bool on the device); nothing here reads a device value on the host, unless an engine's
        step cannot be skipped on the device (``step_optimizer`` is None at ZeRO-0).
        """
        logs: dict[str, Any] = {}
        any_bad: torch.Tensor | None = None
        n = len(batches)
        for part in self.family.parts(self.step):
            engine = self.engines[part]
            # Other parts go in unwrapped: a DeepSpeed engine's forward hooks its outputs into the
            # *caller's* backward, which would run that engine's gradient epilogue (ZeRO-3 still
            # gathers their parameters: its hooks sit on the module itself).
            modules = {k: (e if k == part else e.module) for k, e in self.engines.items()}
            stats = torch.zeros(2, dtype=torch.float32, device=self.di.device)  # (finite loss sum, bad count)
            extra_sums: dict[str, Any] = {}
            for i, batch in enumerate(batches):
                loss, extra = self.family.loss(part, modules, batch, self.step)
                value = loss.detach().float()
                finite = torch.isfinite(value)
                stats += torch.stack([torch.where(finite, value, 0.0), (~finite).float()])
                for k, v in extra.items():
                    v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                    extra_sums[k] = extra_sums.get(k, 0.0) + v / n
                engine.backward(loss)
                if i == n - 1:
                    if self.di.world_size > 1:
                        dist.all_reduce(stats)  # a device collective: no host read
                    bad = stats[1] > 0
                    drop = self._prepare_step(part, engine, bad)
                    bad = self._skips.pop(part, bad)
                    if drop:
                        engine.micro_steps += 1
                        engine.skipped_steps += 1
                        continue
                skipped_before = engine.skipped_steps
                engine.step()
                if engine.skipped_steps != skipped_before and engine.lr_scheduler is not None:
                    engine.lr_scheduler.step()  # DeepSpeed skipped it itself: the schedule follows the step count
                elif i == n - 1 and self._expect_skip.pop(part, False):
                    raise NonFiniteLossError(f"part {part!r}: DeepSpeed applied a step with a non-finite loss")
            any_bad = bad if any_bad is None else any_bad | bad
            logs[f"loss/{part}"] = torch.where(bad, float("nan"), stats[0] / (self.di.world_size * n))
            logs.update({f"{part}/{k}": v for k, v in extra_sums.items()})
            logs[f"lr/{part}"] = float(engine.get_lr()[0])
            norm = self._norms.pop(part, None)
            if norm is None:
                norm = engine.get_global_grad_norm()
            if norm is not None:
                logs[f"grad_norm/{part}"] = norm
        assert any_bad is not None
        return logs, any_bad

    def _prepare_step(self, part: str, engine: Any, bad: torch.Tensor) -> bool:
        """Before the boundary ``engine.step()``: arm the device-side skip and clip where the trainer
        clips. Returns True when the step must be dropped here instead (the host-read fallback)."""
        opt = step_optimizer(engine)
        if opt is not None:
            skip = bad
            if self._clip:
                params = [p for p in engine.module.parameters() if p.grad is not None]
                norm = self._norms[part] = torch.nn.utils.clip_grad_norm_(params, self._clip, foreach=True)
                skip = bad | ~torch.isfinite(norm)  # non-finite gradients of a finite loss: skipped too
            opt.found_inf = skip.float()  # type: ignore[attr-defined]  # fused AdamW: no update when 1
            self._skips[part] = skip
            return False
        # No device-side skip (e.g. an optimizer from a DeepSpeed config file): read the flag here.
        if not bool(bad):
            return False
        if deepspeed_skips_overflow(engine):
            self._expect_skip[part] = True  # DeepSpeed's overflow check drops it (checked after the step)
            return False
        engine.optimizer.zero_grad(set_to_none=True)
        return True

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
        self.tracker.set_tags({"family": self.family.name, "git_commit": (git_commit() or "unknown"),
                               "data_fingerprint": self.stream.fingerprint})
        self.tracker.log_input(cfg.data.shards, self.stream.manifest, self.stream.fingerprint, self.stream.num_samples)
        gas = cfg.deepspeed.grad_accum
        it = self.stream.batches(start_sample=self._data_start)
        self._result = TrainResult(self.step, False, None, None, self.nonfinite)
        last_ckpt: Path | None = None
        stopped = False
        peak = peak_flops(di.device, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.deepspeed.precision, torch.float32))
        samples = cfg.data.batch_size * gas * di.world_size
        self.monitor = TrainMonitor(cfg.steps, self.step, samples, cfg.progress_interval, di.device,
                                    enabled=di.rank == 0)
        poll = StopPoll(self.stop, di.device, di.world_size)
        t_start = time.perf_counter()
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
                self.step += 1
                if self.ema is not None and self.ema.started and self.step % cfg.ema.every == 0:
                    self.ema.update()
                dt = time.perf_counter() - t0
                self._pending.append(Pending(self.step - 1, logs, bad, dt, t_data))
                self.monitor.timed(dt, t_data)
                every = cfg.checkpoint.every_steps
                save_now = bool(every and self.step % every == 0 and self.step < cfg.steps)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or save_now:
                    self._flush(peak, samples)
                self.monitor.advance()
                self._hooks()
                stop_now = poll.check()
                if stop_now or save_now:
                    self._flush(peak, samples)
                    last_ckpt = self.save()
                if stop_now:
                    stopped = True
                    break
            self._flush(peak, samples)
            export = None
            if not stopped:
                latest = ckpt.latest_complete(self.ckpt_root)
                if latest is None or latest.step != self.step:
                    last_ckpt = self.save()
                if cfg.checkpoint.export:
                    export = str(self.export())
            # A preempted job has a short grace period: unsent tracking events stay in the spool.
            self.tracker.close("KILLED" if stopped else "FINISHED", timeout=5.0 if stopped else 30.0)
            res = self._result
            res.step, res.stopped_by_signal, res.nonfinite_steps = self.step, stopped, self.nonfinite
            res.checkpoint, res.export = (str(last_ckpt) if last_ckpt else None), export
            self.monitor.summary(self.step - self._start_step, time.perf_counter() - t_start, self.nonfinite,
                                 export, self._registered)
            return res
        except BaseException:
            self.tracker.close("FAILED")
            raise
        finally:
            self.monitor.close()
            self.stop.uninstall()
            del it

    def _flush(self, peak: float | None, samples: int) -> None:
        """Read the steps since the last log point from the device (one transfer), count and warn
        about skipped steps, apply the non-finite policy, and log the last step's metrics."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        tensors = [t for p in pending for t in p.tensors()]
        values = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist() if tensors else [])
        cfg, res = self.cfg, self._result
        for p in pending:
            logs, bad = p.read(values)
            res.losses.append(logs.get("loss/model", float("nan")))
            res.step_times.append(p.dt)
            res.data_waits.append(p.t_data)
            if bad:
                self.nonfinite += 1
                log.warning("step %d: non-finite loss or gradients, step skipped (%d so far)", p.step,
                            self.nonfinite)
                if cfg.nonfinite == "stop" or self.nonfinite >= cfg.max_nonfinite:
                    raise NonFiniteLossError(f"non-finite loss at step {p.step} "
                                             f"({self.nonfinite} non-finite steps; policy {cfg.nonfinite})")
        last = pending[-1]
        sps = samples / last.dt
        logs.update({"samples_per_s": sps, "data_wait": last.t_data / last.dt, "step_time": last.dt,
                     "nonfinite_steps": float(self.nonfinite)})
        if peak and self._flops:
            logs["mfu"] = mfu(sps, self._flops, peak, self.di.world_size)
        if last.step + 1 == self.step and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
            self.tracker.log_metrics(logs, step=self.step)
        self.monitor.logged(logs, self._flops, peak, self.di.world_size)

def train_loop(cfg: TrainConfig) -> TrainResult:
    """Train on this rank (the process group comes from the environment)."""
    return Trainer(cfg).run()


__all__ = ["NonFiniteLossError", "TrainResult", "Trainer", "train_loop"]
