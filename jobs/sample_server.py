"""A real local HTTP server that serves images with latency and faults, for tests and the dry run.

It binds loopback only (``127.0.0.1`` by default; any non-loopback host is refused) and every
route a crawler must survive is here: HTTP errors, flaky and rate-limited hosts, slow bodies,
``X-Robots-Tag`` opt-outs, HTML posing as JPEG, oversized and chunked bodies, redirect chains and
a redirect to any URL (to check that the client refuses it; the server never fetches it).

In-process (pytest fixtures, the dry run)::

    with SampleServer(root_dir="images", latency_ms=20, fault_rate=0.05) as srv:
        fetch(srv.url("/img/00001.jpg"))

As a subprocess::

    python -m jobs.sample_server --dir DIR --port 0 --latency-ms 50 --fault-rate 0.1 --seed 0

prints ``LISTENING http://127.0.0.1:PORT`` as its first stdout line, then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import random
import signal
import sys
import threading
from collections import defaultdict

from aiohttp import web

logger = logging.getLogger(__name__)

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bin": "application/octet-stream",
}
JPEG_MAGIC = b"\xff\xd8\xff\xe0"
CHUNK = 64 * 1024
MAX_SYNTHETIC_BYTES = 1 << 30  # /big and /bigchunked refuse more than 1 GiB
MAX_SLOW_SECONDS = 600.0

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Not an image</title></head>\n"
    b"<body><h1>Hello</h1><p>This page is HTML, not an image.</p>"
    b"<img src=\"/img/00001.jpg\" alt=\"a picture\"></body></html>\n"
)


def _check_loopback(host: str) -> None:
    """Refuses any bind address that is not loopback: the sample server must never be reachable."""
    if host == "localhost":
        return
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"SampleServer binds loopback only, got host={host!r}")


class SampleServer:
    """aiohttp server on its own event loop in a daemon thread; see the module docstring."""

    def __init__(self, root_dir: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 latency_ms: float = 0.0, fault_rate: float = 0.0, seed: int = 0):
        _check_loopback(host)
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms!r}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate!r}")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port!r}")
        self.root_dir = os.path.abspath(root_dir) if root_dir else None
        self.host = host
        self.port = int(port)
        self.latency_ms = float(latency_ms)
        self.fault_rate = float(fault_rate)
        self.seed = seed
        self.hits: dict[str, int] = defaultdict(int)  # request count per path (query excluded)
        self.requests: dict[str, int] = defaultdict(int)  # request count per path with its query
        self._hits_lock = threading.Lock()
        self._rng = random.Random(seed)
        self._flaky: dict[str, int] = defaultdict(int)
        self._ratelimited: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "SampleServer":
        """Starts the loop thread, binds, and returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("SampleServer already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # surfaced to start()'s caller below
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"SampleServer:{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    async def _serve(self) -> None:
        # handler_cancellation: a client that gives up (timeout) cancels its /slow handler, so
        # stop() is not held up by sleeping handlers; shutdown_timeout bounds it anyway.
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True,
                                     shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only through the asyncio server
        self._bound_port = server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Closes the listener and open connections, then ends the loop thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None and loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop)
            try:
                fut.result(timeout=10)
            except Exception:  # noqa: BLE001 - shutting down regardless
                logger.warning("SampleServer cleanup failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None
        self._runner = None

    def __enter__(self) -> "SampleServer":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._bound_port is None:
            raise RuntimeError("SampleServer not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._bound_port}"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def reset_hits(self) -> None:
        with self._hits_lock:
            self.hits.clear()
            self.requests.clear()

    # ------------------------------------------------------------------ app

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_and_delay])
        app.router.add_get("/img/{name}", self._img)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/flaky/{key}/{n}/{name}", self._flaky_route)
        app.router.add_get("/ratelimit/{key}/{name}", self._ratelimit)
        app.router.add_get("/slow/{seconds}/{name}", self._slow)
        app.router.add_get("/optout/{directive}/{name}", self._optout)
        app.router.add_get("/html", self._html)
        app.router.add_get("/fakejpeg", self._fakejpeg)
        app.router.add_get("/redirect/{n}/{name}", self._redirect)
        app.router.add_get("/redirect-to", self._redirect_to)
        app.router.add_get("/big/{nbytes}", self._big)
        app.router.add_get("/bigchunked/{nbytes}", self._bigchunked)
        app.router.add_get("/empty", self._empty)
        return app

    @web.middleware
    async def _count_and_delay(self, request: web.Request, handler):
        with self._hits_lock:
            self.hits[request.path] += 1
            self.requests[request.path_qs] += 1
        if self.latency_ms > 0:
            await asyncio.sleep(self.latency_ms / 1000.0)
        return await handler(request)

    def _file_path(self, name: str) -> str | None:
        if not self.root_dir:
            return None
        path = os.path.realpath(os.path.join(self.root_dir, name))
        if os.path.dirname(path) != os.path.realpath(self.root_dir) or not os.path.isfile(path):
            return None
        return path

    def _serve_file(self, name: str, headers: dict[str, str] | None = None) -> web.StreamResponse:
        path = self._file_path(name)
        if path is None:
            return web.Response(status=404, text=f"no such image: {name}\n")
        with open(path, "rb") as f:
            body = f.read()
        ctype = CONTENT_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream")
        # web.Response sets Content-Length from the body.
        return web.Response(body=body, headers={"Content-Type": ctype, **(headers or {})})

    async def _img(self, request: web.Request) -> web.StreamResponse:
        if self.fault_rate > 0 and self._rng.random() < self.fault_rate:
            if self._rng.random() < 0.5:
                return web.Response(status=500, text="injected fault\n")
            # Abort the connection without a response: the client sees a reset / disconnect.
            # The response returned below is never sent; aiohttp drops it quietly because the
            # transport is gone (raising here instead would log a traceback per fault).
            transport = request.transport
            if transport is not None:
                transport.abort()
            return web.Response(status=500, text="connection aborted\n")
        return self._serve_file(request.match_info["name"])

    async def _status(self, request: web.Request) -> web.StreamResponse:
        try:
            code = int(request.match_info["code"])
        except ValueError:
            return web.Response(status=400, text="status code must be an integer\n")
        if not 200 <= code <= 599:
            return web.Response(status=400, text="status code must be in 200..599\n")
        headers = {"Retry-After": "1"} if code in (429, 503) else {}
        if code in (204, 304):
            return web.Response(status=code, headers=headers)
        return web.Response(status=code, headers=headers, text=f"status {code}\n")

    async def _flaky_route(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        try:
            n = int(request.match_info["n"])
        except ValueError:
            return web.Response(status=400, text="n must be an integer\n")
        self._flaky[key] += 1  # single loop thread: no lock needed
        if self._flaky[key] <= n:
            return web.Response(status=503, headers={"Retry-After": "0"}, text="try again\n")
        return self._serve_file(request.match_info["name"])

    async def _ratelimit(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if key not in self._ratelimited:
            self._ratelimited.add(key)
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down\n")
        return self._serve_file(request.match_info["name"])

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        try:
            seconds = float(request.match_info["seconds"])
        except ValueError:
            return web.Response(status=400, text="seconds must be a number\n")
        if not 0 <= seconds <= MAX_SLOW_SECONDS:
            return web.Response(status=400, text=f"seconds must be in [0, {MAX_SLOW_SECONDS}]\n")
        await asyncio.sleep(seconds)
        return self._serve_file(request.match_info["name"])

    async def _optout(self, request: web.Request) -> web.StreamResponse:
        directive = request.match_info["directive"]  # already percent-decoded by aiohttp
        return self._serve_file(request.match_info["name"], headers={"X-Robots-Tag": directive})

    async def _html(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=HTML_PAGE, content_type="text/html", charset="utf-8")

    async def _fakejpeg(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=HTML_PAGE, headers={"Content-Type": "image/jpeg"})

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        try:
            n = int(request.match_info["n"])
        except ValueError:
            return web.Response(status=400, text="n must be an integer\n")
        name = request.match_info["name"]
        location = f"/redirect/{n - 1}/{name}" if n > 0 else f"/img/{name}"
        raise web.HTTPFound(location)

    async def _redirect_to(self, request: web.Request) -> web.StreamResponse:
        target = request.query.get("url")
        if target is None:
            return web.Response(status=400, text="missing ?url=\n")
        raise web.HTTPFound(target)  # any URL, on purpose: the client must refuse bad ones

    @staticmethod
    def _nbytes(request: web.Request) -> int | None:
        try:
            n = int(request.match_info["nbytes"])
        except ValueError:
            return None
        return n if 0 <= n <= MAX_SYNTHETIC_BYTES else None

    async def _big(self, request: web.Request) -> web.StreamResponse:
        n = self._nbytes(request)
        if n is None:
            return web.Response(status=400, text=f"nbytes must be in [0, {MAX_SYNTHETIC_BYTES}]\n")
        body = (JPEG_MAGIC + bytes(max(0, n - len(JPEG_MAGIC))))[:n]
        return web.Response(body=body, headers={"Content-Type": "image/jpeg"})

    async def _bigchunked(self, request: web.Request) -> web.StreamResponse:
        n = self._nbytes(request)
        if n is None:
            return web.Response(status=400, text=f"nbytes must be in [0, {MAX_SYNTHETIC_BYTES}]\n")
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        zeros = bytes(CHUNK)
        while sent < n:
            size = min(CHUNK, n - sent)
            chunk = (JPEG_MAGIC + zeros)[:size] if sent == 0 else zeros[:size]
            await resp.write(chunk)  # raises once the client hangs up (e.g. a size cap)
            sent += size
        await resp.write_eof()
        return resp

    async def _empty(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"", headers={"Content-Type": "image/jpeg"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="directory served under /img/")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    server = SampleServer(root_dir=args.dir, host=args.host, port=args.port,
                          latency_ms=args.latency_ms, fault_rate=args.fault_rate, seed=args.seed)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    server.start()
    sys.stdout.write(f"LISTENING {server.base_url}\n")  # the contract with the parent process
    sys.stdout.flush()
    try:
        while not stopped.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
