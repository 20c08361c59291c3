"""HttpDownloader: asynchronous, polite, SSRF-guarded image download inside CPU actors.

Each actor runs one asyncio event loop in a background thread with one aiohttp session,
so many connections are open per actor and several Ray batches can be in flight at once
(the actor may be threaded). Conventions follow img2dataset (status per sample, error text),
with named drop reasons (STYLE.md habit 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import heapq
import ipaddress
import itertools
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Iterator
from urllib.parse import urljoin, urlsplit

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.base import DROPPED, FAILED, KEPT, Columns, DropReason, Operator, Resources, alive_mask, mark, set_columns
from operators.netguard import AddressPolicy, GuardedResolver, GuardedSocketFactory, is_ssrf_block, parse_ip, url_host

log = logging.getLogger(__name__)

REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
DEFAULT_ROBOTS_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
USER_AGENT_TOKEN = "imgcurate"


class DownloadConfig(BaseModel):
    """Download stage settings (``download:`` in the job config)."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(10.0, gt=0, description="total time for one attempt")
    connect_timeout_s: float = Field(5.0, gt=0, description="time to connect, per attempt")
    retries: int = Field(2, ge=0, le=10, description="extra attempts on 5xx, 429, connection errors (and timeouts "
                                                     "with retry_timeouts)")
    # A server that let the whole timeout pass seldom answers the next try in time, and every try
    # costs another timeout_s: at the end of a wave, one such URL holds it for (retries + 1) x timeout_s.
    retry_timeouts: bool = Field(False, description="retry attempts that timed out, too")
    backoff_base_s: float = Field(0.5, ge=0, description="first retry delay; doubles per retry, with jitter")
    backoff_max_s: float = Field(30.0, ge=0, description="cap on backoff and on honoured Retry-After")
    concurrency: int = Field(128, ge=1, description="open requests per actor")
    per_host_concurrency: int = Field(16, ge=1, description="open requests per host per actor")
    max_redirects: int = Field(5, ge=0, description="more fail as too_many_redirects")
    max_bytes: int = Field(20_000_000, gt=0, description="maximum body size")
    user_agent_contact: str = Field("https://github.com/imgcurate/imgcurate", description="URL or e-mail in the UA")
    respect_robots_headers: bool = Field(True, description="honour X-Robots-Tag opt-outs")
    robots_directives: list[str] = Field(default_factory=lambda: list(DEFAULT_ROBOTS_DIRECTIVES),
                                         description="X-Robots-Tag directives that opt an image out")
    allow_loopback: bool = Field(False, description="allow 127.0.0.0/8 and ::1 (dry run, tests)")
    allow_private: bool = Field(False, description="allow RFC 1918 / ULA addresses")
    allow_networks: list[str] = Field(default_factory=list, description="CIDRs allowed whatever their class")
    dns_cache_ttl_s: float = Field(300.0, ge=0, description="how long a resolved name is cached per actor")
    # Resources: I/O bound, so a fraction of a CPU each; overridable from config.
    num_cpus: float = Field(0.25, gt=0, description="CPUs for the event loop (the actor adds images.num_cpus)")
    batch_size: int | None = Field(None, ge=1, description="rows handed to one actor call; null: one input block (one sample shard of the plan)")
    yield_rows: int = Field(64, ge=1, description="finished rows passed downstream together")
    pool_min: int = Field(1, ge=1, description="download actors at least (a pool_min that does not fit is lowered "
                                                "with a warning)")
    pool_max: int | None = Field(None, ge=1, description="null: as many actors as the cluster fits beside the "
                                                        "other operators (jobs/sizing.py)")
    batches_in_flight: int = Field(4, ge=1, description="Ray batches one actor works on at once")

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v):
        for n in v:
            ipaddress.ip_network(n, strict=False)  # ValueError names the bad network
        return v

    def user_agent(self) -> str:
        from operators import __version__

        return f"{USER_AGENT_TOKEN}/{__version__} (+{self.user_agent_contact})"


@dataclass
class Fetched:
    """Outcome of one URL: bytes, or a named reason."""

    body: bytes | None = None
    status: str = KEPT
    reason: str | None = None
    message: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    final_url: str | None = None
    attempts: int = 0
    retry_after_s: float | None = None
    retryable: bool = False
    elapsed_ms: float | None = None


def sniff_image(head: bytes) -> str | None:
    """Image format from magic bytes, or None (HTML and other non-images)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "avif" if head[8:12].startswith(b"avi") else "heif"
    return None


def robots_forbids(header_values: list[str], directives: set[str], ua_token: str = USER_AGENT_TOKEN) -> str | None:
    """The first opt-out directive in ``X-Robots-Tag`` headers that applies to us, or None.

    A value may be scoped to one crawler (``googlebot: noindex``); scopes for other agents
    do not apply, unscoped values and ``*`` do.
    """
    for value in header_values:
        scope, _, rest = value.partition(":")
        if rest and " " not in scope.strip() and scope.strip().lower() not in directives:
            agent = scope.strip().lower()
            if agent not in ("*", ua_token.lower()):
                continue
            value = rest
        for token in value.split(","):
            token = token.strip().lower()
            if token in directives:
                return token
    return None


def parse_retry_after(value: str | None) -> float | None:
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


@functools.lru_cache(maxsize=65536)
def _literal_host(hostname: str):
    """(address, canonical spelling or None when already canonical) for an IP-literal host, else (None, None)."""
    literal = parse_ip(hostname)
    if literal is None:
        return None, None
    text = str(literal)
    if text == hostname.strip("[]"):
        return literal, None
    return literal, f"[{text}]" if literal.version == 6 else text


class OldestFirstSlots:
    """The download slots an actor's concurrent calls share, granted to the oldest call first.

    ``asyncio.Semaphore`` wakes waiters in arrival order, so calls running at once (Ray's
    ``batches_in_flight``) would share the slots round-robin and all finish late, together. Here a
    waiter's priority is its call's number: the oldest call downloads first and finishes first,
    so its rows reach the image stage, the writer and Ray Data's checkpoint while later calls are
    still downloading, and fewer partial blocks wait in the actor. Later calls take the slots the
    oldest leaves idle (a worker waiting for its caller, or backing off before a retry). Used from
    one event loop only.
    """

    def __init__(self, n: int):
        self._free = n
        self._waiters: list[tuple[int, int, asyncio.Future]] = []  # heap: (priority, arrival, future)
        self._arrivals = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self._free > 0:
            self._free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrivals), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, then cancelled before it ran: pass it on
                self.release()
            raise

    def waiting_before(self, priority: int) -> bool:
        """Whether an older call (a lower priority number) waits for a slot."""
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)  # cancelled while waiting
        return bool(self._waiters) and self._waiters[0][0] < priority

    def release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():  # skip waiters cancelled meanwhile
                fut.set_result(None)
                return
        self._free += 1


class _Lease:
    """One worker's hold on a slot of :class:`OldestFirstSlots`, kept from one row to the next."""

    def __init__(self, slots: OldestFirstSlots, priority: int):
        self.slots, self.priority, self.held = slots, priority, False

    async def take(self) -> None:
        if not self.held:
            await self.slots.acquire(self.priority)
            self.held = True

    def drop(self) -> None:
        if self.held:
            self.held = False
            self.slots.release()


class OpenRequests:
    """Time-weighted count of an actor's open requests while it has work (a call in progress).

    Changed on the event loop; read by the calling threads, which put the request-seconds and
    busy seconds since the previous read on the first row of each chunk they emit
    (``download_open_request_s``, ``download_active_s``): summed over a wave, their ratio is the
    mean number of open requests per actor, against ``download.concurrency``.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._open = self._calls = 0
        self._last = time.monotonic()
        self._area = self._active = 0.0

    def _advance(self, now: float) -> None:
        if self._calls:
            self._area += self._open * (now - self._last)
            self._active += now - self._last
        self._last = now

    def change(self, open_delta: int = 0, calls_delta: int = 0) -> None:
        with self._lock:
            self._advance(time.monotonic())
            self._open += open_delta
            self._calls += calls_delta

    def take(self) -> tuple[float, float]:
        """(request-seconds, busy seconds) since the previous take."""
        with self._lock:
            self._advance(time.monotonic())
            out = (self._area, self._active)
            self._area = self._active = 0.0
            return out


class HttpDownloader(Operator):
    """Downloads ``url`` into ``image_bytes``; failures get a named reason."""

    name: ClassVar[str] = "download"
    reads = ("sample_id", "url", "status")
    writes = ("image_bytes", "http_status", "content_type", "final_url", "download_attempts", "download_ms",
              "download_open_request_s", "download_active_s")
    reasons = (
        DropReason("http_{code}", FAILED, "the server answered with this HTTP status (after retries for 5xx and 429)"),
        DropReason("timeout", FAILED, "no answer within download.timeout_s (retried only with download.retry_timeouts)"),
        DropReason("dns_error", FAILED, "the host name does not resolve"),
        DropReason("connection_error", FAILED, "the connection failed or was reset (after retries)"),
        DropReason("tls_error", FAILED, "the TLS handshake failed"),
        DropReason("http_error", FAILED, "a malformed HTTP response or a truncated body (after retries)"),
        DropReason("invalid_url", FAILED, "a URL aiohttp cannot request"),
        DropReason("ssrf_blocked", DROPPED, "the URL, or a redirect, leads to a private, loopback, link-local, "
                                            "metadata or reserved address the config does not allow"),
        DropReason("robots_{directive}", DROPPED, "an X-Robots-Tag opt-out (noai, noimageai, noindex, noimageindex)"),
        DropReason("too_large", DROPPED, "the body is over download.max_bytes"),
        DropReason("empty_body", FAILED, "the server sent no bytes"),
        DropReason("not_image", DROPPED, "the bytes are not an image (HTML, text, ...), whatever the Content-Type"),
        DropReason("too_many_redirects", FAILED, "more than download.max_redirects redirects"),
        DropReason("bad_redirect", FAILED, "a redirect without a usable Location"),
        DropReason("internal_error", FAILED, "a bug in the downloader; the message has the exception"),
    )
    types = {"image_bytes": pa.binary(), "http_status": pa.int16(), "content_type": pa.string(),
             "final_url": pa.string(), "download_attempts": pa.int8(), "download_ms": pa.float32(),
             "download_open_request_s": pa.float64(), "download_active_s": pa.float64()}

    @classmethod
    def columns(cls, config=None) -> Columns:
        return Columns(cls.reads, dict(cls.types))

    def __init__(self, config: DownloadConfig | dict | None = None, then: Operator | None = None,
                 then_threads: int | None = None):
        """``then``: an operator run on each finished chunk inside this actor (the job passes the
        ImageProcessor), so raw downloads never cross the object store and the image work runs on
        the calling threads (OpenCV releases the GIL) while the event loop keeps downloading.
        ``then_threads``: at most this many chunks in ``then`` at once (the CPUs the actor holds for it)."""
        self.config = config if isinstance(config, DownloadConfig) else DownloadConfig(**(config or {}))
        if then is not None and not callable(then):
            raise ValueError(f"then must be an operator (a callable on a pyarrow.Table), got {then!r}")
        if then_threads is not None and then_threads < 1:
            raise ValueError(f"then_threads must be >= 1, got {then_threads}")
        self.then = then
        self._then_slots = threading.BoundedSemaphore(then_threads) if then_threads else None
        c = self.config
        self.policy = AddressPolicy.build(c.allow_loopback, c.allow_private, c.allow_networks)
        self.directives = {d.lower() for d in self.config.robots_directives}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session = None
        self._lock = threading.Lock()
        self.open_requests = OpenRequests()

    @classmethod
    def resources(cls, config: DownloadConfig) -> Resources:
        return Resources(num_cpus=config.num_cpus, batch_size=config.batch_size,
                         pool=(config.pool_min, config.pool_max))

    # -- lifecycle -------------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="imgcurate-download", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
                asyncio.run_coroutine_threadsafe(self._open(), loop).result()
        return self._loop

    async def _open(self) -> None:
        import aiohttp

        class _Resolver(aiohttp.abc.AbstractResolver):
            def __init__(self, inner: GuardedResolver):
                self.inner = inner

            async def resolve(self, host, port=0, family=0):
                return await self.inner.resolve(host, port, family)

            async def close(self):
                await self.inner.close()

        c = self.config
        self._resolver = GuardedResolver(self.policy, ttl_s=c.dns_cache_ttl_s)
        # The socket factory is the guard that cannot be bypassed: it sees the address of every
        # connection (literal, resolved, any redirect hop) before the socket exists.
        connector = aiohttp.TCPConnector(
            limit=c.concurrency, limit_per_host=c.per_host_concurrency, resolver=_Resolver(self._resolver),
            use_dns_cache=False, ssl=True, enable_cleanup_closed=True,
            socket_factory=GuardedSocketFactory(self.policy),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": c.user_agent(), "Accept": "image/*,*/*;q=0.5"},
            timeout=aiohttp.ClientTimeout(total=c.timeout_s, sock_connect=c.connect_timeout_s),
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._slots = OldestFirstSlots(c.concurrency)
        self._calls = itertools.count()  # call numbers: the oldest call downloads first

    def close(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- batch -----------------------------------------------------------------------
    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """Yield the batch's rows in chunks as their downloads finish (a sliding window).

        No batch barrier: one slow URL holds back only its own chunk, and finished
        images flow downstream while the rest of the batch is still downloading.
        """
        self.check_input(batch)
        alive = alive_mask(batch)
        dead = [i for i, a in enumerate(alive) if not a]
        if dead:
            yield self._finish(batch, dead, {})
        todo = [i for i, a in enumerate(alive) if a]
        if not todo:
            return
        chunk: dict[int, Fetched] = {}
        for i, r in self._stream(batch, todo):
            chunk[i] = r
            if len(chunk) >= self.config.yield_rows:
                yield self._finish(batch, list(chunk), chunk)
                chunk = {}
        if chunk:
            yield self._finish(batch, list(chunk), chunk)

    def process(self, batch: pa.Table) -> pa.Table:
        """All rows at once, in input order (direct use and tests)."""
        todo = [i for i, a in enumerate(alive_mask(batch)) if a]
        results = dict(self._stream(batch, todo)) if todo else {}
        return self._finish(batch, list(range(batch.num_rows)), results)

    def _finish(self, batch: pa.Table, idx: list[int], results: dict[int, Fetched]) -> pa.Table:
        """Rows ``idx`` of ``batch`` with their results, through ``then`` when there is one. A ``then``
        with ``process_raw`` (the ImageProcessor) takes the bodies as a list: they are not copied into
        an Arrow column only to be copied out again, and only its output crosses the object store."""
        raw = getattr(self.then, "process_raw", None)
        chunk, bodies = self._assemble(batch, idx, results, bodies_column=raw is None)
        self.check_output(chunk, exempt=() if raw is None else ("image_bytes",))
        if self.then is None:
            return chunk
        with self._then_slots or contextlib.nullcontext():
            if raw is None:
                return self.then(chunk)
            out = raw(chunk, bodies)
            self.then.check_output(out, chunk)
            return out

    def window(self) -> int:
        """Rows of one call downloading or downloaded but not yet taken by the caller."""
        return self.config.concurrency + self.config.yield_rows

    def _stream(self, batch: pa.Table, todo: list[int]) -> Iterator[tuple[int, Fetched]]:
        """Results as they finish. A row's slot in the window is freed only when the caller takes
        it, so a caller held back (slow image work, Ray's output backpressure) stops new
        downloads: per call at most ``window()`` bodies are held, however large the batch."""
        urls = batch.column("url").to_pylist()
        q: queue.SimpleQueue = queue.SimpleQueue()
        loop = self._ensure_loop()
        slots = asyncio.run_coroutine_threadsafe(self._new_slots(), loop).result()
        fut = asyncio.run_coroutine_threadsafe(self._produce([(i, urls[i]) for i in todo], q, slots), loop)
        try:
            for _ in range(len(todo)):
                item = q.get()
                loop.call_soon_threadsafe(slots.release)
                yield item
        finally:
            if not fut.done():
                fut.cancel()  # the caller stopped early: no worker may wait for a slot forever

    async def _new_slots(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.window())

    async def _produce(self, items: list[tuple[int, str]], q: queue.SimpleQueue, slots: asyncio.Semaphore) -> None:
        """A fixed pool of workers walks the rows; each row takes a place in this call's window
        (``slots``), then one of the actor's download slots, which the worker keeps for its next
        row unless it has to wait for the caller or an older call waits for a slot."""
        it = iter(items)
        priority = next(self._calls)
        self.open_requests.change(calls_delta=1)

        async def worker() -> None:
            lease = _Lease(self._slots, priority)
            try:
                for i, url in it:
                    if slots.locked() or self._slots.waiting_before(priority):
                        lease.drop()  # another call may download meanwhile; an older one goes first
                    await slots.acquire()
                    await lease.take()
                    try:
                        r = await self._fetch_with_retries(url, lease)
                    except Exception as exc:  # noqa: BLE001 - a bug must not crash the job: record it
                        log.exception("download of %r raised", url)
                        r = Fetched(status=FAILED, reason="internal_error",
                                    message=f"{type(exc).__name__}: {exc}"[:300])
                    q.put((i, r))
            finally:
                lease.drop()

        try:
            await asyncio.gather(*(worker() for _ in range(min(self.config.concurrency, len(items)))))
        finally:
            self.open_requests.change(calls_delta=-1)

    def _assemble(self, batch: pa.Table, idx: list[int], results: dict[int, Fetched],
                  bodies_column: bool = True) -> tuple[pa.Table, list[bytes | None]]:
        sub = batch.take(pa.array(idx, pa.int64()))
        empty = Fetched()
        rows = [results.get(i, empty) for i in idx]
        done = [i in results for i in idx]
        bodies = [r.body for r in rows]
        cols = {"image_bytes": pa.array(bodies, pa.binary())} if bodies_column else {}
        sub = set_columns(sub, {
            **cols,
            "http_status": pa.array([r.http_status for r in rows], pa.int16()),
            "content_type": pa.array([r.content_type for r in rows], pa.string()),
            "final_url": pa.array([r.final_url for r in rows], pa.string()),
            "download_attempts": pa.array([r.attempts if d else None for r, d in zip(rows, done)], pa.int8()),
            "download_ms": pa.array([r.elapsed_ms for r in rows], pa.float32()),
            **self._occupancy_columns(len(idx)),
        })
        return mark(sub, self.name, [(r.status, r.reason, r.message) if d else None for r, d in zip(rows, done)]), bodies

    def _occupancy_columns(self, n: int) -> dict[str, pa.Array]:
        """The actor's open request-seconds and busy seconds since its previous chunk, on this
        chunk's first row (null on the others), so that a wave's sums give the occupancy."""
        area, active = self.open_requests.take() if n else (0.0, 0.0)
        pad = [None] * max(0, n - 1)
        return {"download_open_request_s": pa.array(([area] + pad) if n else [], pa.float32()),
                "download_active_s": pa.array(([active] + pad) if n else [], pa.float32())}

    async def _fetch_with_retries(self, url: str, lease: _Lease) -> Fetched:
        """Attempts under ``lease`` (a download slot, taken here if not held); between attempts the
        slot is given up for the backoff, so other rows download meanwhile."""
        c = self.config
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            await lease.take()
            self.open_requests.change(open_delta=1)
            try:
                result = await self._fetch_once(url)
            finally:
                self.open_requests.change(open_delta=-1)
            result.attempts = attempt
            if not result.retryable or attempt > c.retries:
                result.elapsed_ms = (time.monotonic() - start) * 1000.0
                return result
            delay = min(c.backoff_max_s, c.backoff_base_s * (2 ** (attempt - 1)))
            delay = random.uniform(delay / 2, delay)  # jitter
            if result.retry_after_s is not None:
                delay = max(delay, min(result.retry_after_s, c.backoff_max_s))
            lease.drop()
            await asyncio.sleep(delay)

    async def _fetch_once(self, url: str) -> Fetched:
        import aiohttp

        c = self.config
        current = url
        for _hop in range(c.max_redirects + 1):
            parts = urlsplit(current)
            host = url_host(current) if parts.scheme in ("http", "https") else None
            if host is None:
                return Fetched(status=FAILED, reason="bad_redirect" if current != url else "invalid_url",
                               message=f"not an http(s) URL: {current[:200]}", final_url=current)
            # Fast path for literal hosts, on the host as aiohttp normalises it (127。0。0。1 is
            # 127.0.0.1); the socket factory checks the connected address whatever this misses.
            literal, canonical = _literal_host(host)
            if literal is not None:
                forbidden = self.policy.check(literal)
                if forbidden is not None:
                    return Fetched(status=DROPPED, reason="ssrf_blocked",
                                   message=f"{parts.hostname} is {forbidden.value}", final_url=current)
                if canonical is not None:
                    # Odd spelling (127.1, 0x7f000001): use the canonical address.
                    current = parts._replace(netloc=canonical + (f":{parts.port}" if parts.port else "")).geturl()
            try:
                async with self._session.get(current, allow_redirects=False) as resp:
                    if resp.status in REDIRECT_CODES:
                        location = resp.headers.get("Location")
                        if not location:
                            return Fetched(status=FAILED, reason="bad_redirect", http_status=resp.status,
                                           message="redirect without Location", final_url=current)
                        current = urljoin(current, location)
                        continue
                    return await self._read_response(resp, current)
            except aiohttp.ClientSSLError as exc:  # before ClientConnectionError, its base
                return Fetched(status=FAILED, reason="tls_error", message=str(exc)[:300], final_url=current)
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
                return Fetched(status=FAILED, reason="timeout", message=type(exc).__name__, final_url=current,
                               retryable=c.retry_timeouts)
            except aiohttp.InvalidURL as exc:
                return Fetched(status=FAILED, reason="invalid_url", message=str(exc)[:300], final_url=current)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as exc:
                if is_ssrf_block(exc):  # the resolver's or the socket factory's refusal
                    return Fetched(status=DROPPED, reason="ssrf_blocked", message=str(exc)[:300], final_url=current)
                if isinstance(exc, aiohttp.ClientConnectorDNSError):
                    return Fetched(status=FAILED, reason="dns_error", message=str(exc)[:300], final_url=current)
                return Fetched(status=FAILED, reason="connection_error", message=f"{type(exc).__name__}: {exc}"[:300],
                               final_url=current, retryable=True)
            except (aiohttp.ClientError, ValueError, UnicodeError) as exc:
                return Fetched(status=FAILED, reason="http_error", message=f"{type(exc).__name__}: {exc}"[:300],
                               final_url=current)
        return Fetched(status=FAILED, reason="too_many_redirects", message=f"more than {c.max_redirects}",
                       final_url=current)

    async def _read_response(self, resp, url: str) -> Fetched:
        c = self.config
        ctype = resp.headers.get("Content-Type")
        base = dict(http_status=resp.status, content_type=ctype, final_url=url)
        if resp.status >= 400 or resp.status < 200:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            return Fetched(status=FAILED, reason=f"http_{resp.status}", message=resp.reason,
                           retryable=resp.status in RETRYABLE_STATUS, retry_after_s=retry_after, **base)
        if c.respect_robots_headers:
            hit = robots_forbids(resp.headers.getall("X-Robots-Tag", []), self.directives)
            if hit is not None:
                return Fetched(status=DROPPED, reason=f"robots_{hit}", message="X-Robots-Tag opt-out", **base)
        length = resp.content_length
        if length is not None and length > c.max_bytes:
            return Fetched(status=DROPPED, reason="too_large", message=f"Content-Length {length} > {c.max_bytes}",
                           **base)
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(65536):
            size += len(chunk)
            if size > c.max_bytes:
                return Fetched(status=DROPPED, reason="too_large", message=f"body over {c.max_bytes} bytes", **base)
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            return Fetched(status=FAILED, reason="empty_body", **base)
        if sniff_image(body[:32]) is None:
            return Fetched(status=DROPPED, reason="not_image",
                           message=f"content does not look like an image (Content-Type {ctype})", **base)
        return Fetched(body=body, **base)
