"""``imgcurate serve``: the aiohttp search app over a real index of a tiny snapshot-like Parquet file
(real JPEGs, embedded with the tiny random-weight CLIP), queried over loopback HTTP."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

N = 24


def _image(seed: int) -> bytes:
    """A JPEG unlike the others: a seeded colour gradient with seeded noise, of a seeded size."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    h, w = 40 + 8 * (seed % 5), 48 + 8 * (seed % 7)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.rand(3) * 255
    slope = (rng.rand(3, 2) - 0.5) * 400
    px = base[:, None, None] + slope[:, 0, None, None] * yy + slope[:, 1, None, None] * xx
    px = np.clip(px.transpose(1, 2, 0) + rng.rand(h, w, 3) * 60, 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def snapshot_index(tmp_path_factory, ray_session):
    pytest.importorskip("open_clip")
    pytest.importorskip("faiss")
    from operators.clip import ClipEmbedder
    from operators.index import IndexConfig, build_index
    from tests.helpers import image_batch
    from tests.test_coreset import tiny_clip_config

    work = tmp_path_factory.mktemp("serve")
    cfg = tiny_clip_config()
    images = [_image(s) for s in range(N)]
    captions = [f"picture number {i}" for i in range(N)]
    emb = ClipEmbedder(cfg)(image_batch(images, [[c] for c in captions])).column("clip_image_embedding")
    ids = [f"sample-{i:03d}" for i in range(N)]
    table = pa.table({
        "sample_id": pa.array(ids, pa.string()),
        "url": pa.array([f"https://example.org/img/{i}.jpg" for i in range(N)], pa.string()),
        "caption": pa.array(captions, pa.string()),
        "image": pa.array(images, pa.binary()),
        "clip_image_embedding": emb,
    })
    src = work / "part-00000.parquet"
    pq.write_table(table, src, row_group_size=10)  # several row groups: rows are read by group
    out = work / "index"
    m = build_index([str(src)], "clip_image_embedding", str(out), IndexConfig(queries=10, latency_queries=5),
                    model=cfg.model_dump(mode="json"))
    return {"index": str(out), "ids": ids, "images": images, "captions": captions, "manifest": m,
            "work": work}


def _run(app, body):
    """Run ``body(client)`` against ``app`` served on a free 127.0.0.1 port (aiohttp's test server)."""
    from aiohttp.test_utils import TestClient, TestServer

    async def main():
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            assert client.host == "127.0.0.1"
            return await body(client)

    return asyncio.run(main())


def test_search_page_api_and_thumbnails(snapshot_index):
    import aiohttp
    from PIL import Image

    from jobs.serve import make_app

    ids, images = snapshot_index["ids"], snapshot_index["images"]
    app = make_app(snapshot_index["index"], k_max=20)

    async def body(client):
        r = await client.get("/")
        html = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
        assert "<form" in html and 'type="file"' in html and 'id="text"' in html and 'max="20"' in html
        assert "http://" not in html.replace("https?:", "") and "<link" not in html  # no external assets

        r = await client.get("/healthz")
        h = await r.json()
        assert h["ok"] is True and h["index"] == snapshot_index["manifest"]["type"] and h["vectors"] == N
        assert h["model_loaded"] is False  # loaded lazily, at the first text or image query

        # a text query (loads the model) while /healthz keeps answering: the work runs off the loop
        text_req = client.post("/api/search", json={"text": "a picture", "k": 5})
        r, hr = await asyncio.gather(text_req, client.get("/healthz"))
        assert hr.status == 200
        got = await r.json()
        assert r.status == 200, got
        assert got["query"] == {"text": "a picture"} and len(got["results"]) == 5
        for hit in got["results"]:
            i = ids.index(hit["id"])
            assert hit["url"] == f"https://example.org/img/{i}.jpg"
            assert hit["caption"] == snapshot_index["captions"][i]
            assert hit["thumb"].startswith("/thumb/") and isinstance(hit["score"], float)
        scores = [hit["score"] for hit in got["results"]]
        assert scores == sorted(scores, reverse=True)
        assert (await (await client.get("/healthz")).json())["model_loaded"] is True

        # image queries (multipart): each planted image is its own nearest neighbour
        for i in (0, 7, N - 1):
            form = aiohttp.FormData()
            form.add_field("image", images[i], filename=f"q{i}.jpg", content_type="image/jpeg")
            form.add_field("k", "3")
            r = await client.post("/api/search", data=form)
            got = await r.json()
            assert r.status == 200, got
            assert got["query"] == {"image": f"q{i}.jpg", "bytes": len(images[i])}
            assert len(got["results"]) == 3 and got["results"][0]["id"] == ids[i], got["results"]
            top, second = got["results"][0]["score"], got["results"][1]["score"]
            assert top >= 0.9995 and top > second  # (random weights: neighbours can be at 0.999)

        # a vector query: the stored embedding of row 5
        vec = snapshot_index["manifest"]  # its dim
        r = await client.post("/api/search", json={"vector": [float(v) for v in _row_vector(snapshot_index, 5)],
                                                   "k": 1})
        got = await r.json()
        assert r.status == 200 and [x["id"] for x in got["results"]] == [ids[5]], got
        assert got["query"] == {"vector": vec["dim"]}

        # the thumbnail of the top hit: a JPEG of at most 256 px a side, of that row's image
        thumb = got["results"][0]["thumb"]
        r = await client.get(thumb)
        blob = await r.read()
        assert r.status == 200 and r.content_type == "image/jpeg"
        im = Image.open(io.BytesIO(blob))
        im.load()
        assert im.format == "JPEG" and max(im.size) <= 256
        assert im.size == Image.open(io.BytesIO(images[5])).size  # small sources are not enlarged
        assert (await client.get("/thumb/999999")).status == 404
        assert (await client.get("/thumb/abc")).status == 404

        # bad requests: 400 with an error, never 500
        bad = [
            {"json": {}},
            {"json": {"text": ""}},
            {"json": {"text": "x", "k": 0}},
            {"json": {"text": "x", "k": 21}},
            {"json": {"text": "x", "k": "many"}},
            {"json": {"vector": [1.0, 2.0]}},
            {"json": {"vector": ["a"] * vec["dim"]}},
            {"json": {"text": "x", "vector": [0.0] * vec["dim"]}},
            {"json": [1, 2]},
            {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
        ]
        form = aiohttp.FormData()
        form.add_field("image", b"this is not an image", filename="x.jpg", content_type="image/jpeg")
        bad.append({"data": form})
        form = aiohttp.FormData()
        form.add_field("k", "3")
        bad.append({"data": form})
        for kw in bad:
            r = await client.post("/api/search", **kw)
            got = await r.json()
            assert r.status == 400 and isinstance(got.get("error"), str) and got["error"], (kw, r.status, got)
        r = await client.get("/api/search")
        assert r.status == 405 and "error" in await r.json()

    _run(app, body)


def _row_vector(snapshot_index, row: int) -> np.ndarray:
    t = pq.read_table(snapshot_index["work"] / "part-00000.parquet", columns=["clip_image_embedding"])
    return np.asarray(t.column(0)[row].as_py(), np.float32)


def test_thumbnails_404_without_an_image_column(snapshot_index, tmp_path):
    """An index over rows that keep no images (a snapshot published with images: false)."""
    from jobs.serve import make_app
    from operators.index import IndexConfig, build_index

    t = pq.read_table(snapshot_index["work"] / "part-00000.parquet").drop_columns(["image"])
    src = tmp_path / "part-00000.parquet"
    pq.write_table(t, src)
    build_index([str(src)], "clip_image_embedding", str(tmp_path / "index"), IndexConfig(queries=10,
                                                                                        latency_queries=5))
    app = make_app(str(tmp_path / "index"))

    async def body(client):
        r = await client.post("/api/search", json={"vector": _row_vector(snapshot_index, 2).tolist(), "k": 2})
        got = await r.json()
        assert r.status == 200 and got["results"][0]["id"] == snapshot_index["ids"][2]
        assert got["results"][0]["thumb"] is None and got["results"][0]["caption"] == "picture number 2"
        assert (await client.get("/thumb/2")).status == 404
        # no model recorded (built without one): a text query is a 400 that says so
        r = await client.post("/api/search", json={"text": "x"})
        assert r.status == 400 and "embedding model" in (await r.json())["error"]
        assert (await (await client.get("/healthz")).json())["images"] is False

    _run(app, body)


def test_cli_parses_serve():
    from jobs.cli import _parser
    from jobs.serve import is_loopback

    a = _parser().parse_args(["serve", "out/snap"])
    assert (a.command, a.snapshot, a.host, a.port, a.column) == ("serve", "out/snap", "127.0.0.1", 8080,
                                                                 "clip_image_embedding")
    a = _parser().parse_args(["serve", "s", "--port", "9000", "--host", "0.0.0.0", "--endpoint-url", "http://x"])
    assert (a.port, a.host, a.endpoint_url) == (9000, "0.0.0.0", "http://x")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")


def test_search_page_in_chromium(snapshot_index, chromium):
    """The served page in a real browser (headless Chromium on 127.0.0.1): a text query shows a grid
    of results, each with its thumbnail."""
    import threading

    from aiohttp import web

    from jobs.serve import make_app
    from tests.conftest import free_port
    from tests.report_helpers import console_errors, screenshot, wait_for

    port = free_port()
    runner = web.AppRunner(make_app(snapshot_index["index"], k_max=20))
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        console_errors(chromium)
        chromium.get(f"http://127.0.0.1:{port}/")
        wait_for(chromium, "document.getElementById('info').textContent.includes('vectors')")
        chromium.find_element("id", "text").send_keys("picture number 3")
        k = int(chromium.find_element("id", "k").get_attribute("value"))
        chromium.find_element("css selector", "button[type=submit]").click()
        wait_for(chromium, "document.querySelectorAll('#grid .card').length > 0", timeout=120)
        cards = chromium.execute_script("return document.querySelectorAll('#grid .card').length")
        assert cards == min(k, N)
        assert chromium.find_element("id", "status").text == f"{cards} result(s)"
        loaded = wait_for(chromium, """(() => { const im = Array.from(document.querySelectorAll('#grid .card img'));
            return im.length && im.every(i => i.complete && i.naturalWidth > 0) ? im.length : 0; })()""")
        assert loaded == cards  # every row has an image: every card shows its thumbnail
        captions = chromium.execute_script(
            "return Array.from(document.querySelectorAll('#grid .meta')).map(m => m.textContent)")
        assert all("picture number" in c for c in captions)
        errors = [e for e in console_errors(chromium) if "favicon.ico" not in e.get("message", "")]
        assert not errors, errors
        screenshot(chromium, "serve-search.png", full_height=False)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
