"""The local sample server and the generated dry-run sample: fast, loopback only, no Ray."""

from __future__ import annotations

import csv
import http.client
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo is not pip-installed and pyproject sets no pythonpath
    sys.path.insert(0, str(ROOT))

from jobs.samples.data import (
    BOMB_SIZE,
    EXPECT_REASONS,
    build_dryrun_sample,
    expected_counts,
    generate_images,
    good_image_names,
    sample_cases,
    write_url_list,
)  # noqa: E402
import jobs.samples.server as sample_server  # noqa: E402
from jobs.samples.server import (  # noqa: E402
    WEB_FATES,
    WEB_OK_SHARE,
    SampleServer,
    parse_listening_line,
    web_fate,
    web_host,
    web_host_weights,
    web_latency_s,
)

N_GOOD = 16


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    generate_images(str(d), n_good=N_GOOD, seed=0)
    return d


@pytest.fixture(scope="module")
def server(image_dir):
    with SampleServer(str(image_dir)) as srv:
        yield srv


def get(srv: SampleServer, path: str, timeout: float = 5.0, host: int = 0) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection to host number ``host``, redirects not followed: (status, headers, body)."""
    host, port = srv.base_urls[host].removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_img_serves_file_bytes_with_type_and_length(server, image_dir):
    for name in good_image_names(N_GOOD)[:8]:
        status, headers, body = get(server, f"/img/{name}")
        assert status == 200
        assert body == (image_dir / name).read_bytes()
        assert int(headers["content-length"]) == len(body)
        ext = name.rsplit(".", 1)[1]
        assert headers["content-type"] == {"jpg": "image/jpeg", "png": "image/png",
                                           "webp": "image/webp", "gif": "image/gif"}[ext]
    assert get(server, "/img/no-such-file.jpg")[0] == 404
    assert get(server, "/img/..")[0] == 404
    assert server.hits["/img/no-such-file.jpg"] == 1


def test_status_routes(server):
    status, headers, body = get(server, "/status/404?i=1")
    assert status == 404 and body
    assert "retry-after" not in headers
    for code in (429, 503):
        status, headers, _ = get(server, f"/status/{code}")
        assert status == code and headers["retry-after"] == "1"
    assert get(server, "/status/500")[0] == 500


def test_flaky_then_ok_and_ratelimit(server, image_dir):
    name = good_image_names(N_GOOD)[0]
    for _ in range(2):
        status, headers, _ = get(server, f"/flaky/t-flaky/2/{name}")
        assert status == 503 and headers["retry-after"] == "0"
    status, _, body = get(server, f"/flaky/t-flaky/2/{name}")
    assert status == 200 and body == (image_dir / name).read_bytes()

    status, headers, _ = get(server, f"/ratelimit/t-rl/{name}")
    assert status == 429 and headers["retry-after"] == "1"
    assert get(server, f"/ratelimit/t-rl/{name}")[0] == 200
    assert server.hits[f"/flaky/t-flaky/2/{name}"] == 3


def test_redirect_chain_ends_at_image(server, image_dir):
    name = good_image_names(N_GOOD)[1]
    status, headers, _ = get(server, f"/redirect/2/{name}")
    assert status == 302 and headers["location"] == f"/redirect/1/{name}"
    with urllib.request.urlopen(server.url(f"/redirect/2/{name}"), timeout=5) as resp:
        assert resp.url == server.url(f"/img/{name}")
        assert resp.read() == (image_dir / name).read_bytes()
    status, headers, _ = get(server, "/redirect-to?url=http://169.254.169.254/latest/meta-data/")
    assert status == 302 and headers["location"] == "http://169.254.169.254/latest/meta-data/"


def test_content_routes(server, image_dir):
    name = good_image_names(N_GOOD)[2]
    status, headers, _ = get(server, f"/optout/otherbot%3A%20noai/{name}")
    assert status == 200 and headers["x-robots-tag"] == "otherbot: noai"
    assert get(server, f"/optout/noimageai/{name}")[1]["x-robots-tag"] == "noimageai"

    status, headers, body = get(server, "/html")
    assert headers["content-type"].startswith("text/html") and body.lstrip().startswith(b"<!DOCTYPE")
    status, headers, body = get(server, "/fakejpeg")
    assert headers["content-type"] == "image/jpeg" and body.lstrip().startswith(b"<!DOCTYPE")

    status, headers, body = get(server, "/big/100000")
    assert status == 200 and int(headers["content-length"]) == len(body) == 100_000
    assert body.startswith(b"\xff\xd8\xff\xe0") and body[4:] == bytes(len(body) - 4)
    status, headers, body = get(server, "/bigchunked/200000")
    assert "content-length" not in headers and headers["transfer-encoding"] == "chunked"
    assert len(body) == 200_000 and body.startswith(b"\xff\xd8\xff\xe0")

    status, headers, body = get(server, "/empty")
    assert status == 200 and body == b"" and headers["content-type"] == "image/jpeg"


def test_slow_times_out_on_the_client(server):
    name = good_image_names(N_GOOD)[3]
    with pytest.raises((TimeoutError, socket.timeout)):
        get(server, f"/slow/30/{name}", timeout=0.3)


def test_latency_and_faults(image_dir):
    name = good_image_names(N_GOOD)[0]
    with SampleServer(str(image_dir), latency_ms=30) as srv:
        assert get(srv, f"/img/{name}")[0] == 200

    outcomes = []
    with SampleServer(str(image_dir), fault_rate=1.0, seed=0) as srv:
        for _ in range(16):
            try:
                outcomes.append(get(srv, f"/img/{name}")[0])
            except (ConnectionError, http.client.HTTPException, OSError):
                outcomes.append("conn")
        assert srv.hits[f"/img/{name}"] == 16
        assert get(srv, "/status/200")[0] == 200  # the server survived the aborted connections
    assert set(outcomes) == {500, "conn"}


def test_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        SampleServer(host="0.0.0.0")
    with pytest.raises(ValueError):
        SampleServer(fault_rate=1.5)


def start_cli(image_dir, *flags: str) -> subprocess.Popen:
    """``python -m jobs.samples.server`` on a free port with ``flags``; the caller kills it."""
    return subprocess.Popen([sys.executable, "-m", "jobs.samples.server", "--dir", str(image_dir), "--port", "0",
                             *flags], cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_cli_prints_listening_line(image_dir):
    proc = start_cli(image_dir, "--latency-ms", "5", "--fault-rate", "0", "--seed", "0")
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("LISTENING http://127.0.0.1:")
        name = good_image_names(N_GOOD)[0]
        with urllib.request.urlopen(line.split()[1] + f"/img/{name}", timeout=5) as resp:
            assert resp.read() == (image_dir / name).read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_generated_images(image_dir, monkeypatch):
    names = good_image_names(N_GOOD)
    for name in names:
        with Image.open(image_dir / name) as im:
            im.load()
            assert 64 <= min(im.size) and max(im.size) <= 400
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "png", "webp", "gif"}
    with Image.open(image_dir / "00010.png") as im:
        assert im.mode == "RGBA" and im.getextrema()[3] == (0, 255)
    with Image.open(image_dir / "00012.jpg") as im:
        assert im.mode == "L"
    with Image.open(image_dir / "00013.jpg") as im:
        assert im.getexif()[0x0112] == 6
    def size(name: str) -> tuple[int, int]:
        with Image.open(image_dir / name) as im:
            return im.size

    for k in range(3):
        assert size(f"small-{k}.jpg") == (16, 16)
    for k in range(2):
        w, h = size(f"wide-{k}.jpg")
        assert max(w, h) / min(w, h) > 5 and min(w, h) >= 32

    for k in range(5):
        data = (image_dir / f"corrupt-{k}.jpg").read_bytes()
        assert data.startswith(b"\xff\xd8\xff")
        with pytest.raises(Exception):
            with Image.open(image_dir / f"corrupt-{k}.jpg") as im:
                im.load()

    with pytest.raises(Image.DecompressionBombError):  # Pillow's default pixel cap
        Image.open(image_dir / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(image_dir / "bomb.png") as im:  # header only: nothing is decoded
        assert im.size == (BOMB_SIZE, BOMB_SIZE) == (30000, 30000)
        assert im.mode == "RGB"


def test_generate_images_is_deterministic(tmp_path, image_dir):
    generate_images(str(tmp_path / "a"), n_good=N_GOOD, seed=0)
    generate_images(str(tmp_path / "b"), n_good=N_GOOD, seed=1)
    for name in ["00000.jpg", "00005.png", "00006.webp", "corrupt-0.jpg", "corrupt-4.jpg"]:
        assert (tmp_path / "a" / name).read_bytes() == (image_dir / name).read_bytes()
        assert (tmp_path / "b" / name).read_bytes() != (image_dir / name).read_bytes()
    assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(image_dir))


def test_sample_cases_cover_every_reason():
    cases = sample_cases()
    assert {c.expect for c in cases} == set(EXPECT_REASONS)
    assert 250 <= len(cases) <= 500
    counts = expected_counts(cases)
    assert counts["kept"] == 240 + 12 + 3 + 2 + 2  # good + planted copies + flaky + rate-limited + redirected
    assert counts["http_404"] >= 10 and counts["too_large"] == 3
    assert sample_cases() == cases  # deterministic order

    captions = [c.caption for c in cases]
    assert any(c and len(c) == 5000 for c in captions)
    assert any(c and "\n" in c for c in captions) and any(c and "&amp;" in c for c in captions)
    assert None in captions and "" in captions
    assert any(c.caption in (None, "") and c.title for c in cases)

    base = "http://127.0.0.1:8123"
    urls = {c.url(base) for c in cases}
    assert {None, "", "http://", "not a url", "javascript:alert(1)"} <= urls
    assert "HTTP://127.0.0.1:8123/img/00004.jpg" in urls
    assert "http://127.0.0.1:8123/img/00003.jpg#top" in urls
    for c in cases:  # every fetchable URL stays on the loopback server
        u = c.url(base)
        if u and u.lower().startswith("http://") and len(u) > len("http://"):
            assert u.lower().startswith(base)


def test_write_url_list_formats(tmp_path):
    cases = sample_cases(N_GOOD)
    base = "http://127.0.0.1:8123"
    path = write_url_list(cases, base, str(tmp_path / "urls.csv"))
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["url", "caption", "title", "expect"]
    assert [r["url"] for r in rows] == [c.url(base) or "" for c in cases]
    assert [r["caption"] for r in rows] == [c.caption or "" for c in cases]

    import pyarrow.parquet as pq

    table = pq.read_table(write_url_list(cases, base, str(tmp_path / "u.parquet"), fmt="parquet"))
    assert table.column("url").to_pylist() == [c.url(base) for c in cases]
    lines = Path(write_url_list(cases, base, str(tmp_path / "u.jsonl"), fmt="jsonl")).read_text("utf-8")
    assert len(lines.splitlines()) == len(cases)  # control characters are escaped in JSON
    with pytest.raises(ValueError):
        write_url_list(cases, base, str(tmp_path / "u.xml"), fmt="xml")


def test_build_dryrun_sample_generates_once(tmp_path):
    path = build_dryrun_sample(str(tmp_path), "http://127.0.0.1:8123", n_good=N_GOOD)
    assert path == str(tmp_path / "urls.csv") and os.path.exists(path)
    first = (tmp_path / "images" / "00000.jpg").stat().st_mtime_ns
    build_dryrun_sample(str(tmp_path), "http://127.0.0.1:8124", n_good=N_GOOD)
    assert (tmp_path / "images" / "00000.jpg").stat().st_mtime_ns == first
    assert "127.0.0.1:8124" in Path(path).read_text("utf-8")


# ---------------------------------------------------------------------- the realistic web (/web/)
WEB_NAME = "00000.jpg"


def web_url(kind: str, seed: int = 0, name: str = WEB_NAME, **fields) -> str:
    """The first /web/ URL (``?i=K``) whose fate is ``kind`` (and matches ``fields``)."""
    for k in range(100_000):
        path = f"/web/{name}?i={k}"
        fate = web_fate(seed, path)
        if fate.kind == kind and all(getattr(fate, f) == v for f, v in fields.items()):
            return path
    raise AssertionError(f"no URL with fate {kind} {fields}")


@pytest.fixture(scope="module")
def web_server(image_dir):
    with SampleServer(str(image_dir), web_latency_ms=1.0, web_slow_s=30.0) as srv:
        yield srv


def test_web_fate_shares_are_as_documented():
    n = 4000
    fates = [web_fate(0, f"/web/{WEB_NAME}?i={k}") for k in range(n)]
    counts = {kind: sum(f.kind == kind for f in fates) for kind, _ in WEB_FATES}
    counts["ok"] = sum(f.kind == "ok" for f in fates)
    for kind, share in [*WEB_FATES, ("ok", WEB_OK_SHARE)]:
        sd = (n * share * (1 - share)) ** 0.5  # binomial: within 4 standard deviations (and 3 URLs)
        assert abs(counts[kind] - n * share) <= 4 * sd + 3, (kind, counts[kind], n * share)
    first_fail = sum(share for kind, share in WEB_FATES if kind != "redirect")
    assert 0.07 <= first_fail <= 0.09 and abs(WEB_OK_SHARE + first_fail + 0.03 - 1) < 1e-9
    assert {f.fail_attempts for f in fates if f.kind == "server_error"} == {1, 2}
    assert {f.hops for f in fates if f.kind == "redirect"} == {1, 2, 3}
    # deterministic from (seed, path+query): the same in another call, different for another seed
    assert [web_fate(0, f"/web/{WEB_NAME}?i={k}") for k in range(n)] == fates
    assert [web_fate(1, f"/web/{WEB_NAME}?i={k}") for k in range(n)] != fates


def test_web_latency_is_exponential_and_capped():
    draws = [web_latency_s(0, f"/web/x.jpg?i={k}", 1, 60.0, 2.0) for k in range(4000)]
    assert 0.054 <= sum(draws) / len(draws) <= 0.066 and max(draws) <= 2.0
    assert web_latency_s(0, "/web/x.jpg?i=1", 1, 60.0, 2.0) == web_latency_s(0, "/web/x.jpg?i=1", 1, 60.0, 2.0)
    assert web_latency_s(0, "/web/x.jpg?i=1", 1, 60.0, 2.0) != web_latency_s(0, "/web/x.jpg?i=1", 2, 60.0, 2.0)
    assert web_latency_s(0, "/web/x.jpg?i=1", 1, 1e9, 2.0) == 2.0
    assert web_latency_s(0, "/web/x.jpg?i=1", 1, 0.0, 2.0) == 0.0


def test_web_same_seed_same_web_across_servers(image_dir):
    paths = [f"/web/{WEB_NAME}?i={k}" for k in range(60)]
    seen = []
    for _ in range(2):
        with SampleServer(str(image_dir), web_latency_ms=0.5, web_slow_s=0.0, web_seed=3) as srv:
            seen.append([(s, h.get("location"), h.get("x-robots-tag"), b)
                         for s, h, b in (get(srv, p) for p in paths if web_fate(3, p).kind != "truncated")])
            stats = srv.web_stats()
    assert seen[0] == seen[1]
    assert sum(stats["urls"].values()) == len([p for p in paths if web_fate(3, p).kind != "truncated"])


def test_web_fates_over_http(web_server, image_dir):
    srv, image = web_server, (image_dir / WEB_NAME).read_bytes()
    assert get(srv, web_url("ok"))[0::2] == (200, image)

    path = web_url("not_found")
    assert get(srv, path)[0] == 404 and get(srv, path)[0] == 404

    path = web_url("server_error", fail_attempts=2)
    assert [get(srv, path)[0] for _ in range(2)] == [500, 500]
    assert get(srv, path)[0::2] == (200, image)

    path = web_url("unavailable")
    assert [get(srv, path)[0] for _ in range(3)] == [503, 503, 503]

    path = web_url("truncated")
    host, port = srv.base_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("content-length")) == len(image)
        with pytest.raises(http.client.IncompleteRead) as exc:
            resp.read()
        assert exc.value.partial == image[: len(image) // 2]
    finally:
        conn.close()
    assert get(srv, path)[0::2] == (200, image)

    path = web_url("rate_limited")
    status, headers, _ = get(srv, path)
    assert status == 429 and headers["retry-after"] == "1"
    assert get(srv, path)[0::2] == (200, image)

    status, headers, body = get(srv, web_url("html_as_jpeg"))
    assert status == 200 and headers["content-type"] == "image/jpeg" and body.startswith(b"<!DOCTYPE")

    status, headers, body = get(srv, web_url("optout"))
    assert status == 200 and headers["x-robots-tag"] == "noai" and body == image

    path = web_url("redirect", hops=3)
    status, headers, _ = get(srv, path)
    assert status == 302 and headers["location"] == f"/web/hop/1/{path.removeprefix('/web/')}"
    with urllib.request.urlopen(srv.url(path), timeout=5) as resp:
        assert resp.url == srv.url(f"/web/hop/3/{path.removeprefix('/web/')}") and resp.read() == image

    with pytest.raises((TimeoutError, socket.timeout)):
        get(srv, web_url("slow"), timeout=0.3)

    with urllib.request.urlopen(srv.url("/web-stats"), timeout=5) as resp:
        stats = json.loads(resp.read())
    assert stats == srv.web_stats()
    assert stats["urls"]["redirect"] == 1 and stats["responses"]["302"] == 4  # 1 alone, 3 on the chain
    assert stats["responses"]["truncated"] == 1 and stats["responses"]["429"] == 1
    assert stats["responses"]["500"] == 2 and stats["responses"]["503"] == 3


def test_web_cli_flags(image_dir):
    proc = start_cli(image_dir, "--web-latency-ms", "1", "--web-seed", "5", "--web-slow-s", "0")
    try:
        base = proc.stdout.readline().strip().split()[1]
        path = web_url("not_found", seed=5)
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(base + path, timeout=5)
        assert exc.value.code == 404
        with urllib.request.urlopen(base + web_url("ok", seed=5), timeout=5) as resp:
            assert resp.read() == (image_dir / WEB_NAME).read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def test_web_bad_settings():
    with pytest.raises(ValueError, match="web_latency_ms"):
        SampleServer(web_latency_ms=-1)
    with pytest.raises(ValueError, match="web_slow_s"):
        SampleServer(web_slow_s=-1)


# ---------------------------------------------------------------------- several hosts (hosts=K)
def test_hosts_serve_one_app_on_one_port(image_dir):
    name = good_image_names(N_GOOD)[0]
    with SampleServer(str(image_dir), hosts=3) as srv:
        port = srv.base_url.rsplit(":", 1)[1]
        assert srv.base_urls == [f"http://127.0.0.{k}:{port}" for k in (1, 2, 3)]
        assert srv.base_url == srv.base_urls[0] and srv.url("/x") == srv.url("/x", host=0)
        assert srv.url(f"/img/{name}", host=2) == f"http://127.0.0.3:{port}/img/{name}"
        with pytest.raises(ValueError, match="host"):
            srv.url("/x", host=3)
        for k in range(3):
            with urllib.request.urlopen(srv.url(f"/img/{name}?k={k}", host=k), timeout=5) as resp:
                assert resp.read() == (image_dir / name).read_bytes()
        assert srv.hits[f"/img/{name}"] == 3  # counted on all hosts together, per path
        assert [srv.requests[f"/img/{name}?k={k}"] for k in range(3)] == [1, 1, 1]
    for k in (1, 2, 3):  # every site closed
        with pytest.raises(OSError):
            socket.create_connection((f"127.0.0.{k}", int(port)), timeout=1).close()


def test_hosts_loopback_only_and_bad_counts():
    for host, hosts in (("0.0.0.0", 3), ("10.0.0.1", 2), ("127.255.255.254", 3), ("::1", 2)):
        with pytest.raises(ValueError, match="loopback"):
            SampleServer(host=host, hosts=hosts)
    with pytest.raises(ValueError, match="IP address"):
        SampleServer(host="localhost", hosts=2)
    for hosts in (0, sample_server.MAX_HOSTS + 1):
        with pytest.raises(ValueError, match="hosts"):
            SampleServer(hosts=hosts)


def test_hosts_fixed_port_taken_on_a_later_address_fails_cleanly():
    blocker = socket.socket()
    blocker.bind(("127.0.0.2", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        with pytest.raises(OSError):
            SampleServer(host="127.0.0.1", port=port, hosts=3).start()
        with SampleServer(host="127.0.0.1", port=port) as srv:  # 127.0.0.1:port was let go
            assert srv.base_url == f"http://127.0.0.1:{port}"
    finally:
        blocker.close()


def test_hosts_port_zero_retries_when_a_later_address_has_it_taken(monkeypatch):
    real, failed = sample_server.web.TCPSite, []

    class OnceTaken(real):  # 127.0.0.2 refuses the first port it is given
        async def start(self):
            if self._host == "127.0.0.2" and not failed:
                failed.append(self._port)
                await super().start()  # registered, then the bind fails as a taken port does
                self._server.close()
                self._server = None
                raise OSError(sample_server.errno.EADDRINUSE, "Address already in use")
            await super().start()

    monkeypatch.setattr(sample_server.web, "TCPSite", OnceTaken)
    with SampleServer(hosts=3) as srv:
        assert len(failed) == 1 and srv.base_url.endswith(f":{srv._bound_port}")
        assert len({u.rsplit(":", 1)[1] for u in srv.base_urls}) == 1
        for k in range(3):
            assert get(srv, "/status/200", host=k)[0] == 200


def test_web_fate_is_the_same_on_every_host_and_host_count(image_dir):
    """A URL's fate depends on its path and query only: the same responses from a 1-host server and
    from any host of a 3-host one (attempts are counted per path+query on all hosts together)."""
    paths = [f"/web/{WEB_NAME}?i={k}" for k in range(60)]
    paths = [p for p in paths if web_fate(0, p).kind not in ("truncated", "slow")]
    answers = []
    for hosts in (1, 3):
        with SampleServer(str(image_dir), web_latency_ms=0.2, hosts=hosts) as srv:
            answers.append([get(srv, p, host=k % hosts)[0::2] for k, p in enumerate(paths)])
            if hosts == 3:
                path = web_url("not_found")
                assert [get(srv, path, host=k)[0] for k in range(3)] == [404, 404, 404]
                path = web_url("optout")
                assert {get(srv, path, host=k)[1]["x-robots-tag"] for k in range(3)} == {"noai"}
                path = web_url("server_error", fail_attempts=1)
                assert [get(srv, path, host=k)[0] for k in (2, 0)] == [500, 200]  # 2nd attempt, other host
                seen = {p for p in paths if web_fate(0, p).kind == "not_found"} | {web_url("not_found")}
                assert srv.web_stats()["urls"]["not_found"] == len(seen)  # a URL once, whatever the host
    assert answers[0] == answers[1]


def test_cli_hosts_listening_line(image_dir):
    proc = start_cli(image_dir, "--hosts", "3")
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("LISTENING http://127.0.0.1:") and " HOSTS 3 " in line
        bases = parse_listening_line(line)
        port = bases[0].rsplit(":", 1)[1]
        assert line.split()[1] == bases[0] and bases == [f"http://127.0.0.{k}:{port}" for k in (1, 2, 3)]
        name = good_image_names(N_GOOD)[0]
        with urllib.request.urlopen(bases[2] + f"/img/{name}", timeout=5) as resp:
            assert resp.read() == (image_dir / name).read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
    assert parse_listening_line("LISTENING http://127.0.0.1:5") == ["http://127.0.0.1:5"]
    for bad in ("", "LISTEN http://x", "LISTENING http://a:1 HOSTS 0", "LISTENING http://a:1 HOSTS 2 http://a:1",
                "LISTENING http://a:1 HOSTS 2 http://b:1 http://a:1"):
        with pytest.raises(ValueError):
            parse_listening_line(bad)


def test_web_host_zipf_shares():
    w = web_host_weights(64)
    assert abs(sum(w) - 1) < 1e-12 and w == sorted(w, reverse=True)
    assert abs(w[0] - 0.2108) < 1e-4 and abs(w[0] / w[1] - 2) < 1e-9  # 1 / H_64; host k weighs 1/(k+1)
    assert web_host_weights(4, exponent=0) == [0.25] * 4
    n = 8000
    hosts = [web_host(0, k, 64) for k in range(n)]
    assert set(hosts) == set(range(64))
    sd = (n * w[0] * (1 - w[0])) ** 0.5
    assert abs(hosts.count(0) - n * w[0]) <= 4 * sd
    assert hosts.count(0) > hosts.count(1) > hosts.count(10)
    assert [web_host(0, k, 64) for k in range(n)] == hosts  # per index: deterministic, any list length
    assert [web_host(1, k, 64) for k in range(n)] != hosts
    assert {web_host(0, k, 1) for k in range(100)} == {0}
    with pytest.raises(ValueError):
        web_host_weights(0)
