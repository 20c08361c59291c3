"""A real local HTTP server that serves images with latency and faults, for tests and the dry run.

It binds loopback only (``127.0.0.1`` by default; any non-loopback host is refused), on one
address or, with ``hosts=K``, on K consecutive ones (``127.0.0.1`` ... ``127.0.0.K``: Linux routes
all of 127.0.0.0/8 to ``lo``) on one port, the same app on each, so a client sees K hosts (a crawl
spreads over many domains, and crawlers cap open requests per host). Every route a crawler must
survive is here: HTTP errors, flaky and rate-limited hosts, slow bodies,
``X-Robots-Tag`` opt-outs, HTML posing as JPEG, oversized and chunked bodies, redirect chains and
a redirect to any URL (to check that the client refuses it; the server never fetches it).

``GET /web/NAME?ANY`` is a realistic web for download benchmarks (docs: shared BENCHMARKS.md, "What a
realistic web looks like"): NAME is a file of the served directory, and each URL's fate is drawn
from ``(web_seed, path+query)`` by blake2b, so every server with the same seed, and so every tool
run against it, faces the same web. Shares (``WEB_FATES``; ~8% of URLs fail on the first attempt,
about half of those are fixed by a retry):

==============  =====  ==========================================================  ============
fate            share  what the server does                                         retry fixes
==============  =====  ==========================================================  ============
ok              89.0%  the image (200)                                              -
redirect         3.0%  a 302 chain of 1-3 hops (``/web/hop/H/NAME?...``), then it   - (success)
not_found        2.5%  404 on every attempt                                         no
server_error     2.0%  500 on the first 1 or 2 attempts, then the image             yes
truncated        1.0%  first attempt: Content-Length of the whole file, half of     yes
                       the bytes, connection closed; then the image
rate_limited     0.7%  first attempt: 429 with ``Retry-After: 1``; then the image    yes
unavailable      0.5%  503 on every attempt (no Retry-After)                        no (retried)
html_as_jpeg     0.5%  an HTML page with ``Content-Type: image/jpeg`` (200)          no
optout           0.5%  the image with ``X-Robots-Tag: noai``: a crawler must drop   no
slow             0.3%  every attempt waits ``web_slow_s`` (12 s) before answering:  no (retried)
                       past both tools' 10 s timeout
==============  =====  ==========================================================  ============

Every other response first waits an exponential latency (mean ``web_latency_ms``, 60 ms by
default, capped at ``web_latency_cap_s``, 2 s, so only the slow fate takes 10+ s), drawn from
``(web_seed, path+query, attempt)``; attempts are counted per path+query. ``latency_ms`` (fixed,
all routes) adds to it. ``GET /web-stats`` returns JSON: distinct URLs per fate and responses per
kind that the server saw (``SampleServer.web_stats()`` in process). The host is no part of a URL's
identity here: fate, latency, attempts and the hit counts depend on the path and query only, so a
URL's fate does not change with the host it is served from or the number of hosts. ``web_host``
spreads URL indexes over K hosts with Zipf shares (host k weighs 1/(k+1)^s; at K=64 and s=1 the top
host holds 21.1%), the skew of a real crawl where a few CDNs hold many images.

In-process (pytest fixtures, the dry run)::

    with SampleServer(root_dir="images", latency_ms=20, fault_rate=0.05) as srv:
        fetch(srv.url("/img/00001.jpg"))
    with SampleServer(root_dir="images", hosts=3) as srv:  # 127.0.0.1-3, one port
        fetch(srv.url("/img/00001.jpg", host=2))           # http://127.0.0.3:PORT/img/00001.jpg

As a subprocess::

    python -m jobs.samples.server --dir DIR --port 0 --latency-ms 50 --fault-rate 0.1 --seed 0 \
        [--hosts 1] [--web-latency-ms 60 --web-seed 0 --web-slow-s 12]

prints ``LISTENING http://127.0.0.1:PORT`` as its first stdout line, then serves until killed; with
``--hosts K`` (K > 1) the line goes on with `` HOSTS K`` and the K base URLs, space-separated
(``parse_listening_line`` reads either form; the second field is the first host's base URL in both).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import errno
import functools
import hashlib
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import signal
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass

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
MAX_HOSTS = 1024  # listening sockets of one server (127.0.0.0/8 has room for far more; fds do not)
PORT_ATTEMPTS = 20  # with port 0: new ports tried when one is taken on a later address

HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Not an image</title></head>\n"
    b"<body><h1>Hello</h1><p>This page is HTML, not an image.</p>"
    b"<img src=\"/img/00001.jpg\" alt=\"a picture\"></body></html>\n"
)


# The realistic web (/web/NAME): (fate, share of URLs), in the order their intervals of [0, 1) are laid
# out; "ok" takes what is left. See the module docstring for what each fate does.
WEB_FATES: tuple[tuple[str, float], ...] = (
    ("redirect", 0.030),
    ("not_found", 0.025),
    ("server_error", 0.020),
    ("truncated", 0.010),
    ("rate_limited", 0.007),
    ("unavailable", 0.005),
    ("html_as_jpeg", 0.005),
    ("optout", 0.005),
    ("slow", 0.003),
)
WEB_OK_SHARE = 1.0 - sum(share for _, share in WEB_FATES)
WEB_FAIL_FIRST = ("not_found", "server_error", "truncated", "rate_limited", "unavailable", "html_as_jpeg",
                  "optout", "slow")  # fail on the first attempt
WEB_RETRY_FIXES = ("server_error", "truncated", "rate_limited")  # a retry then gets the image
WEB_NEVER_OK = ("not_found", "unavailable", "html_as_jpeg", "optout", "slow")  # no tool can keep these


@dataclass(frozen=True)
class WebFate:
    """What the realistic web does with one URL: ``kind`` (a ``WEB_FATES`` name or "ok"), how many
    first attempts fail (server_error: 1 or 2), and how many redirect hops (redirect: 1-3)."""

    kind: str
    fail_attempts: int = 0
    hops: int = 0


def _uniform(*parts: object) -> tuple[float, int]:
    """A uniform number in [0, 1) and a spare 32-bit integer, from blake2b of the parts (stable
    across processes and runs, unlike ``hash()``)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode("utf-8", "surrogateescape"),
                             digest_size=12).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64, int.from_bytes(digest[8:], "big")


def web_fate(seed: int, path_qs: str) -> WebFate:
    """The fate of one URL of the realistic web, from the seed and the URL's path and query."""
    u, spare = _uniform("fate", seed, path_qs)
    edge = 0.0
    for kind, share in WEB_FATES:
        edge += share
        if u < edge:
            if kind == "server_error":
                return WebFate(kind, fail_attempts=1 + spare % 2)
            if kind == "redirect":
                return WebFate(kind, hops=1 + spare % 3)
            return WebFate(kind, fail_attempts=1)
    return WebFate("ok")


def web_latency_s(seed: int, path_qs: str, attempt: int, mean_ms: float, cap_s: float) -> float:
    """Exponential latency (mean ``mean_ms``, capped at ``cap_s``) of one attempt at one URL."""
    if mean_ms <= 0:
        return 0.0
    u, _ = _uniform("latency", seed, path_qs, attempt)
    return min(cap_s, -mean_ms / 1000.0 * math.log1p(-u))


def web_host_weights(hosts: int, exponent: float = 1.0) -> list[float]:
    """Zipf shares of ``hosts`` hosts: host k (0-based) weighs 1/(k+1)^exponent, normalised to 1."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise ValueError(f"hosts must be in [1, {MAX_HOSTS}], got {hosts!r}")
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, got {exponent!r}")
    w = [1.0 / (k + 1) ** exponent for k in range(hosts)]
    total = sum(w)
    return [x / total for x in w]


def web_host(seed: int, index: int, hosts: int, exponent: float = 1.0) -> int:
    """The host (0-based) of URL number ``index`` of a list spread over ``hosts`` hosts with Zipf
    shares (``web_host_weights``), drawn by blake2b of (seed, index): the same for every list length,
    so a 10N list extends the N one."""
    if hosts == 1:
        return 0
    edges = _host_edges(hosts, float(exponent))
    u, _ = _uniform("host", seed, index)
    return min(bisect.bisect_right(edges, u), hosts - 1)


@functools.lru_cache(maxsize=16)
def _host_edges(hosts: int, exponent: float) -> tuple[float, ...]:
    """Cumulative ``web_host_weights``: the right edge of each host's interval of [0, 1)."""
    return tuple(itertools.accumulate(web_host_weights(hosts, exponent)))


def host_addresses(host: str, hosts: int) -> list[str]:
    """``hosts`` consecutive addresses from ``host`` (127.0.0.1, 127.0.0.2, ...), each loopback."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise ValueError(f"hosts must be in [1, {MAX_HOSTS}], got {hosts!r}")
    _check_loopback(host)
    if hosts == 1:
        return [host]
    try:
        first = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"hosts={hosts} needs an IP address to count from, got host={host!r}") from None
    out = []
    for k in range(hosts):
        try:
            address = str(first + k)
        except ipaddress.AddressValueError:  # past the end of the address space
            raise ValueError(f"SampleServer binds loopback only: {host!r} + {k} is no address") from None
        _check_loopback(address)
        out.append(address)
    return out


def parse_listening_line(line: str) -> list[str]:
    """The base URLs of a ``LISTENING URL [HOSTS K URL1 ... URLK]`` line (the subprocess's first)."""
    parts = line.split()
    if len(parts) < 2 or parts[0] != "LISTENING":
        raise ValueError(f"not a LISTENING line: {line!r}")
    if len(parts) == 2:
        return [parts[1]]
    if (parts[2] != "HOSTS" or len(parts) < 5 or not parts[3].isdigit() or int(parts[3]) < 1
            or len(parts) != 4 + int(parts[3])):
        raise ValueError(f"malformed LISTENING line: {line!r}")
    urls = parts[4:]
    if urls[0] != parts[1]:
        raise ValueError(f"LISTENING line: first base URL {parts[1]!r} is not the first host's {urls[0]!r}")
    return urls


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
                 latency_ms: float = 0.0, fault_rate: float = 0.0, seed: int = 0,
                 web_latency_ms: float = 60.0, web_seed: int = 0, web_latency_cap_s: float = 2.0,
                 web_slow_s: float = 12.0, hosts: int = 1):
        self.addresses = host_addresses(host, int(hosts))  # checks every one is loopback
        if latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {latency_ms!r}")
        if web_latency_ms < 0:
            raise ValueError(f"web_latency_ms must be >= 0, got {web_latency_ms!r}")
        if web_latency_cap_s <= 0:
            raise ValueError(f"web_latency_cap_s must be > 0, got {web_latency_cap_s!r}")
        if not 0 <= web_slow_s <= MAX_SLOW_SECONDS:
            raise ValueError(f"web_slow_s must be in [0, {MAX_SLOW_SECONDS}], got {web_slow_s!r}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate!r}")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {port!r}")
        self.root_dir = os.path.abspath(root_dir) if root_dir else None
        self.host = host  # the first address
        self.hosts = len(self.addresses)
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
        self.web_latency_ms = float(web_latency_ms)
        self.web_seed = int(web_seed)
        self.web_latency_cap_s = float(web_latency_cap_s)
        self.web_slow_s = float(web_slow_s)
        self._web_attempts: dict[str, int] = defaultdict(int)  # attempts per path+query of /web
        self._web_urls: dict[str, int] = defaultdict(int)  # distinct /web URLs seen, per fate
        self._web_responses: dict[str, int] = defaultdict(int)  # /web responses, per kind
        self._web_files: dict[str, tuple[bytes, str] | None] = {}  # name -> (bytes, type), read once
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

        self._thread = threading.Thread(target=run, name=f"SampleServer:{self.host}x{self.hosts}:{self.port}",
                                        daemon=True)
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
        try:
            self._bound_port = await self._bind()
        except BaseException:
            await self._runner.cleanup()
            raise

    async def _bind(self) -> int:
        """One site per address, all on one port. With port 0 the first site picks it; if a later
        address has it taken, every site is closed and another port is tried."""
        attempts = 1 if self.port else PORT_ATTEMPTS
        for attempt in range(attempts):
            port, sites = self.port, []
            try:
                for address in self.addresses:
                    site = web.TCPSite(self._runner, address, port)
                    sites.append(site)  # registered with the runner by start(), even if it fails
                    await site.start()
                    if port == 0:  # aiohttp exposes the bound port only through the asyncio server
                        port = site._server.sockets[0].getsockname()[1]
                return port
            except OSError as exc:
                for site in sites:
                    try:
                        await site.stop()
                    except RuntimeError:  # never registered
                        pass
                retry = (not self.port and len(sites) > 1 and exc.errno == errno.EADDRINUSE
                         and attempt + 1 < attempts)
                if not retry:
                    raise
                logger.info("SampleServer: port %d taken on %s, trying another", port, sites[-1].name)
        raise AssertionError("unreachable")

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
    def base_urls(self) -> list[str]:
        """``http://ADDRESS:PORT`` of every host, in address order (``hosts`` of them)."""
        if self._bound_port is None:
            raise RuntimeError("SampleServer not started")
        return [f"http://{f'[{a}]' if ':' in a else a}:{self._bound_port}" for a in self.addresses]

    @property
    def base_url(self) -> str:
        """The first host's base URL."""
        return self.base_urls[0]

    def url(self, path: str, host: int = 0) -> str:
        """``path`` on host number ``host`` (0-based: 0 is ``self.host``)."""
        if not 0 <= host < self.hosts:
            raise ValueError(f"host must be in [0, {self.hosts}), got {host!r}")
        return self.base_urls[host] + (path if path.startswith("/") else "/" + path)

    def reset_hits(self) -> None:
        with self._hits_lock:
            self.hits.clear()
            self.requests.clear()

    def web_stats(self) -> dict:
        """What the realistic web saw: distinct URLs per fate, responses per kind, attempts in all."""
        with self._hits_lock:
            return {"urls": dict(sorted(self._web_urls.items())),
                    "responses": dict(sorted(self._web_responses.items())),
                    "attempts": sum(self._web_attempts.values())}

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
        app.router.add_get("/web/{name}", self._web)
        app.router.add_get("/web/hop/{hop}/{name}", self._web)
        app.router.add_get("/web-stats", self._web_stats_route)
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


    # ------------------------------------------------------------------ the realistic web

    def _web_file(self, name: str) -> tuple[bytes, str] | None:
        if name not in self._web_files:
            path = self._file_path(name)
            if path is None:
                self._web_files[name] = None
            else:
                with open(path, "rb") as f:
                    ctype = CONTENT_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream")
                    self._web_files[name] = (f.read(), ctype)
        return self._web_files[name]

    async def _web(self, request: web.Request) -> web.StreamResponse:
        """One URL of the realistic web; see the module docstring's table."""
        key = request.path_qs
        hop_s = request.match_info.get("hop")
        # A hop of a redirect chain belongs to its origin URL (/web/NAME?...): same fate, no new one.
        origin = key if hop_s is None else "/web/" + key.split("/", 4)[4]
        fate = web_fate(self.web_seed, origin)
        with self._hits_lock:
            self._web_attempts[key] += 1
            attempt = self._web_attempts[key]
            if hop_s is None and attempt == 1:
                self._web_urls[fate.kind] += 1
        kind = self._web_kind(fate, attempt, hop_s)
        with self._hits_lock:
            self._web_responses[kind] += 1
        if kind == "slow":
            await asyncio.sleep(self.web_slow_s)  # handler_cancellation: a client that gives up ends it
        else:
            await asyncio.sleep(web_latency_s(self.web_seed, key, attempt, self.web_latency_ms,
                                              self.web_latency_cap_s))
        name = request.match_info["name"]
        if kind == "404":
            return web.Response(status=404, text="not found\n")
        if kind == "500":
            return web.Response(status=500, text="internal server error\n")
        if kind == "503":
            return web.Response(status=503, text="service unavailable\n")
        if kind == "429":
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down\n")
        if kind == "html_as_jpeg":
            return web.Response(body=HTML_PAGE, headers={"Content-Type": "image/jpeg"})
        if kind == "302":
            hop = 0 if hop_s is None else int(hop_s)
            query = key.partition("?")[2]
            raise web.HTTPFound(f"/web/hop/{hop + 1}/{name}" + (f"?{query}" if query else ""))
        found = self._web_file(name)
        if found is None:
            return web.Response(status=404, text=f"no such image: {name}\n")
        body, ctype = found
        if kind == "truncated":
            return await self._truncated(request, body, ctype)
        headers = {"Content-Type": ctype}
        if kind == "optout":
            headers["X-Robots-Tag"] = "noai"
        return web.Response(body=body, headers=headers)

    @staticmethod
    def _web_kind(fate: WebFate, attempt: int, hop_s: str | None) -> str:
        """The response one attempt gets: 200, 302, 404, 500, 503, 429, truncated, html_as_jpeg,
        optout or slow."""
        if hop_s is not None:
            try:
                hop = int(hop_s)
            except ValueError:
                return "404"
            return "302" if hop < fate.hops else ("200" if hop == fate.hops else "404")
        kind = fate.kind
        if kind == "redirect":
            return "302"
        if kind in ("server_error", "truncated", "rate_limited"):
            if attempt > fate.fail_attempts:
                return "200"
            return {"server_error": "500", "truncated": "truncated", "rate_limited": "429"}[kind]
        return {"ok": "200", "not_found": "404", "unavailable": "503"}.get(kind, kind)

    @staticmethod
    async def _truncated(request: web.Request, body: bytes, ctype: str) -> web.StreamResponse:
        """Content-Length of the whole body, half of it sent, then the connection closed."""
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        transport = request.transport
        if transport is not None:
            transport.close()  # flushes what was written, then closes: the client sees a short body
        return resp

    async def _web_stats_route(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=json.dumps(self.web_stats()), content_type="application/json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.samples.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="directory served under /img/")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (the first)")
    parser.add_argument("--hosts", type=int, default=1,
                        help="bind this many consecutive loopback addresses from --host, on one port")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--web-latency-ms", type=float, default=60.0,
                        help="mean of the exponential latency of /web/ responses")
    parser.add_argument("--web-latency-cap-s", type=float, default=2.0, help="cap on that latency")
    parser.add_argument("--web-seed", type=int, default=0, help="seed of the fates of /web/ URLs")
    parser.add_argument("--web-slow-s", type=float, default=12.0, help="how long a 'slow' /web/ URL waits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    server = SampleServer(root_dir=args.dir, host=args.host, port=args.port,
                          latency_ms=args.latency_ms, fault_rate=args.fault_rate, seed=args.seed,
                          web_latency_ms=args.web_latency_ms, web_seed=args.web_seed,
                          web_latency_cap_s=args.web_latency_cap_s, web_slow_s=args.web_slow_s,
                          hosts=args.hosts)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    server.start()
    line = f"LISTENING {server.base_url}"  # the contract with the parent process: parse_listening_line
    if server.hosts > 1:
        line += f" HOSTS {server.hosts} " + " ".join(server.base_urls)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    try:
        while not stopped.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
