"""What rank 0 shows of a training run: progress, the periodic metric line, the final summary.

On a terminal a tqdm bar; elsewhere (Ray jobs, CI, ``nohup``) a log line every
``progress_interval`` seconds (``latentpipe.preprocessing.progress.Progress``, the other stages' progress)
with step/total, steps/s, samples/s, the loss, MFU where the device's peak is known
(``latentpipe.training.throughput``), the data-wait share, memory and the ETA, after torchtitan's metric
line. The loss and MFU are those of the last log point (the loop reads the device only there).
"""

from __future__ import annotations

import contextlib
import io
import logging
import resource
import sys
import time
import warnings
from collections.abc import Iterator

import torch

from latentpipe.preprocessing.progress import Progress, _fmt_eta
from latentpipe.training.throughput import mfu

log = logging.getLogger("latentpipe.train")

# Evaluation metrics where larger is better; every other metric's best value is its smallest.
_HIGHER_IS_BETTER = ("psnr", "acc", "usage", "perplexity", "score")


def memory_gib(device: torch.device) -> tuple[str, float]:
    """(label, GiB): the peak allocated device memory on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return "gpu mem", torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return "rss", kib / 2**20


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_noise() -> None:
    """Silence third-party messages a user cannot act on, each by its exact text (nothing else):
    DeepSpeed's LR-scheduler warning when an engine is built (it reads the LR before step 1), and
    torch's deprecation FutureWarnings for the collectives DeepSpeed's ZeRO-3 calls."""
    ds_logger = logging.getLogger("DeepSpeed")
    prefix = "Attempting to get learning rate from scheduler before it has started"
    if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in ds_logger.filters):
        ds_logger.addFilter(_DropMessage(prefix))
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated",
                                category=FutureWarning)


@contextlib.contextmanager
def drop_known_prints(*known: str) -> Iterator[None]:
    """Run a block with Python's stdout captured, then print back every line except those containing
    one of ``known`` (third-party ``print`` noise, e.g. DeepSpeed's "... built successfully" on
    every rank's start). Output written to the file descriptor directly (a compiler's) is not
    captured, so nothing else is hidden."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        sys.stdout.writelines(line for line in buf.getvalue().splitlines(keepends=True)
                              if not any(k in line for k in known))


class TrainMonitor:
    """Rank 0's progress bar / metric line and summary table (``enabled=False`` on other ranks)."""

    def __init__(self, total: int, start: int, samples_per_step: int, interval: float, device: torch.device,
                 enabled: bool = True) -> None:
        self.enabled, self.device, self.samples_per_step = enabled, device, samples_per_step
        self.progress = Progress(total, "train", unit="step", interval=interval, enabled=enabled, initial=start)
        self._step_s = self._wait_s = 0.0  # since the last log point
        self.best: dict[str, tuple[float, int]] = {}  # eval metric -> (best value, step)

    def timed(self, dt: float, t_data: float) -> None:
        """A step took ``dt`` seconds, ``t_data`` of them waiting for data."""
        self._step_s += dt
        self._wait_s += t_data

    def advance(self) -> None:
        """One step done (after its log point, if any): the bar moves, or a line is due."""
        self.progress.update(1, samples=float(self.samples_per_step))

    def logged(self, logs: dict[str, float], flops: float | None, peak: float | None, world: int) -> None:
        """New values at a log point: the loss, MFU, data-wait share and memory in the next line."""
        fields = {}
        loss = logs.get("loss/model")
        if loss is not None:
            fields["loss"] = f"{loss:.4g}"
        if flops and peak and self._step_s > 0:
            sps = self.progress.counters.get("samples", 0.0) / max(self._elapsed(), 1e-9)
            fields["mfu"] = f"{100 * mfu(sps, flops, peak, world):.1f}%"
        if self._step_s > 0:
            fields["data wait"] = f"{100 * self._wait_s / self._step_s:.0f}%"
        label, gib = memory_gib(self.device)
        fields[label] = f"{gib:.2f} GiB"
        self._step_s = self._wait_s = 0.0
        self.progress.set_fields(**fields)

    def evaluated(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            higher = any(h in k.lower() for h in _HIGHER_IS_BETTER)
            old = self.best.get(k)
            if old is None or (v > old[0] if higher else v < old[0]):
                self.best[k] = (v, step)

    def _elapsed(self) -> float:
        return time.monotonic() - self.progress.start

    def summary(self, steps: int, wall_s: float, nonfinite: int, export: str | None,
                registered: str | None) -> str:
        """The end-of-run table (logged by rank 0); returned for the caller."""
        samples = steps * self.samples_per_step
        rows = [("steps", f"{self.progress.n}/{self.progress.total} ({steps} in this run)"),
                ("wall time", _fmt_eta(wall_s)),
                ("mean samples/s", f"{samples / wall_s:,.1f}" if wall_s > 0 else "-"),
                ("skipped (non-finite) steps", str(nonfinite))]
        for k, (v, s) in sorted(self.best.items()):
            rows.append((f"best {k}", f"{v:.4g} (step {s})"))
        rows += [("export", export or "-"), ("registered", registered or "-")]
        width = max(len(k) for k, _ in rows)
        table = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
        text = f"training summary\n{table}"
        if self.enabled:
            self.progress.close()
            log.info("%s", text)
        return text

    def close(self) -> None:
        self.progress.close()


__all__ = ["TrainMonitor", "memory_gib", "quiet_known_noise"]
