"""``imgcurate serve SNAPSHOT``: a small HTTP search service over a snapshot's kNN index
(operators/index.py), on aiohttp.web (the framework the loopback sample image server runs on).

Routes:

- ``GET /``: one HTML page (inline CSS and JS, no external assets): a text box, an image upload,
  ``k``, and the results as a grid of thumbnails with caption, score and URL;
- ``POST /api/search``: a JSON body ``{"text": "...", "k": 10}`` or ``{"vector": [...], "k": 10}``,
  or ``multipart/form-data`` with an ``image`` file field (and optional ``k``); answers
  ``{"query": ..., "k": k, "results": [{"id", "score", "url", "caption", "thumb"}]}``. A request
  that cannot be answered (no query, an undecodable image, a vector of the wrong width, ``k``
  outside 1..``k_max``, malformed JSON) gets 400 ``{"error": "..."}``;
- ``GET /thumb/{index_id}``: a JPEG thumbnail (longest side 256) of the snapshot row's ``image``
  bytes; 404 when the snapshot keeps no images or the id is unknown (or removed);
- ``GET /healthz``: ``{"ok": true, "index": <type>, "vectors": n, ...}``.

The query model (``QueryEmbedder``: the CLIP config the index records) is loaded at the first
text or image query, once, under an ``asyncio.Lock`` that also serializes its use. Blocking work
(faiss, torch, Parquet reads, PIL) runs in a small thread pool (``loop.run_in_executor``), so the
event loop keeps answering while a query is embedded or a shard is read.

Rows are read by (id part, row) as ``rows_of_hits`` does, but one row group at a time (the group
holding the row), with each source file's footer cached, so a thumbnail does not read a shard's
whole image column. Thumbnails are kept in a small LRU cache (index ids are never reused).

It binds ``127.0.0.1`` by default; another address only when ``--host`` names it.
"""

from __future__ import annotations

import asyncio
import bisect
import io
import ipaddress
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from aiohttp import web

from operators.index import LoadedIndex, QueryEmbedder, load_index, resolve
from operators.storage import StorageConfig, fsspec_fs

log = logging.getLogger(__name__)

THUMB_SIDE = 256
THUMB_CACHE = 512  # thumbnails kept (JPEG bytes, ~10 KB each)
MAX_IMAGE_BYTES = 20 * 2 ** 20  # an uploaded query image
MAX_BODY_BYTES = 4 * 2 ** 20  # a JSON body (a vector of a few thousand floats is ~100 KB)
RESULT_COLUMNS = ["url", "caption"]
DEFAULT_K = 10


class BadRequest(ValueError):
    """A request that cannot be answered: 400 with its message."""


class RowReader:
    """Source rows of index ids, read one row group at a time (footers cached per source)."""

    def __init__(self, li: LoadedIndex):
        self.li = li
        self._meta: dict[str, tuple[pq.FileMetaData, list[int], set[str]]] = {}
        self._lock = threading.Lock()

    def _footer(self, source: str, fh) -> tuple[pq.FileMetaData, list[int], set[str]]:
        with self._lock:
            got = self._meta.get(source)
        if got is None:
            md = pq.ParquetFile(fh).metadata
            starts, s = [], 0
            for g in range(md.num_row_groups):
                starts.append(s)
                s += md.row_group(g).num_rows
            got = (md, starts, set(md.schema.to_arrow_schema().names))
            with self._lock:
                self._meta[source] = got
        return got

    def columns_of(self, source: str) -> set[str]:
        fs, p = fsspec_fs(source, self.li.storage)
        with fs.open(p, "rb") as fh:
            return self._footer(source, fh)[2]

    def rows(self, index_ids: list[int], columns: list[str]) -> list[dict | None]:
        """Per index id, its row's ``columns`` that exist (None for an id the index does not map)."""
        out: list[dict | None] = [None] * len(index_ids)
        by_source: dict[str, list[tuple[int, int]]] = {}
        for n, i in enumerate(index_ids):
            where = self.li.locate(int(i)) if int(i) >= 0 else None
            if where is not None:
                by_source.setdefault(where[0]["source"], []).append((n, where[1]))
        for source, want in by_source.items():
            fs, p = fsspec_fs(source, self.li.storage)
            with fs.open(p, "rb") as fh:
                md, starts, names = self._footer(source, fh)
                cols = [c for c in columns if c in names]
                pf = pq.ParquetFile(fh, metadata=md)
                by_group: dict[int, list[tuple[int, int]]] = {}
                for n, row in want:
                    g = bisect.bisect_right(starts, row) - 1
                    by_group.setdefault(g, []).append((n, row - starts[g]))
                for g, items in by_group.items():
                    if not cols:
                        for n, _ in items:
                            out[n] = {}
                        continue
                    t = pf.read_row_group(g, columns=cols)
                    for (n, _), r in zip(items, t.take(pa.array([r for _, r in items])).to_pylist()):
                        out[n] = r
        return out


def thumbnail(blob: bytes, side: int = THUMB_SIDE) -> bytes:
    """A JPEG of at most ``side`` pixels a side (ValueError when the bytes are no image)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
            else:
                im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
            return buf.getvalue()
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds (and DecompressionBombError)
        raise ValueError(f"the image cannot be decoded: {type(exc).__name__}") from None


class SearchService:
    """The state behind the routes: the loaded index, its rows, the lazily loaded query model."""

    def __init__(self, path: str, storage: StorageConfig | None, column: str, k_max: int, workers: int = 4):
        if k_max < 1:
            raise ValueError("k_max must be at least 1")
        self.index_dir, self.snapshot = resolve(path, storage, column)
        self.storage = storage
        self.li = load_index(self.index_dir, storage)
        self.dim = int(self.li.manifest["dim"])
        self.k_max = int(k_max)
        self.reader = RowReader(self.li)
        parts = self.li.manifest.get("id_parts") or []
        self.has_images = bool(parts) and "image" in self.reader.columns_of(parts[0]["source"])
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgcurate-serve")
        self._embedder: QueryEmbedder | None = None
        self._embedder_error: str | None = None
        self._model_lock: asyncio.Lock | None = None
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()

    async def blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def embed(self, kind: str, items: list) -> np.ndarray:
        """Texts or image bytes embedded with the index's model (loaded here the first time)."""
        if self._model_lock is None:
            self._model_lock = asyncio.Lock()
        async with self._model_lock:
            if self._embedder is None:
                if self._embedder_error is not None:
                    raise BadRequest(self._embedder_error)
                try:
                    self._embedder = await self.blocking(QueryEmbedder, self.li.manifest, self.storage)
                except ValueError as exc:  # the index records no model, or one of another width
                    self._embedder_error = f"{exc}"
                    raise BadRequest(self._embedder_error) from None
                log.info("serve: query model loaded (%d dims)", self._embedder.dim)
            fn = self._embedder.text if kind == "text" else self._embedder.images
            try:
                return await self.blocking(fn, items)
            except ValueError as exc:  # an undecodable image
                raise BadRequest(str(exc)) from None

    def _search_rows(self, q: np.ndarray, k: int) -> list[dict]:
        hits = self.li.search(q, k)[0]
        rows = self.reader.rows([h["index_id"] for h in hits], RESULT_COLUMNS)
        return [{"id": h["id"], "score": round(float(h["score"]), 6), "url": (r or {}).get("url"),
                 "caption": (r or {}).get("caption"),
                 "thumb": f"/thumb/{h['index_id']}" if self.has_images else None}
                for h, r in zip(hits, rows)]

    async def search(self, q: np.ndarray, k: int) -> list[dict]:
        return await self.blocking(self._search_rows, np.asarray(q, np.float32).reshape(1, -1), k)

    def _thumb(self, index_id: int) -> bytes | None:
        got = self._thumbs.get(index_id)
        if got is not None:
            return got
        if self.li.id_of(index_id) is None:  # unknown, removed or without a vector
            return None
        row = self.reader.rows([index_id], ["image"])[0]
        if not row or not row.get("image"):
            return None
        blob = thumbnail(row["image"])
        self._thumbs[index_id] = blob
        while len(self._thumbs) > THUMB_CACHE:
            self._thumbs.popitem(last=False)
        return blob

    async def thumb(self, index_id: int) -> bytes | None:
        return await self.blocking(self._thumb, index_id)

    def health(self) -> dict:
        m = self.li.manifest
        return {"ok": True, "index": m.get("type"), "vectors": int(self.li.index.ntotal), "dim": self.dim,
                "column": m.get("column"), "factory": m.get("factory"),
                "snapshot_version": (self.snapshot or {}).get("version", m.get("snapshot_version")),
                "images": self.has_images, "model_loaded": self._embedder is not None, "k_max": self.k_max}

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


SERVICE = web.AppKey("imgcurate_search", SearchService)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request: web.Request, handler):
    """API errors as JSON: a BadRequest is 400, an HTTP error keeps its status, anything else 500."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return _error(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason if not exc.text or exc.text.startswith(f"{exc.status}:")
                      else exc.text)
    except Exception:  # noqa: BLE001 - logged; the client gets no traceback
        log.exception("serve: %s %s failed", request.method, request.path)
        return _error(500, "internal error (see the server log)")


def _k(value, k_max: int) -> int:
    if value is None or value == "":
        return min(DEFAULT_K, k_max)
    if isinstance(value, bool):
        raise BadRequest("k must be an integer")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise BadRequest(f"k must be an integer, not {value[:40]!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise BadRequest("k must be an integer")
    if not 1 <= value <= k_max:
        raise BadRequest(f"k must be between 1 and {k_max}, not {value}")
    return value


def _vector(value, dim: int) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise BadRequest("vector must be a list of numbers")
    if len(value) != dim:
        raise BadRequest(f"vector has {len(value)} dims, the index {dim}")
    q = np.asarray(value, np.float64)
    if not np.all(np.isfinite(q)) or not np.any(q):
        raise BadRequest("vector must be finite and not all zero")
    return q.astype(np.float32)


async def _read_multipart(request: web.Request) -> dict:
    got: dict = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if part.name == "image":
            buf = bytearray()
            while chunk := await part.read_chunk(2 ** 16):
                buf.extend(chunk)
                if len(buf) > MAX_IMAGE_BYTES:
                    raise BadRequest(f"the image is larger than {MAX_IMAGE_BYTES // 2 ** 20} MiB")
            got["image"] = bytes(buf)
            got["filename"] = part.filename
        elif part.name in ("k", "text"):
            got[part.name] = (await part.read(decode=True)).decode("utf-8", "replace")
            if len(got[part.name]) > 10_000:
                raise BadRequest(f"field {part.name} is too long")
        else:
            await part.release()
    return got


async def api_search(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    if request.content_type.startswith("multipart/"):
        body = await _read_multipart(request)
    else:
        try:
            body = json.loads(await request.text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
    k = _k(body.get("k"), svc.k_max)
    given = [f for f in ("text", "vector", "image") if body.get(f) not in (None, "", b"")]
    if not given:
        if "image" in body:
            raise BadRequest("the image is empty")
        raise BadRequest('no query: send {"text": ...}, {"vector": [...]} or a multipart "image" file')
    if len(given) > 1:
        raise BadRequest(f"one query at a time, got {' and '.join(given)}")
    if given[0] == "text":
        text = body["text"]
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("text must be a non-empty string")
        q = (await svc.embed("text", [text]))[0]
        query = {"text": text}
    elif given[0] == "vector":
        q = _vector(body["vector"], svc.dim)
        query = {"vector": svc.dim}
    else:
        q = (await svc.embed("image", [body["image"]]))[0]
        query = {"image": body.get("filename") or "upload", "bytes": len(body["image"])}
    if q.shape[-1] != svc.dim:
        raise BadRequest(f"the query has {q.shape[-1]} dims, the index {svc.dim}")
    results = await svc.search(q, k)
    return web.json_response({"query": query, "k": k, "results": results})


async def thumb(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    if not svc.has_images:
        return _error(404, "this snapshot keeps no images")
    raw = request.match_info["index_id"]
    if not raw.isdigit() or len(raw) > 18:
        return _error(404, f"no such id: {raw[:40]}")
    try:
        blob = await svc.thumb(int(raw))
    except ValueError as exc:
        return _error(404, str(exc))
    if blob is None:
        return _error(404, f"no image for id {raw}")
    return web.Response(body=blob, content_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].health())


async def page(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    html = PAGE.replace("{{K_MAX}}", str(svc.k_max)).replace("{{K}}", str(min(DEFAULT_K, svc.k_max)))
    return web.Response(text=html, content_type="text/html", headers={
        "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
                                   "script-src 'unsafe-inline'; connect-src 'self'; form-action 'self'",
        "X-Content-Type-Options": "nosniff"})


def make_app(index_path_or_snapshot: str, storage: StorageConfig | None = None,
             column: str = "clip_image_embedding", k_max: int = 100) -> web.Application:
    """The search app over an index dir, a snapshot dir or a run output (its latest snapshot's
    index of ``column``); the index is loaded here, the query model at the first query."""
    svc = SearchService(index_path_or_snapshot, storage, column, k_max)
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = svc
    app.router.add_get("/", page)
    app.router.add_post("/api/search", api_search)
    app.router.add_get("/thumb/{index_id}", thumb)
    app.router.add_get("/healthz", healthz)

    async def _close(app: web.Application) -> None:
        app[SERVICE].close()

    app.on_cleanup.append(_close)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(path: str, host: str = "127.0.0.1", port: int = 8080, storage: StorageConfig | None = None,
          column: str = "clip_image_embedding", k_max: int = 100) -> None:
    """Serve the search app until interrupted (loopback unless ``host`` says otherwise)."""
    app = make_app(path, storage, column, k_max)
    health = app[SERVICE].health()
    if not is_loopback(host):
        log.warning("serve: listening on %s, reachable from other machines (no authentication)", host)
    shown = f"[{host}]" if ":" in host else host
    print(f"imgcurate serve: {health['index']} index, {health['vectors']} vectors of {health['dim']} dims "
          f"({app[SERVICE].index_dir}) on http://{shown}:{port}/", flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>imgcurate search</title>
<style>
 body{font-family:system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
 header{background:#1f2933;color:#fff;padding:12px 20px}
 header h1{font-size:18px;margin:0;display:inline}
 header span{opacity:.7;font-size:13px;margin-left:12px}
 form{display:flex;flex-wrap:wrap;gap:10px;align-items:center;padding:14px 20px;background:#fff;
      border-bottom:1px solid #ddd}
 input[type=text]{flex:1 1 300px;padding:8px;font-size:15px}
 input[type=number]{width:70px;padding:7px}
 button{padding:8px 18px;font-size:15px;cursor:pointer}
 #status{padding:8px 20px;color:#555;font-size:14px;min-height:18px}
 #status.err{color:#b00020}
 #grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:14px;padding:0 20px 30px}
 .card{background:#fff;border:1px solid #ddd;border-radius:6px;overflow:hidden;display:flex;flex-direction:column}
 .card .img{height:200px;background:#eee;display:flex;align-items:center;justify-content:center}
 .card img{max-width:100%;max-height:200px}
 .card .meta{padding:8px;font-size:13px;word-break:break-word}
 .score{font-weight:600}
 .id{color:#777;font-size:11px}
 .card a{color:#0b61a4}
</style></head>
<body>
<header><h1>imgcurate search</h1><span id="info"></span></header>
<form id="f">
 <input type="text" id="text" name="text" placeholder="describe an image...">
 <label>or image <input type="file" id="image" name="image" accept="image/*"></label>
 <label>k <input type="number" id="k" name="k" min="1" max="{{K_MAX}}" value="{{K}}"></label>
 <button type="submit">Search</button>
</form>
<div id="status"></div>
<div id="grid"></div>
<script>
(function(){
 var f=document.getElementById('f'), st=document.getElementById('status'), grid=document.getElementById('grid');
 function status(msg, err){st.textContent=msg; st.className=err?'err':'';}
 function el(tag, cls, text){var e=document.createElement(tag); if(cls) e.className=cls;
   if(text!==undefined&&text!==null) e.textContent=String(text); return e;}
 fetch('/healthz').then(function(r){return r.json();}).then(function(h){
   document.getElementById('info').textContent=h.index+' index, '+h.vectors+' vectors';}).catch(function(){});
 function render(data){
   grid.textContent='';
   data.results.forEach(function(r, i){
     var c=el('div','card'), box=el('div','img');
     if(r.thumb){var im=document.createElement('img'); im.loading='lazy'; im.alt=r.caption||r.id;
       im.src=r.thumb; im.onerror=function(){im.remove();}; box.appendChild(im);}
     c.appendChild(box);
     var m=el('div','meta');
     m.appendChild(el('div','score','#'+(i+1)+'  '+Number(r.score).toFixed(4)));
     if(r.caption) m.appendChild(el('div','',r.caption));
     if(r.url){var u=String(r.url);
       if(/^https?:\\/\\//i.test(u)){var a=el('a','',u); a.href=u; a.target='_blank'; a.rel='noopener noreferrer';
         m.appendChild(a);} else {m.appendChild(el('div','',u));}}
     m.appendChild(el('div','id',r.id));
     c.appendChild(m); grid.appendChild(c);
   });
   status(data.results.length+' result(s)');
 }
 f.addEventListener('submit', function(ev){
   ev.preventDefault();
   var file=document.getElementById('image').files[0], text=document.getElementById('text').value.trim(),
       k=document.getElementById('k').value, req;
   if(file){var fd=new FormData(); fd.append('image', file); fd.append('k', k);
     req={method:'POST', body:fd};}
   else if(text){req={method:'POST', headers:{'Content-Type':'application/json'},
     body:JSON.stringify({text:text, k:parseInt(k,10)})};}
   else {status('type a text or choose an image', true); return;}
   status('searching...');
   fetch('/api/search', req).then(function(r){return r.json().then(function(d){return [r.ok, d];});})
     .then(function(p){ if(!p[0]) throw new Error(p[1].error||'error'); render(p[1]); })
     .catch(function(e){ status(e.message, true); });
 });
})();
</script>
</body></html>
"""
