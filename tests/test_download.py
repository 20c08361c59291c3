"""HttpDownloader against a real local HTTP server: one test per failure reason, SSRF on loopback."""

from __future__ import annotations

import pytest

from operators.download import DownloadConfig, HttpDownloader, parse_retry_after, robots_forbids, sniff_image
from jobs.samples.server import SampleServer
from tests.helpers import batch_of

FAST = dict(allow_loopback=True, timeout_s=1.0, connect_timeout_s=1.0, retries=2, backoff_base_s=0.05,
            backoff_max_s=1.5, max_bytes=2_000_000, max_redirects=5)


@pytest.fixture()
def fetch(image_server):
    downloaders = []

    def run(paths, **overrides):
        d = HttpDownloader(DownloadConfig(**{**FAST, **overrides}))
        downloaders.append(d)
        urls = [p if p.startswith("http") else image_server.url(p) for p in paths]
        return d.process(batch_of(urls)).to_pylist()

    yield run
    for d in downloaders:
        d.close()


def one(fetch, path, **kw):
    return fetch([path], **kw)[0]


def test_ok_downloads_bytes_identical_to_the_file(fetch, sample_dir):
    from pathlib import Path

    row = one(fetch, "/img/00001.jpg")
    assert row["status"] == "kept" and row["drop_reason"] is None
    assert row["image_bytes"] == (Path(sample_dir) / "images" / "00001.jpg").read_bytes()
    assert row["http_status"] == 200 and row["download_attempts"] == 1


@pytest.mark.parametrize("path,status,reason", [
    ("/status/404", "failed", "http_404"),
    ("/status/403", "failed", "http_403"),
    ("/html", "dropped", "not_image"),
    ("/fakejpeg", "dropped", "not_image"),
    ("/big/3000000", "dropped", "too_large"),
    ("/bigchunked/3000000", "dropped", "too_large"),
    ("/redirect/10/00001.jpg", "failed", "too_many_redirects"),
    ("/optout/noai/00001.jpg", "dropped", "robots_noai"),
    ("/optout/noimageai/00001.jpg", "dropped", "robots_noimageai"),
    ("/optout/noindex/00001.jpg", "dropped", "robots_noindex"),
    ("/optout/noimageindex/00001.jpg", "dropped", "robots_noimageindex"),
    ("/empty", "failed", "empty_body"),
])
def test_failure_reasons(fetch, path, status, reason):
    row = one(fetch, path)
    assert (row["status"], row["drop_stage"], row["drop_reason"]) == (status, "download", reason), row
    assert row["image_bytes"] is None


def test_5xx_is_retried_then_recorded(fetch, image_server):
    image_server.reset_hits()
    row = one(fetch, "/status/500", retries=2)
    assert row["drop_reason"] == "http_500" and row["download_attempts"] == 3


def test_timeout_is_retried_then_recorded(fetch):
    row = one(fetch, "/slow/5/00001.jpg", timeout_s=0.3, retries=1, retry_timeouts=True)
    assert row["drop_reason"] == "timeout" and row["download_attempts"] == 2


def test_timeout_is_not_retried_by_default(fetch):
    row = one(fetch, "/slow/5/00001.jpg", timeout_s=0.3, retries=2)
    assert row["drop_reason"] == "timeout" and row["download_attempts"] == 1


def test_flaky_503_recovers(fetch):
    row = one(fetch, "/flaky/t-flaky/2/00002.jpg")
    assert row["status"] == "kept" and row["download_attempts"] == 3


def test_429_honours_retry_after(fetch):
    row = one(fetch, "/ratelimit/t-429/00003.jpg")
    assert row["status"] == "kept" and row["download_attempts"] == 2
    assert row["download_ms"] >= 900  # Retry-After: 1 was honoured (a behaviour, not a speed check)


def test_redirects_followed(fetch):
    row = one(fetch, "/redirect/2/00004.jpg")
    assert row["status"] == "kept" and row["final_url"].endswith("/img/00004.jpg")


def test_robots_can_be_disabled(fetch):
    row = one(fetch, "/optout/noai/00001.jpg", respect_robots_headers=False)
    assert row["status"] == "kept"


def test_robots_scoped_to_another_agent_does_not_apply(fetch):
    row = one(fetch, "/optout/otherbot%3A%20noai/00001.jpg")
    assert row["status"] == "kept"


def test_dropped_rows_are_not_fetched(fetch, image_server):
    image_server.reset_hits()
    d = HttpDownloader(DownloadConfig(**FAST))
    try:
        out = d.process(batch_of([image_server.url("/img/00005.jpg")], status=["failed"])).to_pylist()[0]
    finally:
        d.close()
    assert out["status"] == "failed" and out["image_bytes"] is None
    assert image_server.hits.get("/img/00005.jpg", 0) == 0


def test_many_concurrent_requests(fetch):
    from jobs.samples.data import good_image_names
    from tests.conftest import N_GOOD

    rows = fetch([f"/img/{n}" for n in good_image_names(N_GOOD)], concurrency=8, per_host_concurrency=4)
    assert len(rows) == N_GOOD
    assert all(r["status"] == "kept" for r in rows)


# --- SSRF guard, end to end, on loopback only -------------------------------------------------
def test_loopback_denied_refuses_127_0_0_2(fetch, image_server):
    image_server.reset_hits()
    port = image_server.base_url.rsplit(":", 1)[1]
    for host in ("127.0.0.2", "127.0.0.1", "[::1]", "2130706433", "0x7f000001", "127.1", "localhost"):
        row = one(fetch, f"http://{host}:{port}/img/00001.jpg", allow_loopback=False)
        assert (row["status"], row["drop_reason"]) == ("dropped", "ssrf_blocked"), (host, row)
    assert image_server.hits.get("/img/00001.jpg", 0) == 0


def test_redirect_to_loopback_refused(fetch, sample_dir, image_server):
    """The test server on 127.0.0.3 is allowed by CIDR; its redirect to 127.0.0.1 must be refused."""
    from jobs.samples.data import images_dir
    from jobs.samples.server import SampleServer

    image_server.reset_hits()
    target = image_server.url("/img/00001.jpg")  # on 127.0.0.1
    with SampleServer(root_dir=images_dir(sample_dir), host="127.0.0.3") as other:
        row = one(fetch, other.url(f"/redirect-to?url={target}"), allow_loopback=False,
                  allow_networks=["127.0.0.3/32"])
        assert other.hits.get("/redirect-to", 0) == 1
    assert (row["status"], row["drop_reason"]) == ("dropped", "ssrf_blocked"), row
    assert image_server.hits.get("/img/00001.jpg", 0) == 0


# Spellings of 127.0.0.1 that yarl (so aiohttp) folds to the ASCII literal: ideographic (U+3002),
# halfwidth ideographic (U+FF61) and fullwidth (U+FF0E) full stops, fullwidth and circled digits,
# mixed, a trailing dot, octal, IPv4-mapped IPv6 in both notations.
UNICODE_LOOPBACK_HOSTS = ("127\u30020\u30020\u30021", "127\uff610\uff610\uff611", "127\uff0e0\uff0e0\uff0e1",
                          "\uff11\uff12\uff17.0.0.1", "\uff11\uff12\uff17\u30020\uff0e0\uff611", "\u2460\u2461\u2466.0.0.1",
                          "127.0.0.1.", "0177.0.0.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]")


class RawRedirectServer(SampleServer):
    """The sample server plus ``/raw-redirect?url=U``: a 302 whose Location is U byte for byte
    (aiohttp's HTTPFound would normalise a Unicode host to ASCII before sending it)."""

    def make_app(self):
        from aiohttp import web

        app = super().make_app()

        async def raw_redirect(request):
            return web.Response(status=302, headers={"Location": request.query["url"]})

        app.router.add_get("/raw-redirect", raw_redirect)
        return app


@pytest.mark.parametrize("host", UNICODE_LOOPBACK_HOSTS)
def test_unicode_and_odd_loopback_spellings_refused(fetch, image_server, host):
    image_server.reset_hits()
    port = image_server.base_url.rsplit(":", 1)[1]
    row = one(fetch, f"http://{host}:{port}/img/00001.jpg", allow_loopback=False)
    assert (row["status"], row["drop_reason"]) == ("dropped", "ssrf_blocked"), (host, row)
    assert sum(image_server.hits.values()) == 0


def test_redirects_to_unicode_loopback_spellings_refused(fetch, sample_dir, image_server):
    """An allowed host (127.0.0.3, by CIDR) redirects to each spelling of 127.0.0.1: none is followed."""
    from urllib.parse import quote

    from jobs.samples.data import images_dir

    port = image_server.base_url.rsplit(":", 1)[1]
    with RawRedirectServer(root_dir=images_dir(sample_dir), host="127.0.0.3") as other:
        image_server.reset_hits()
        urls = [other.url("/raw-redirect?url=" + quote(f"http://{h}:{port}/img/00001.jpg", safe=""))
                for h in UNICODE_LOOPBACK_HOSTS]
        rows = fetch(urls, allow_loopback=False, allow_networks=["127.0.0.3/32"])
        assert other.hits.get("/raw-redirect", 0) == len(UNICODE_LOOPBACK_HOSTS)
    for h, row in zip(UNICODE_LOOPBACK_HOSTS, rows):
        assert (row["status"], row["drop_reason"]) == ("dropped", "ssrf_blocked"), (h, row)
    assert sum(image_server.hits.values()) == 0


def test_connect_time_guard_holds_without_the_literal_fast_path(fetch, image_server, monkeypatch):
    """With the early literal check switched off, the socket factory alone refuses the connection."""
    import operators.download as download

    monkeypatch.setattr(download, "_literal_host", lambda host: (None, None))
    image_server.reset_hits()
    port = image_server.base_url.rsplit(":", 1)[1]
    for host in ("127.0.0.1", "127\u30020\u30020\u30021", "[::ffff:127.0.0.1]", "[::1]"):
        row = one(fetch, f"http://{host}:{port}/img/00001.jpg", allow_loopback=False)
        assert (row["status"], row["drop_reason"]) == ("dropped", "ssrf_blocked"), (host, row)
        assert "SSRF guard" in row["error_message"]
    assert sum(image_server.hits.values()) == 0
    # And with loopback allowed the same path connects (the guard is what refused above).
    assert one(fetch, f"http://127.0.0.1:{port}/img/00001.jpg", allow_loopback=True)["status"] == "kept"


def test_redirect_to_non_http_scheme_refused(fetch, image_server):
    row = one(fetch, image_server.url("/redirect-to?url=file:///etc/passwd"))
    assert row["status"] == "failed" and row["drop_reason"] == "bad_redirect"


# --- pure helpers ----------------------------------------------------------------------------
def test_sniff_image():
    assert sniff_image(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff_image(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_image(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_image(b"GIF89a") == "gif"
    assert sniff_image(b"<!doctype html>") is None
    assert sniff_image(b"") is None


def test_robots_forbids():
    d = {"noai", "noimageai", "noindex", "noimageindex"}
    assert robots_forbids(["noai"], d) == "noai"
    assert robots_forbids(["NoImageAI, nofollow"], d) == "noimageai"
    assert robots_forbids(["googlebot: noindex"], d) is None
    assert robots_forbids(["imgcurate: noindex"], d) == "noindex"
    assert robots_forbids(["*: noai"], d) == "noai"
    assert robots_forbids(["nofollow", "noarchive"], d) is None


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="allow_networks"):
        DownloadConfig(allow_networks=["not-a-net"])
    with pytest.raises(ValueError, match="timeout_s"):
        DownloadConfig(timeout_s=-1)


def test_streaming_call_yields_every_row_once(image_server):
    """The Ray-facing generator form: chunks as downloads finish, union == input rows."""
    import pyarrow as pa

    paths = ["/img/00001.jpg", "/status/404", "/slow/0.3/00002.jpg", "/img/00003.jpg", "/html"]
    urls = [image_server.url(p) for p in paths]
    status = ["kept", "kept", "kept", "dropped", "kept"]
    d = HttpDownloader(DownloadConfig(**{**FAST, "yield_rows": 2}))
    try:
        chunks = list(d(batch_of(urls, status=status)))
    finally:
        d.close()
    assert len(chunks) >= 2
    out = pa.concat_tables(chunks).to_pylist()
    assert sorted(r["sample_id"] for r in out) == [f"id{i}" for i in range(5)]
    by_url = {r["url"]: r for r in out}
    assert by_url[urls[0]]["status"] == "kept" and by_url[urls[0]]["image_bytes"]
    assert by_url[urls[1]]["drop_reason"] == "http_404"
    assert by_url[urls[3]]["status"] == "dropped" and by_url[urls[3]]["drop_stage"] is None  # untouched
    assert by_url[urls[4]]["drop_reason"] == "not_image"


def test_dropped_connections_are_retried_then_recorded(sample_dir):
    """A server that faults every request: each URL ends as http_500 or connection_error after retries."""
    from jobs.samples.data import images_dir
    from jobs.samples.server import SampleServer

    with SampleServer(root_dir=images_dir(sample_dir), fault_rate=1.0, seed=3) as bad:
        d = HttpDownloader(DownloadConfig(**{**FAST, "retries": 1}))
        try:
            rows = d.process(batch_of([bad.url(f"/img/00001.jpg?i={i}") for i in range(8)])).to_pylist()
        finally:
            d.close()
    reasons = {r["drop_reason"] for r in rows}
    assert reasons <= {"http_500", "connection_error"} and "connection_error" in reasons, reasons
    assert all(r["status"] == "failed" and r["download_attempts"] == 2 for r in rows)


def test_then_operator_runs_on_each_chunk(image_server):
    """With ``then`` (the job passes the ImageProcessor), chunks leave the call processed."""
    import pyarrow as pa

    from operators.images import ImageProcessor

    paths = ["/img/00001.jpg", "/status/404", "/img/00003.jpg", "/html"]
    urls = [image_server.url(p) for p in paths]
    d = HttpDownloader(DownloadConfig(**{**FAST, "yield_rows": 2}), then=ImageProcessor({"image_size": 32}))
    try:
        out = pa.concat_tables(list(d(batch_of(urls)))).to_pylist()
    finally:
        d.close()
    assert sorted(r["sample_id"] for r in out) == [f"id{i}" for i in range(4)]
    assert all("image_bytes" not in r for r in out)  # raw bytes stay in the actor
    by_url = {r["url"]: r for r in out}
    assert by_url[urls[0]]["status"] == "kept" and (by_url[urls[0]]["width"], by_url[urls[0]]["height"]) == (32, 32)
    assert by_url[urls[1]]["drop_reason"] == "http_404" and by_url[urls[1]]["image"] is None
    assert by_url[urls[3]]["drop_reason"] == "not_image"


def test_then_must_be_callable():
    with pytest.raises(ValueError, match="then must be"):
        HttpDownloader(DownloadConfig(**FAST), then="images")


def test_window_bounds_downloads_while_the_caller_holds_back(image_server):
    """A caller that stops taking results stops new downloads: at most window() rows are fetched ahead."""
    import time

    d = HttpDownloader(DownloadConfig(**{**FAST, "concurrency": 2, "per_host_concurrency": 2, "yield_rows": 1}))
    fetched = []
    orig = d._fetch_with_retries

    async def counting(url, lease):
        fetched.append(url)
        return await orig(url, lease)

    d._fetch_with_retries = counting
    urls = [image_server.url(f"/img/00001.jpg?i={i}") for i in range(20)]
    try:
        it = d._stream(batch_of(urls), list(range(len(urls))))
        next(it)
        time.sleep(0.5)  # holding one result back: the others may finish, no new ones start
        assert len(fetched) <= 1 + d.window(), len(fetched)
        rest = list(it)
    finally:
        d.close()
    assert len(rest) == len(urls) - 1 and len(fetched) == len(urls)


def test_oldest_first_slots_grant_by_priority_and_survive_cancellation():
    import asyncio

    from operators.download import OldestFirstSlots

    async def main():
        slots = OldestFirstSlots(1)
        await slots.acquire(5)
        order = []

        async def waiter(priority, tag):
            await slots.acquire(priority)
            order.append(tag)
            slots.release()

        tasks = [asyncio.create_task(waiter(p, t)) for p, t in ((3, "c3"), (1, "c1"), (2, "c2"))]
        gone = asyncio.create_task(waiter(0, "cancelled while waiting"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        slots.release()
        await asyncio.gather(*tasks)
        assert order == ["c1", "c2", "c3"] and slots._free == 1

        await slots.acquire(0)
        late = asyncio.create_task(waiter(1, "granted, then cancelled"))
        await asyncio.sleep(0)
        slots.release()  # granted to `late`, which is cancelled before it runs: the slot comes back
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        assert slots._free == 1 and order == ["c1", "c2", "c3"]

        # A younger call's worker hands its slot over when an older call waits (waiting_before).
        await slots.acquire(7)
        older = asyncio.create_task(waiter(2, "older"))
        gone = asyncio.create_task(waiter(1, "cancelled"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert slots.waiting_before(7) and not slots.waiting_before(2)
        slots.release()
        await older
        assert not slots.waiting_before(7) and order[-1] == "older" and slots._free == 1

    asyncio.run(main())


def test_oldest_call_downloads_first(image_server):
    """Calls running at once (Ray's threaded actor, batches_in_flight) share the actor's download
    slots oldest call first: the first call finishes before the second gets going, not together."""
    import threading
    import time

    d = HttpDownloader(DownloadConfig(**{**FAST, "concurrency": 4, "per_host_concurrency": 4}))
    done: list[str] = []
    lock = threading.Lock()

    def call(tag: str) -> None:
        urls = [image_server.url(f"/slow/0.05/00001.jpg?{tag}={i}") for i in range(12)]
        for _ in d._stream(batch_of(urls), list(range(len(urls)))):
            with lock:
                done.append(tag)

    try:
        first = threading.Thread(target=call, args=("a",))
        first.start()
        time.sleep(0.02)  # "a" is the older call
        second = threading.Thread(target=call, args=("b",))
        second.start()
        first.join(30)
        second.join(30)
    finally:
        d.close()
    assert sorted(done) == ["a"] * 12 + ["b"] * 12
    # 4 slots, 12 rows of 50 ms each: "b" gets a slot only when "a" has no row left to start, so at
    # least 8 of "a" finish before the first "b" (shared round-robin, "b" would finish from the start).
    assert done.index("b") >= 8, done
    assert done[-1] == "b", done


def test_then_threads_caps_concurrent_image_work(image_server):
    """Calls running at once (Ray's threaded actor) run ``then`` on at most then_threads chunks."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    busy, peak, lock = [0], [0], threading.Lock()

    def slow_then(chunk):
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.05)
        with lock:
            busy[0] -= 1
        return chunk

    with pytest.raises(ValueError, match="then_threads"):
        HttpDownloader(DownloadConfig(**FAST), then=slow_then, then_threads=0)
    d = HttpDownloader(DownloadConfig(**{**FAST, "yield_rows": 1}), then=slow_then, then_threads=2)
    batches = [batch_of([image_server.url(f"/img/00001.jpg?i={k}-{i}") for i in range(4)]) for k in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda b: sum(t.num_rows for t in d(b)), batches))
    finally:
        d.close()
    assert outs == [4, 4, 4, 4] and 1 <= peak[0] <= 2


def test_open_requests_are_accounted_per_chunk(fetch, image_server):
    """The first row of each chunk carries the actor's open request-seconds and busy seconds since
    the previous chunk; their ratio is the mean number of open requests (here all 4 slots, since
    12 slow rows wait for 4 slots until the last 4)."""
    d = HttpDownloader(DownloadConfig(**{**FAST, "concurrency": 4, "per_host_concurrency": 4, "yield_rows": 3}))
    try:
        chunks = list(d(batch_of([image_server.url(f"/slow/0.3/00001.jpg?k={i}") for i in range(12)])))
    finally:
        d.close()
    rows = [r for c in chunks for r in c.to_pylist()]
    assert len(rows) == 12 and all(r["status"] == "kept" for r in rows)
    for c in chunks:
        assert c.column("download_active_s").null_count == c.num_rows - 1
    area = sum(r["download_open_request_s"] or 0.0 for r in rows)
    active = sum(r["download_active_s"] or 0.0 for r in rows)
    assert active > 0.9  # three rounds of 0.3 s
    assert 3.0 < area / active <= 4.0 + 1e-6, (area, active)
