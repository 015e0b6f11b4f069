"""A real HTTP server on 127.0.0.1 serving good images and every kind of bad answer.

Routes (``NAME`` is any word; images are synthetic scenes, JPEG):
    /img/NAME.jpg        200, an image (each NAME a different scene)
    /slowok/NAME.jpg     200 after ``slow_ok`` seconds (for the per-host concurrency cap)
    /404/NAME            404            /500/NAME        500 (always)
    /html/NAME           200 text/html (not an image)
    /flaky503/NAME       503 + Retry-After: 1 the first time, then 200
    /flaky429/NAME       429 + Retry-After: 1 the first time, then 200
    /slow/NAME           headers only after ``slow`` seconds (longer than the client timeout)
    /trickle/NAME        200, a byte every 0.2 s for a long time (hits the client deadline)
    /big/NAME            Content-Length over any sane cap  /bignolen/NAME   unbounded chunked body
    /gate/NAME.jpg       blocks until ``gate`` is set, then 200 an image
    /toggle/NAME.jpg     503 (no Retry-After) while ``failing`` is true, else 200 an image
Every request is recorded with its user agent and time; in-flight counts are tracked.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from latentpipe.preprocessing.synthetic import encode_image, make_scene


def scene_jpeg(name: str, size: int = 48) -> bytes:
    index = sum(ord(c) * 31**i for i, c in enumerate(name)) % 100_000
    return encode_image(make_scene(7, index, size).image, "jpg")


@dataclass
class ServerState:
    slow: float = 3.0
    slow_ok: float = 0.3
    gate: threading.Event = field(default_factory=threading.Event)
    failing: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[tuple[str, float, str]] = field(default_factory=list)  # (path, time, user agent)
    inflight: int = 0
    max_inflight: int = 0
    seen: set[str] = field(default_factory=set)

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for p, _, _ in self.requests if p.startswith(prefix))

    def times(self, path: str) -> list[float]:
        with self.lock:
            return [t for p, t, _ in self.requests if p == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        st = self.server.state
        with st.lock:
            st.requests.append((self.path, time.monotonic(), self.headers.get("User-Agent", "")))
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
            first = self.path not in st.seen
            st.seen.add(self.path)
        try:
            self._route(st, first)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with st.lock:
                st.inflight -= 1

    def _route(self, st: ServerState, first: bool) -> None:
        parts = self.path.strip("/").split("/")
        kind, name = parts[0], parts[-1]
        if kind == "img":
            self._send(200, scene_jpeg(name))
        elif kind == "slowok":
            time.sleep(st.slow_ok)
            self._send(200, scene_jpeg(name))
        elif kind == "gate":
            st.gate.wait(timeout=120)
            self._send(200, scene_jpeg(name))
        elif kind == "toggle":
            if st.failing:
                self._send(503, b"down", "text/plain")
            else:
                self._send(200, scene_jpeg(name))
        elif kind in ("404", "500"):
            self._send(int(kind), b"no", "text/plain")
        elif kind == "html":
            self._send(200, b"<html><body>not an image</body></html>", "text/html")
        elif kind in ("flaky503", "flaky429"):
            if first:
                self._send(int(kind[5:]), b"busy", "text/plain", {"Retry-After": "1"})
            else:
                self._send(200, scene_jpeg(name))
        elif kind == "slow":
            time.sleep(st.slow)
            self._send(200, scene_jpeg(name))
        elif kind == "trickle":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(0.2)
        elif kind == "big":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10**10))
            self.end_headers()
        elif kind == "bignolen":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\xff" * 65536
            for _ in range(64):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(404, b"unknown route", "text/plain")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that give up (timeouts, size caps) reset connections: expected here


@contextmanager
def http_server(state: ServerState | None = None) -> Iterator[tuple[str, ServerState]]:
    """Serve on 127.0.0.1 (a free port) in a thread; yields (base URL, state)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = state or ServerState()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state
    finally:
        server.state.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
