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
    """A counter of ``total`` units with rate and ETA; ``extra`` rates (e.g. samples/s) optional.

    ``initial`` units were done before (a resumed run): they count towards ``n``, not the rate.
    ``fields`` (set with ``set_fields``) are shown as ``name value`` after the rates.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval: float = 10.0,
                 enabled: bool = True, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = self.initial = initial
        self.counters: dict[str, float] = {}
        self.fields: dict[str, str] = {}
        self.start = self._last_log = time.monotonic()
        self._bar: Any = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True, initial=initial)

    def update(self, n: int = 1, **counters: float) -> None:
        """Advance by ``n`` units; ``counters`` are running totals shown as rates (e.g. samples=...)."""
        self.n += n
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0.0) + v
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if self.counters or self.fields:
                self._bar.set_postfix_str(", ".join(filter(None, [self._rates(), self._fields()])), refresh=False)
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval or (self.total is not None and self.n >= self.total):
            self._last_log = now
            log.info("%s", self.line())

    def set_fields(self, **fields: str) -> None:
        """Values shown with the next line or bar refresh (e.g. loss="0.123")."""
        self.fields.update(fields)

    def _fields(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.fields.items())

    def _rates(self) -> str:
        dt = max(time.monotonic() - self.start, 1e-9)
        return ", ".join(f"{v / dt:,.1f} {k}/s" for k, v in self.counters.items())

    def line(self) -> str:
        dt = max(time.monotonic() - self.start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        done_here = self.n - self.initial
        parts = [f"{self.desc}: {done} {self.unit}", f"{done_here / dt:,.2f} {self.unit}/s"]
        if self.counters:
            parts.append(self._rates())
        if self.fields:
            parts.append(self._fields())
        if self.total is not None and done_here:
            parts.append(f"ETA {_fmt_eta((self.total - self.n) * dt / done_here)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
