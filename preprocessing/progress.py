"""Progress reporting for long work: a tqdm bar on a terminal, periodic log lines elsewhere.

Ray job drivers, CI logs and ``nohup`` runs have no terminal; there a bar would either be
silent or spam carriage returns, so the same counter is written as a log line every
``interval`` seconds with the rate and an ETA.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

log = logging.getLogger("latentpipe.progress")


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """A counter of ``total`` units with rate and ETA; ``extra`` rates (e.g. samples/s) optional."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval: float = 10.0,
                 enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.counters: dict[str, float] = {}
        self.start = self._last_log = time.monotonic()
        self._bar: Any = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **counters: float) -> None:
        """Advance by ``n`` units; ``counters`` are running totals shown as rates (e.g. samples=...)."""
        self.n += n
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0.0) + v
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if self.counters:
                self._bar.set_postfix_str(self._rates(), refresh=False)
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval or (self.total is not None and self.n >= self.total):
            self._last_log = now
            log.info("%s", self.line())

    def _rates(self) -> str:
        dt = max(time.monotonic() - self.start, 1e-9)
        return ", ".join(f"{v / dt:,.1f} {k}/s" for k, v in self.counters.items())

    def line(self) -> str:
        dt = max(time.monotonic() - self.start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {done} {self.unit}", f"{self.n / dt:,.2f} {self.unit}/s"]
        if self.counters:
            parts.append(self._rates())
        if self.total is not None and self.n:
            parts.append(f"ETA {_fmt_eta((self.total - self.n) * dt / self.n)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
