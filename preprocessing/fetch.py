"""Polite concurrent HTTP(S) fetching of image URLs, in input order.

One ``Fetcher`` lives inside one shard task. Politeness, so a large job cannot look like a
denial-of-service attack on one site:

- at most ``per_host`` requests in flight per host (and ``threads`` in all) per task;
- a 429 or 503 answer pauses the *whole host* until its ``Retry-After`` (seconds or an HTTP
  date; exponential backoff when absent), capped at ``max_backoff``: a server that asks for
  a longer pause is given up on for this run (a transient skip ``--retry-transient`` redoes);
- other transient failures (timeouts, connection errors, 5xx) are retried ``retries`` times with
  exponential backoff and jitter; 4xx answers are final;
- a ``User-Agent`` that names the tool; a byte cap enforced while streaming (``Content-Length``
  is checked first but not trusted); a per-read ``timeout`` and a whole-response ``deadline``,
  so a server that trickles bytes cannot hold a thread forever.

Failures are values, not exceptions: ``FetchResult.reason`` is the counted skip reason
(``http_404``, ``http_503``, ``timeout``, ``connection_error``, ``too_large``, ...).
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import urllib3

T = TypeVar("T")

TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
TOO_LARGE = "too_large"
BAD_URL = "bad_url"


def is_transient(reason: str) -> bool:
    """Failures worth retrying later: timeouts, connection errors, 408/425/429 and 5xx answers."""
    if reason in (TIMEOUT, CONNECTION_ERROR, "read_error"):
        return True
    if reason.startswith("http_") and reason[5:].isdigit():
        code = int(reason[5:])
        return code >= 500 or code in (408, 425, 429)
    return False


@dataclass
class FetchConfig:
    """HTTP politeness and limits (per shard task)."""

    threads: int = 16            # requests in flight per task
    per_host: int = 4            # requests in flight per host per task
    timeout: float = 10.0        # seconds to connect, and between received bytes
    deadline: float = 60.0       # seconds for one whole response
    retries: int = 2             # extra attempts after a transient failure
    backoff: float = 1.0         # first retry delay in seconds; doubles per attempt, with jitter
    max_backoff: float = 60.0    # longest pause honoured (Retry-After or backoff)
    max_bytes: int = 25_000_000  # larger bodies are skipped as too_large
    user_agent: str = "latentpipe/0.1 (image-caption dataset sharding; polite: per-host limits)"

    def __post_init__(self) -> None:
        if self.threads < 1 or self.per_host < 1:
            raise ValueError("threads and per_host must be >= 1")
        if self.timeout <= 0 or self.deadline <= 0:
            raise ValueError("timeout and deadline must be > 0")
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("retries, backoff and max_backoff must be >= 0")


@dataclass(frozen=True)
class FetchResult:
    data: bytes | None           # the body, when the fetch succeeded
    reason: str | None = None    # skip reason when it did not
    detail: str = ""
    attempts: int = 1


def _classify(e: BaseException | None) -> str:
    # NewConnectionError subclasses ConnectTimeoutError in urllib3, but a refused connection is not a timeout.
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        return CONNECTION_ERROR
    if isinstance(e, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return TIMEOUT
    return CONNECTION_ERROR


class _Host:
    """Per-host state: an in-flight cap and a 'not before' time set by 429/503 answers."""

    def __init__(self, per_host: int) -> None:
        self.slots = threading.BoundedSemaphore(per_host)
        self.lock = threading.Lock()
        self.not_before = 0.0  # time.monotonic()

    def pause(self, seconds: float) -> None:
        with self.lock:
            self.not_before = max(self.not_before, time.monotonic() + seconds)

    def wait(self) -> None:
        while True:
            with self.lock:
                delay = self.not_before - time.monotonic()
            if delay <= 0:
                return
            time.sleep(min(delay, 0.5))


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Fetcher:
    """Thread-pooled, per-host-limited URL fetcher; use as a context manager."""

    def __init__(self, cfg: FetchConfig) -> None:
        self.cfg = cfg
        self._http = urllib3.PoolManager(
            num_pools=64, maxsize=cfg.per_host, block=False,
            headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5"},
            retries=urllib3.Retry(total=None, connect=0, read=0, other=0, status=0, redirect=5,
                                  raise_on_redirect=False, raise_on_status=False),
            timeout=urllib3.Timeout(connect=cfg.timeout, read=cfg.timeout),
        )
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="fetch")

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.clear()

    def _host(self, netloc: str) -> _Host:
        with self._lock:
            if netloc not in self._hosts:
                self._hosts[netloc] = _Host(self.cfg.per_host)
            return self._hosts[netloc]

    def _backoff(self, attempt: int) -> float:
        base = self.cfg.backoff * (2 ** attempt)
        return float(min(self.cfg.max_backoff, base * (1.0 + 0.25 * random.random())))

    def _once(self, url: str) -> tuple[bytes | None, str | None, str, float | None]:
        """One GET: (body, reason, detail, pause-host-seconds or None)."""
        t0 = time.monotonic()
        try:
            resp = self._http.request("GET", url, preload_content=False)
        except urllib3.exceptions.MaxRetryError as e:  # too many redirects, or a wrapped failure
            return None, _classify(e.reason), str(e.reason), None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            return None, _classify(e), f"{type(e).__name__}: {e}", None
        complete = False
        try:
            if resp.status != 200:
                pause = None
                if resp.status in (429, 503):
                    pause = retry_after_seconds(resp.headers.get("Retry-After"))
                    pause = -1.0 if pause is None else pause  # -1: no header, use backoff
                return None, f"http_{resp.status}", "", pause
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > self.cfg.max_bytes:
                return None, TOO_LARGE, f"Content-Length {length}", None
            chunks, total = [], 0
            while chunk := resp.read1(64 * 1024):  # returns as soon as any bytes arrive
                total += len(chunk)
                if total > self.cfg.max_bytes:
                    return None, TOO_LARGE, f"> {self.cfg.max_bytes} bytes", None
                if time.monotonic() - t0 > self.cfg.deadline:
                    return None, TIMEOUT, f"response took > {self.cfg.deadline}s", None
                chunks.append(chunk)
            complete = True
            return b"".join(chunks), None, "", None
        except (urllib3.exceptions.HTTPError, OSError) as e:  # reset mid-body, bad chunking, ...
            return None, _classify(e), f"{type(e).__name__}: {e}", None
        finally:
            if not complete:  # unread bytes must not reach the next request on this connection
                resp.close()
            resp.release_conn()

    def fetch(self, url: str) -> FetchResult:
        """GET ``url`` with retries, per-host limits and Retry-After; never raises for bad URLs."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return FetchResult(None, BAD_URL, url[:200])
        host = self._host(parts.netloc.lower())
        reason, detail = CONNECTION_ERROR, ""
        for attempt in range(self.cfg.retries + 1):
            host.wait()
            with host.slots:
                host.wait()
                data, reason_, detail, pause = self._once(url)
            if reason_ is None:
                return FetchResult(data, None, "", attempt + 1)
            reason = reason_
            if not is_transient(reason) or attempt == self.cfg.retries:
                break
            if pause is not None:  # 429/503: pause the whole host
                wait = self._backoff(attempt) if pause < 0 else pause
                if wait > self.cfg.max_backoff:
                    detail = f"Retry-After {wait:.0f}s > max_backoff {self.cfg.max_backoff:.0f}s"
                    break
                host.pause(wait)
            else:
                time.sleep(self._backoff(attempt))
        return FetchResult(None, reason, detail, attempt + 1)

    def map_ordered(self, items: Iterable[T], url_of: Callable[[T], str | None]
                    ) -> Iterator[tuple[T, FetchResult | None]]:
        """Fetch ``url_of(item)`` for every item concurrently; yield ``(item, result)`` in input order.

        Items without a URL pass through with ``None``. At most ``2 * threads`` items are
        buffered, so memory stays bounded whatever the shard size.
        """
        window: deque[tuple[T, Future[FetchResult] | None]] = deque()
        limit = 2 * self.cfg.threads
        for item in items:
            url = url_of(item)
            window.append((item, self._pool.submit(self.fetch, url) if url else None))
            while len(window) > limit or (window and (window[0][1] is None or window[0][1].done())):
                head, fut = window.popleft()
                yield head, (fut.result() if fut is not None else None)
        while window:
            head, fut = window.popleft()
            yield head, (fut.result() if fut is not None else None)


__all__ = ["FetchConfig", "FetchResult", "Fetcher", "is_transient", "retry_after_seconds"]
