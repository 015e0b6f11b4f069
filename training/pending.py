"""What the step loop keeps on the device between log points, and the preemption poll.

``Pending`` holds one step's logs and non-finite flag as device tensors until the trainer's next
log point reads them all in one transfer; ``SigtermFlag`` notes a SIGTERM (preemption) and
``StopPoll`` lets all ranks agree on it without the loop waiting for the device.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("latentpipe.train")


@dataclass
class Pending:
    """One step's results, still on the device until the next log point."""

    step: int
    logs: dict[str, Any]  # 0-dim tensors or floats
    bad: torch.Tensor
    dt: float
    t_data: float

    def tensors(self) -> list[torch.Tensor]:
        return [self.bad, *(v for v in self.logs.values() if isinstance(v, torch.Tensor))]

    def read(self, values: Iterator[float]) -> tuple[dict[str, float], bool]:
        """The host values, taken from ``values`` in ``tensors()`` order."""
        bad = next(values) > 0
        logs = {k: next(values) if isinstance(v, torch.Tensor) else float(v) for k, v in self.logs.items()}
        if bad:  # a skipped step has no gradient norm
            logs = {k: v for k, v in logs.items() if not k.startswith("grad_norm/")}
        return logs, bad


class SigtermFlag:
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


class StopPoll:
    """All ranks agree on a SIGTERM without stalling the device: the flags are all-reduced (MAX) at
    the end of step N and read at the end of step N+1 (one rank: the flag itself, no collective)."""

    def __init__(self, flag: SigtermFlag, device: torch.device, world_size: int) -> None:
        self.flag, self.device, self.world_size = flag, device, world_size
        self._prev: tuple[torch.Tensor, Any] | None = None

    def check(self) -> bool:
        if self.world_size == 1:
            return self.flag.set
        prev = self._prev
        t = torch.tensor([1.0 if self.flag.set else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        event = None
        if t.is_cuda:
            t = t.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._prev = (t, event)
        if prev is None:
            return False
        if prev[1] is not None:
            prev[1].synchronize()
        return bool(prev[0][0] > 0)


__all__ = ["Pending", "SigtermFlag", "StopPoll"]
