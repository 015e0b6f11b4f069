"""What the step loop keeps on the device between log points, and the preemption poll.

``Pending`` holds one step's logs and non-finite flag as device tensors until the trainer's next
log point reads them all in one transfer; ``StopPoll`` lets all ranks agree on a SIGTERM without
the loop waiting for the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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


class StopPoll:
    """All ranks agree on a SIGTERM without stalling the device: the flags are all-reduced (MAX) at
    the end of step N and read at the end of step N+1 (one rank: the flag itself, no collective)."""

    def __init__(self, flag: Any, device: torch.device, world_size: int) -> None:
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


__all__ = ["Pending", "StopPoll"]
