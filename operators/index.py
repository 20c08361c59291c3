"""kNN indices (faiss) over embeddings in Parquet: chosen by size and memory, built in parallel Ray
tasks, tuned to a recall target, extended and pruned without retraining.

**Layout** of an index directory (local or ``s3://``; a snapshot's are ``<snapshot>/_index/<column>/``,
whose leading ``_`` keeps the id map's Parquet out of readers of the snapshot dir as a dataset):

- ``index-gNNNN.faiss``: the faiss index (``faiss.write_index``); ``NNNN`` is the generation,
  raised by every add / remove, so a reader of the old ``_INDEX.json`` keeps a consistent file;
- ``ids/part-NNNNN.parquet``: the id map, one part per source file: column ``id`` (string), one row
  per source row, null where the row had no vector or was removed. Index id = the part's
  ``offset`` + the row, so a lookup reads one part (never a global table of the run);
- ``_INDEX.json`` written last (the commit): type, factory string, search parameters, the measured
  recall and latency, the embedding column and model, the id parts with their offsets and sources,
  ``next_id``, and for HNSW the removed ids (``tombstones``: HNSW cannot delete, search skips them).

**The chooser** (``choose``, after autofaiss's ``get_optimal_index_keys_v2``): with ``n`` vectors of
``d`` dims and a budget of ``max_memory_mb`` per build process, the first that fits half the budget
(the other half holds one shard being merged and the training sample): ``Flat`` (exact) up to
``flat_max`` vectors; ``HNSW32`` up to ``hnsw_max`` (it cannot be merged from shards, so its
vectors are added in one process); ``IVF{nlist},Flat``; ``IVF{nlist},SQ8`` (one byte a dimension);
``OPQ{m},IVF{nlist},PQ{m}`` with the largest ``m`` (bytes a vector) that fits. ``nlist`` is the
power of two nearest ``4 * sqrt(n)``, at most ``n / 39`` (faiss's points per centroid). Past that the
build refuses with the memory it would need. ``index_type`` may name a factory string instead.

**The build**: pass 1 (one Ray task per group of files) counts each file's rows and draws the
training sample and the held-out queries (seeded, by row position); the driver trains; pass 2 adds
each group's vectors to a copy of the trained empty index and computes the queries' exact top-k
over the group (so the ground truth costs no extra pass), writing a shard file each time a shard
reaches an eighth of the budget; the driver reads the shards back one at a time and merges their
inverted lists (``merge_from``). Files are streamed in batches (``iter_vectors``) and faiss files go
through local files (``write_index_file`` / ``read_index_file``), never as in-memory byte copies, so
every process (the driver: the index plus one shard; a task: one shard plus a batch) stays within
``max_memory_mb`` whatever the vector count. Each task asks Ray for the memory it plans for.

**Tuning**: ``nprobe`` (IVF) or ``efSearch`` (HNSW) rises through a ladder until recall@k of the
held-out queries (their own id excluded on both sides) reaches ``recall_target``; the latency of
single queries at that setting is measured and compared with ``max_query_ms``. Both figures, and
whether they were met, go into ``_INDEX.json``; a target that is not met is a warning, not a failure.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import logging
import math
import posixpath
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.coreset_target import embedding_matrix
from operators.storage import StorageConfig, fsspec_fs, join, read_json, write_json_atomic

log = logging.getLogger(__name__)

INDEX_MANIFEST = "_INDEX.json"
IDS_DIR = "ids"
VECTORS_DIR = "vectors"
RERANK_FACTOR = 10  # PQ: candidates re-ranked by exact vectors = k x this
SNAPSHOT_INDEX_DIR = "_index"  # "_": Parquet dataset readers of the snapshot dir skip it (pyarrow, Spark)
IVF_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
HNSW_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
PQ_BYTES = (64, 48, 32, 24, 16, 12, 8, 4)
HNSW_M = 32
GT_CHUNK = 32768  # vectors scored against the queries at a time (bounds the score matrix)


class IndexConfig(BaseModel):
    """kNN indices over a snapshot's embeddings (``index:`` in the job config; ``imgcurate index``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="build the indices into each new snapshot (columns that exist)")
    columns: list[str] = Field(default_factory=lambda: ["clip_image_embedding", "clip_text_embedding"],
                               description="embedding columns indexed (one index each; absent ones are skipped)")
    index_type: str = Field("auto", description="auto (the chooser: Flat, HNSW, IVF-Flat, IVF-SQ8, OPQ+IVF+PQ by "
                                                "size and memory) or a faiss index_factory string ({nlist}: the "
                                                "chooser's list count)")
    recall_target: float = Field(0.95, gt=0, le=1, description="recall@k against exact search the search "
                                                               "parameters are tuned to")
    k: int = Field(10, ge=1, description="the k of recall@k")
    max_query_ms: float = Field(50.0, gt=0, description="a single query's latency the tuning must stay within "
                                                        "(recorded; exceeded = warning)")
    max_memory_mb: float = Field(4096, gt=0, description="memory a build process may use (driver-side merge and "
                                                         "each add task); the chooser fits the index in half")
    flat_max: int = Field(20_000, ge=0, description="at most this many vectors: an exact Flat index")
    hnsw_max: int = Field(200_000, ge=0, description="at most this many vectors: HNSW32 (built in one process)")
    queries: int = Field(1000, ge=10, description="held-out queries for recall (drawn from the vectors)")
    latency_queries: int = Field(200, ge=1, description="single queries timed for the latency figure")
    train_rows: int = Field(200_000, ge=1000, description="most training vectors (at least 39 per IVF list)")
    add_rows: int = Field(500_000, ge=1000, description="vectors per add task (files are grouped up to this)")
    num_cpus: float = Field(1, gt=0, description="CPUs per build task")
    seed: int = Field(0, description="seed of the training sample and the queries")

    @model_validator(mode="after")
    def _check(self):
        if self.index_type != "auto":
            import faiss

            try:
                faiss.index_factory(64, self.index_type.replace("{nlist}", "16"), faiss.METRIC_INNER_PRODUCT)
            except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError with its message
                raise ValueError(f"index.index_type {self.index_type!r} is not a faiss factory string: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
        return self


@dataclass
class Choice:
    kind: str  # flat | hnsw | ivf_flat | ivf_sq8 | ivf_pq | custom
    factory: str
    nlist: int | None = None
    bytes_per_vector: float = 0.0
    reason: str = ""


def nlist_for(n: int) -> int:
    """The power of two nearest 4 sqrt(n), at most n / 39 (faiss wants 39 training points a list)."""
    want = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    cap = 2 ** int(math.log2(n // 39)) if n >= 39 else 1
    return int(max(1, min(want, cap, 1 << 18)))


def choose(n: int, d: int, cfg: IndexConfig) -> Choice:
    """The index type for ``n`` vectors of ``d`` dims (see the module docstring)."""
    budget = cfg.max_memory_mb * 2 ** 20 / 2
    if cfg.index_type != "auto":
        nl = nlist_for(n)
        return Choice("custom", cfg.index_type.replace("{nlist}", str(nl)), nl, 4 * d + 8, "index.index_type")
    flat = 4 * d + 8
    if n <= cfg.flat_max and n * flat <= budget:
        return Choice("flat", "IDMap2,Flat", None, flat, f"n <= flat_max ({cfg.flat_max})")
    hnsw = 4 * d + 8 * HNSW_M + 8
    if n <= cfg.hnsw_max and n * hnsw * 1.1 <= budget:
        return Choice("hnsw", f"IDMap2,HNSW{HNSW_M}", None, hnsw, f"n <= hnsw_max ({cfg.hnsw_max})")
    nl = nlist_for(n)
    centroids = nl * d * 4
    if n * flat + centroids <= budget:
        return Choice("ivf_flat", f"IVF{nl},Flat", nl, flat, "float vectors fit the memory budget")
    if n * (d + 8) + centroids <= budget:
        return Choice("ivf_sq8", f"IVF{nl},SQ8", nl, d + 8, "8-bit scalar codes fit the memory budget")
    for m in PQ_BYTES:
        if m < d and d % m == 0 and n * (m + 8) + centroids + d * d * 4 <= budget:
            nbits = 8 if n >= 39 * 256 else max(4, int(math.log2(max(n // 39, 16))))
            pq_ = f"PQ{m}" if nbits == 8 else f"PQ{m}x{nbits}"
            return Choice("ivf_pq", f"OPQ{m},IVF{nl},{pq_}", nl, m + 8, f"{m}-byte PQ codes fit the memory budget")
    smallest = min((m for m in PQ_BYTES if m < d and d % m == 0), default=d)
    need = (n * (smallest + 8) + centroids) * 2 / 2 ** 20
    raise ValueError(f"index: {n} vectors of {d} dims do not fit index.max_memory_mb={cfg.max_memory_mb:g} even as "
                     f"the smallest PQ codes; it needs about {need:,.0f} MB")


# --- reading vectors ---------------------------------------------------------------------------------
def _read(path: str, columns: list[str], storage: StorageConfig | None) -> pa.Table:
    fs, p = fsspec_fs(path, storage)
    with fs.open(p, "rb") as fh:
        return pq.read_table(fh, columns=columns)


def _rows_of(path: str, storage: StorageConfig | None) -> int:
    fs, p = fsspec_fs(path, storage)
    with fs.open(p, "rb") as fh:
        return pq.ParquetFile(fh).metadata.num_rows


def batch_rows_for(d: int, mem_bytes: int) -> int:
    """Rows read at a time: a few copies of a batch (Arrow, float32, normalized) stay within ~5 %
    of the memory budget."""
    return int(min(65536, max(1024, mem_bytes * 0.05 // max(1, 4 * d))))


def iter_vectors(path: str, column: str, id_column: str, storage: StorageConfig | None, batch_rows: int):
    """Stream one Parquet file in batches: ``(first row, ids of the batch, rows with a vector
    (relative to the batch), their float32 vectors L2-normalized)``. A file of any size is read in
    bounded memory."""
    fs, p = fsspec_fs(path, storage)
    with fs.open(p, "rb") as fh:
        pf = pq.ParquetFile(fh)
        start = 0
        if pf.metadata.num_rows == 0:
            return
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[column, id_column]):
            ids = batch.column(id_column).cast(pa.string()).to_pylist()
            valid, x = embedding_matrix(batch.column(column))
            rows = np.flatnonzero(valid)
            if len(rows):
                norm = np.sqrt(np.einsum("ij,ij->i", x, x))
                ok = np.isfinite(norm) & (norm > 0)
                ok &= np.fromiter((ids[r] is not None for r in rows), bool, len(rows))
                if not ok.all():
                    rows, x, norm = rows[ok], x[ok], norm[ok]
                x /= norm[:, None]
            yield start, ids, rows.astype(np.int64), np.ascontiguousarray(x, np.float32)
            start += len(ids)
            del batch, x


def _seeded_pick(file_index: int, rows: np.ndarray, rate: float, seed: int, salt: int, start: int = 0
                 ) -> np.ndarray:
    """A seeded draw of rows at ``rate``, the same for the same file position, row and seed (a
    batch at ``start`` draws as if the file were read at once)."""
    if rate >= 1:
        return np.ones(len(rows), bool)
    rng = np.random.default_rng([seed, salt, file_index, start])
    return rng.random(len(rows)) < rate


def _sample_task(group: list[tuple[int, str]], column: str, id_column: str, storage, train_rate: float,
                 query_rate: float, seed: int, batch_rows: int):
    out = []
    for j, path in group:
        nrows = nvec = 0
        dim, train, queries, qrows = None, [], [], []
        for start, ids, rows, x in iter_vectors(path, column, id_column, storage, batch_rows):
            nrows += len(ids)
            nvec += len(rows)
            if len(rows):
                dim = x.shape[1]
            pick_q = _seeded_pick(j, rows, query_rate, seed, 1, start)
            pick_t = _seeded_pick(j, rows, train_rate, seed, 2, start) & ~pick_q
            train.append(x[pick_t])
            queries.append(x[pick_q])
            qrows.append(start + rows[pick_q])
        out.append({"file": j, "rows": nrows, "vectors": nvec, "dim": dim,
                    "train": np.concatenate(train) if train else None,
                    "queries": np.concatenate(queries) if queries else None,
                    "query_rows": np.concatenate(qrows) if qrows else np.zeros(0, np.int64)})
    return out


class _TopK:
    """The queries' exact top k over the vectors seen so far (a query is not its own neighbour)."""

    def __init__(self, queries: np.ndarray, query_ids: np.ndarray, k: int):
        self.q, self.qi, self.k = queries, query_ids, k
        self.s = np.full((len(queries), k), -np.inf, np.float32)
        self.i = np.full((len(queries), k), -1, np.int64)

    def update(self, x: np.ndarray, index_ids: np.ndarray) -> None:
        if not len(self.q) or not len(x):
            return
        for c in range(0, len(x), GT_CHUNK):
            xc, ic = x[c:c + GT_CHUNK], index_ids[c:c + GT_CHUNK]
            s = self.q @ xc.T
            pos = np.minimum(np.searchsorted(ic, self.qi), len(ic) - 1)
            own = ic[pos] == self.qi
            s[np.flatnonzero(own), pos[own]] = -np.inf
            kk = min(self.k, s.shape[1])
            top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            cand_s = np.concatenate([self.s, np.take_along_axis(s, top, 1)], 1)
            cand_i = np.concatenate([self.i, ic[top]], 1)
            order = np.argsort(-cand_s, axis=1, kind="stable")[:, :self.k]
            self.s, self.i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)


def _open_write(path: str, storage):
    fs, p = fsspec_fs(path, storage)
    fs.makedirs(posixpath.dirname(p), exist_ok=True)
    return fs.open(p, "wb")


def _add_task(group: list[tuple[int, str, int]], column: str, id_column: str, storage, empty: bytes | None,
              queries: np.ndarray, query_ids: np.ndarray, k: int, ids_dir: str, return_vectors: bool,
              vectors_dir: str | None = None, shard_dir: str | None = None, shard_rows: int = 1 << 62,
              batch_rows: int = 65536):
    """Add the group's vectors (index id = offset + row) to copies of the trained empty index, write
    the id map parts, and return the queries' exact top k over the group, and the shard index files
    (each at most ``shard_rows`` vectors, written under ``shard_dir``) or, for Flat / HNSW, the vectors.
    Files are streamed in batches, so the task's memory is one shard plus a batch."""
    import faiss

    gt = _TopK(queries, query_ids, k)
    keep_x, keep_i, parts, shards = [], [], [], []
    shard = None

    def flush():
        nonlocal shard
        if shard is not None and shard.ntotal:
            name = f"shard-{group[0][0]:05d}-{len(shards):04d}.faiss"
            shards.append({"path": join(shard_dir, name), "vectors": int(shard.ntotal),
                           "bytes": write_index_file(shard, join(shard_dir, name), storage)})
        shard = None

    for j, path, offset in group:
        name = f"part-{j:05d}.parquet"
        n_rows = n_vec = 0
        writer = None
        with _open_write(join(ids_dir, name), storage) as id_fh, \
                (_open_write(join(vectors_dir, f"part-{j:05d}.f32"), storage) if vectors_dir is not None
                 else contextlib.nullcontext()) as vec_fh:
            for start, ids, rows, x in iter_vectors(path, column, id_column, storage, batch_rows):
                mask = np.zeros(len(ids), bool)
                mask[rows] = True
                batch = pa.table({"id": pa.array([v if m else None for v, m in zip(ids, mask)], pa.string())})
                if writer is None:
                    writer = pq.ParquetWriter(id_fh, batch.schema)
                writer.write_table(batch)
                if vectors_dir is not None:  # exact vectors for the PQ re-rank, row-aligned with the source
                    full = np.zeros((len(ids), queries.shape[1]), np.float32)
                    full[rows] = x
                    vec_fh.write(full.tobytes())
                    del full
                index_ids = offset + start + rows
                n_rows += len(ids)
                n_vec += len(rows)
                gt.update(x, index_ids)
                if not len(rows):
                    continue
                if return_vectors:
                    keep_x.append(x)
                    keep_i.append(index_ids)
                    continue
                pos = 0
                while pos < len(x):  # a shard full at shard_rows is written out and a new one begun
                    if shard is None:
                        shard = faiss.deserialize_index(np.frombuffer(empty, np.uint8))
                    room = int(shard_rows - shard.ntotal)
                    shard.add_with_ids(x[pos:pos + room], index_ids[pos:pos + room])
                    pos += room
                    if shard.ntotal >= shard_rows:
                        flush()
            if writer is None:
                writer = pq.ParquetWriter(id_fh, pa.schema([("id", pa.string())]))
            writer.close()
        parts.append({"path": f"{IDS_DIR}/{name}", "offset": int(offset), "rows": n_rows, "source": path,
                      "vectors": int(n_vec)})
        if vectors_dir is not None:
            parts[-1]["vectors_path"] = f"{VECTORS_DIR}/part-{j:05d}.f32"
    flush()
    result = {"parts": parts, "gt_scores": gt.s, "gt_ids": gt.i, "shards": shards}
    if return_vectors:
        result["vectors"] = np.concatenate(keep_x) if keep_x else None
        result["ids"] = np.concatenate(keep_i) if keep_i else None
    return result


# --- search parameters ---------------------------------------------------------------------------------
def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


def _hnsw(index):
    import faiss

    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return inner if hasattr(inner, "hnsw") else None


def set_params(index, params: dict) -> None:
    ivf = _ivf(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
    h = _hnsw(index)
    if h is not None and "efSearch" in params:
        h.hnsw.efSearch = int(params["efSearch"])


def _ladder(index) -> tuple[str | None, list[int]]:
    ivf = _ivf(index)
    if ivf is not None:
        return "nprobe", [v for v in IVF_LADDER if v < ivf.nlist] + [ivf.nlist]
    if _hnsw(index) is not None:
        return "efSearch", list(HNSW_LADDER)
    return None, [0]


def raw_search(index, queries: np.ndarray, k: int, tombstones: np.ndarray | None = None):
    import faiss

    q = np.ascontiguousarray(queries, np.float32)
    if tombstones is not None and len(tombstones):
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(tombstones, np.int64)))
        return index.search(q, k, params=faiss.SearchParameters(sel=sel))
    return index.search(q, k)


class Reranker:
    """Exact vectors by index id, from the row-aligned ``vectors/part-NNNNN.f32`` files (memory-mapped;
    parts on object storage are copied to a local cache once): PQ's candidates are re-ranked with
    them, so the index's memory holds only the codes while the recall is that of exact scoring."""

    def __init__(self, path: str, parts: list[dict], dim: int, storage: StorageConfig | None = None):
        self.path, self.parts, self.dim, self.storage = path, parts, dim, storage
        self._maps: dict[int, np.ndarray] = {}
        self._cache: str | None = None

    def _map(self, k: int) -> np.ndarray:
        if k not in self._maps:
            e = self.parts[k]
            src = join(self.path, e["vectors_path"])
            fs, p = fsspec_fs(src, self.storage)
            if "://" in src and not src.startswith("file://"):
                import tempfile

                self._cache = self._cache or tempfile.mkdtemp(prefix="imgcurate-vectors-")
                local = posixpath.join(self._cache, posixpath.basename(p))
                fs.get(p, local)
                p = local
            self._maps[k] = np.memmap(p, np.float32, "r", shape=(e["rows"], self.dim)) if e["rows"] else \
                np.zeros((0, self.dim), np.float32)
        return self._maps[k]

    def vectors(self, index_ids: np.ndarray) -> np.ndarray:
        out = np.zeros((len(index_ids), self.dim), np.float32)
        offsets = [e["offset"] for e in self.parts]
        for n, i in enumerate(index_ids):
            if i < 0:
                continue
            k = bisect.bisect_right(offsets, int(i)) - 1
            if k >= 0 and i - offsets[k] < self.parts[k]["rows"]:
                out[n] = self._map(k)[int(i - offsets[k])]
        return out

    def search(self, index, queries: np.ndarray, k: int, factor: int, tombstones=None):
        _, cand = raw_search(index, queries, k * factor, tombstones)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for n, (q, c) in enumerate(zip(queries, cand)):
            c = c[c >= 0]
            if not len(c):
                continue
            s = self.vectors(c) @ q
            top = np.argsort(-s, kind="stable")[:k]
            scores[n, :len(top)], ids[n, :len(top)] = s[top], c[top]
        return scores, ids


def searcher(index, reranker: Reranker | None = None, factor: int = RERANK_FACTOR, tombstones=None):
    """``fn(queries, k) -> (scores, ids)``: faiss, then the exact re-rank where there is one."""
    if reranker is None:
        return lambda q, k: raw_search(index, q, k, tombstones)
    return lambda q, k: reranker.search(index, np.ascontiguousarray(q, np.float32), k, factor, tombstones)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    hits = total = 0
    for f, t in zip(found, truth):
        t = set(int(v) for v in t if v >= 0)
        if t:
            hits += len(t & set(int(v) for v in f))
            total += len(t)
    return hits / total if total else 1.0


def tune(index, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, cfg: IndexConfig,
         reranker: Reranker | None = None) -> dict:
    """The smallest search setting whose recall@k reaches the target; its single-query latency."""
    name, ladder = _ladder(index)
    search = searcher(index, reranker)
    k = truth.shape[1]
    tried = []
    chosen = None
    for v in ladder:
        if name:
            set_params(index, {name: v})
        _, found = search(queries, k + 1)
        found = np.array([[i for i in row if i != q][:k] for row, q in zip(found, query_ids)], dtype=object)
        r = recall_at(found, truth)
        tried.append({"value": v, "recall": round(r, 4)})
        chosen = (v, r)
        if r >= cfg.recall_target:
            break
    v, r = chosen
    params = {name: v} if name else {}
    set_params(index, params)
    lat = []
    sub = queries[:cfg.latency_queries]
    for q in sub:
        t0 = time.perf_counter()
        search(q[None, :], k)
        lat.append((time.perf_counter() - t0) * 1000)
    lat = np.sort(np.asarray(lat))
    p50 = float(np.percentile(lat, 50)) if len(lat) else 0.0
    p95 = float(np.percentile(lat, 95)) if len(lat) else 0.0
    met, fast = r >= cfg.recall_target, p50 <= cfg.max_query_ms
    if not met:
        log.warning("index: recall@%d %.3f below the target %.2f at the largest %s", k, r, cfg.recall_target, name)
    if not fast:
        log.warning("index: median query latency %.2f ms over index.max_query_ms %.1f", p50, cfg.max_query_ms)
    return {"params": params, "recall": round(r, 4), "recall_target": cfg.recall_target, "recall_met": met,
            "k": k, "queries": len(queries), "query_ms_p50": round(p50, 4), "query_ms_p95": round(p95, 4),
            "max_query_ms": cfg.max_query_ms, "latency_met": fast, "ladder": tried,
            "rerank_factor": RERANK_FACTOR if reranker is not None else None}


# --- build ---------------------------------------------------------------------------------------------
def _groups(items: list, weights: list[int], limit: int) -> list[list]:
    out, cur, w = [], [], 0
    for it, n in zip(items, weights):
        if cur and w + n > limit:
            out.append(cur)
            cur, w = [], 0
        cur.append(it)
        w += n
    if cur:
        out.append(cur)
    return out


def write_index_file(index, path: str, storage) -> int:
    """Write a faiss index to ``path`` (local or object storage) without an in-memory copy of it:
    faiss writes a local file (a temporary beside the target, renamed; or in the temp dir, then
    uploaded). Returns its size."""
    import os
    import tempfile

    import faiss

    fs, p = fsspec_fs(path, storage)
    if "://" not in path or path.startswith("file://"):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".faiss", dir=os.path.dirname(p))
        os.close(fd)
        try:
            faiss.write_index(index, tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return os.path.getsize(p)
    fd, tmp = tempfile.mkstemp(prefix="imgcurate-index-", suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        fs.put_file(tmp, p)
        return os.path.getsize(tmp)
    finally:
        os.unlink(tmp)


def read_index_file(path: str, storage) -> object:
    """Read a faiss index from ``path`` (object storage: through a local temporary file), so the
    process holds the index once, not its bytes and the index."""
    import os
    import tempfile

    import faiss

    fs, p = fsspec_fs(path, storage)
    if "://" not in path or path.startswith("file://"):
        return faiss.read_index(p)
    fd, tmp = tempfile.mkstemp(prefix="imgcurate-index-", suffix=".faiss")
    os.close(fd)
    try:
        fs.get_file(p, tmp)
        return faiss.read_index(tmp)
    finally:
        os.unlink(tmp)


def _drop(path: str, storage) -> None:
    fs, p = fsspec_fs(path, storage)
    try:
        fs.rm(p, recursive=True)
    except FileNotFoundError:
        pass


def plan_memory(d: int, bytes_per_vector: float, cfg: IndexConfig) -> dict:
    """How a build stays within ``max_memory_mb`` per process: the rows read at a time, and the
    vectors a shard holds: an eighth of the budget, as faiss's inverted lists grow by doubling (a
    shard may take twice its bytes while it fills). The driver holds the index (half the budget,
    by the chooser) and one shard being merged; a task one shard and a batch."""
    mem = int(cfg.max_memory_mb * 2 ** 20)
    batch = batch_rows_for(d, mem)
    shard = int(max(1024, min(cfg.add_rows, mem // 8 // max(1.0, bytes_per_vector))))
    task = int(min(mem, 2 * shard * bytes_per_vector + 6 * batch * 4 * d + GT_CHUNK * cfg.queries * 8
                   + 256 * 2 ** 20))
    return {"batch_rows": batch, "shard_rows": shard, "task_bytes": task}


def _declared_width(path: str, column: str, storage) -> int | None:
    """The width of a fixed-size list column from the file's schema (None: variable or absent)."""
    fs, p = fsspec_fs(path, storage)
    with fs.open(p, "rb") as fh:
        schema = pq.ParquetFile(fh).schema_arrow
    if column in schema.names and pa.types.is_fixed_size_list(schema.field(column).type):
        return int(schema.field(column).type.list_size)
    return None


def _add_groups(index, groups: list[list[tuple[int, str, int]]], column: str, id_column: str, storage,
                out_dir: str, cfg: IndexConfig, d: int, bytes_per_vector: float, queries: np.ndarray,
                query_ids: np.ndarray, k: int, rerank: bool) -> tuple[list[dict], list, list, dict]:
    """Pass 2: one Ray task a group adds its vectors to shards of the trained empty ``index`` (files
    under ``out_dir/_build/``) and writes its id parts; the driver merges the shards into ``index``
    one at a time (Flat / HNSW: adds the returned vectors). Returns (id parts, ground-truth scores
    and ids per task, what was added: vectors, shards, the memory plan)."""
    import faiss
    import ray

    hnsw = _ivf(index) is None  # Flat and HNSW: the vectors come back and are added here (no merge)
    if hnsw:
        empty = None
    else:
        empty_index = faiss.clone_index(index)
        empty_index.reset()
        empty = faiss.serialize_index(empty_index).tobytes()
        del empty_index
    plan = plan_memory(d, bytes_per_vector, cfg)
    shard_dir = join(out_dir, "_build", f"{time.time_ns():x}")
    ids_dir = join(out_dir, IDS_DIR)
    fs, p = fsspec_fs(ids_dir, storage)
    fs.makedirs(p, exist_ok=True)
    add = ray.remote(num_cpus=cfg.num_cpus)(_add_task)
    q_ref, qi_ref = ray.put(queries), ray.put(query_ids)
    vectors_dir = join(out_dir, VECTORS_DIR) if rerank else None
    pending = [add.options(memory=plan["task_bytes"]).remote(
        g, column, id_column, storage, empty, q_ref, qi_ref, k, ids_dir, hnsw, vectors_dir, shard_dir,
        plan["shard_rows"], plan["batch_rows"]) for g in groups]
    parts, gt_s, gt_i, added, shards = [], [], [], 0, 0
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            r = ray.get(done[0])
            parts.extend(r["parts"])
            gt_s.append(r["gt_scores"])
            gt_i.append(r["gt_ids"])
            if hnsw:
                if r["vectors"] is not None:
                    index.add_with_ids(r["vectors"], r["ids"])
                    added += len(r["ids"])
            for sh in r["shards"]:  # one shard in the driver at a time, read from its file
                shard = read_index_file(sh["path"], storage)
                added += int(shard.ntotal)
                _merge(index, shard)
                del shard
                shards += 1
                _drop(sh["path"], storage)
            del r
    finally:
        _drop(shard_dir, storage)
        build = join(out_dir, "_build")
        fs, p = fsspec_fs(build, storage)
        try:
            if fs.exists(p) and not fs.ls(p):
                fs.rm(p, recursive=True)
        except (FileNotFoundError, OSError):
            pass
    parts.sort(key=lambda e: e["offset"])
    return parts, gt_s, gt_i, {"vectors": added, "shards": shards, "tasks": len(groups), **plan}


def build_index(files: list[str], column: str, out_dir: str, cfg: IndexConfig | dict | None = None,
                id_column: str = "sample_id", storage: StorageConfig | None = None,
                model: dict | None = None, extra: dict | None = None) -> dict:
    """Build an index of ``column`` over the Parquet ``files`` into ``out_dir``; returns ``_INDEX.json``."""
    import faiss
    import ray

    cfg = cfg if isinstance(cfg, IndexConfig) else IndexConfig(**(cfg or {}))
    if not files:
        raise ValueError("index: no input files")
    t0 = time.time()
    mem = int(cfg.max_memory_mb * 2 ** 20)
    # pass 1: rows per file, a training sample and the held-out queries
    sizes = ray.get([ray.remote(_rows_of).remote(f, storage) for f in files])
    total = sum(sizes)
    if total == 0:
        raise ValueError(f"index: the files hold no rows ({len(files)} files)")
    train_rate = min(1.0, 1.2 * cfg.train_rows / total)
    query_rate = min(0.5, 1.2 * cfg.queries / total)
    groups = _groups(list(enumerate(files)), sizes, cfg.add_rows)
    d0 = _declared_width(files[0], column, storage)  # fixed-size lists: known before reading
    batch0 = batch_rows_for(d0 or 1024, mem)
    train_cap = cfg.train_rows if not d0 else int(min(cfg.train_rows, max(10_000, mem * 0.15 // (4 * d0))))
    train_rate = min(1.0, 1.2 * train_cap / total)
    sample = ray.remote(num_cpus=cfg.num_cpus)(_sample_task)
    task_bytes = int(min(mem, 8 * batch0 * 4 * (d0 or 1024) + 256 * 2 ** 20))
    got = [r for part in ray.get([sample.options(memory=task_bytes).remote(
        g, column, id_column, storage, train_rate, query_rate, cfg.seed, batch0) for g in groups]) for r in part]
    got.sort(key=lambda r: r["file"])
    n = sum(r["vectors"] for r in got)
    dims = {r["dim"] for r in got if r["dim"]}
    if n == 0 or not dims:
        raise ValueError(f"index: no vectors in column {column!r} of {len(files)} files")
    if len(dims) > 1:
        raise ValueError(f"index: column {column!r} has vectors of several widths {sorted(dims)}")
    d = dims.pop()
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    queries = np.concatenate([r["queries"] for r in got if r["dim"]])[:cfg.queries]
    query_ids = np.concatenate([offsets[r["file"]] + r["query_rows"] for r in got if r["dim"]])[:cfg.queries]
    train = np.concatenate([r["train"] for r in got if r["dim"]] + [queries[:0]])
    del got  # the per-file samples: their copies are in train / queries now
    choice = choose(n, d, cfg)
    k = min(cfg.k, max(1, n - 1))
    log.info("index %s: %d vectors x %d -> %s (%s)", column, n, d, choice.factory, choice.reason)
    index = faiss.index_factory(d, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        if len(train) < 39 and choice.nlist:
            train = np.concatenate([train, queries])
        rng = np.random.default_rng(cfg.seed)
        if len(train) > train_cap:
            train = train[np.sort(rng.choice(len(train), train_cap, replace=False))]
        index.train(np.ascontiguousarray(train, np.float32))
    del train
    t_train = time.time()
    # pass 2: add, in parallel, and the exact ground truth of the queries
    rerank = choice.kind == "ivf_pq" or (choice.kind == "custom" and "PQ" in choice.factory)
    groups3 = [[(j, f, int(offsets[j])) for j, f in g] for g in groups]
    parts, gt_s, gt_i, build = _add_groups(index, groups3, column, id_column, storage, out_dir, cfg, d,
                                       choice.bytes_per_vector, queries, query_ids, k, rerank)
    parts.sort(key=lambda e: e["offset"])
    s = np.concatenate(gt_s, 1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    truth = np.take_along_axis(np.concatenate(gt_i, 1), order, 1)
    truth[~np.isfinite(np.take_along_axis(s, order, 1))] = -1  # fewer than k other vectors
    t_add = time.time()
    reranker = Reranker(out_dir, parts, d, storage) if rerank else None
    tuning = tune(index, queries, query_ids, truth, cfg, reranker)
    manifest = {
        "type": choice.kind, "factory": choice.factory, "nlist": choice.nlist, "choice": choice.reason,
        "metric": "inner_product", "dim": d, "vectors": int(index.ntotal), "rows": int(total),
        "column": column, "id_column": id_column, "embedding_model": model,
        "search_params": tuning["params"], "tuning": tuning, "rerank_factor": tuning["rerank_factor"],
        "id_parts": parts, "next_id": int(total), "tombstones": [],
        "generation": 1, "index_file": "index-g0001.faiss",
        "max_memory_mb": cfg.max_memory_mb, "config": cfg.model_dump(),
        "build": {k: v for k, v in build.items() if k != "vectors"},
        "created": datetime.now(timezone.utc).isoformat(),
        "seconds": {"train": round(t_train - t0, 3), "add": round(t_add - t_train, 3),
                    "tune": round(time.time() - t_add, 3)},
        **(extra or {}),
    }
    manifest["index_bytes"] = write_index_file(index, join(out_dir, manifest["index_file"]), storage)
    write_json_atomic(join(out_dir, INDEX_MANIFEST), manifest, storage)
    log.info("index %s: %s, recall@%d %.3f, %.2f ms/query, %.1f s", column, choice.factory, k, tuning["recall"],
             tuning["query_ms_p50"], time.time() - t0)
    return manifest


def _merge(index, shard) -> None:
    ivf, sivf = _ivf(index), _ivf(shard)
    if ivf is not None and sivf is not None:
        ivf.merge_from(sivf, 0)
        if ivf is not index:  # the wrapper (OPQ) keeps its own count
            index.ntotal = ivf.ntotal
    else:
        index.merge_from(shard, 0)


# --- load, search, add, remove -------------------------------------------------------------------------
@dataclass
class LoadedIndex:
    path: str
    manifest: dict
    index: object
    storage: StorageConfig | None = None
    _parts: dict = field(default_factory=dict)
    _reranker: Reranker | None = None

    @property
    def tombstones(self) -> np.ndarray:
        return np.asarray(self.manifest.get("tombstones") or [], np.int64)

    def _part(self, k: int) -> list:
        if k not in self._parts:
            e = self.manifest["id_parts"][k]
            self._parts[k] = _read(join(self.path, e["path"]), ["id"], self.storage).column("id").to_pylist()
        return self._parts[k]

    def locate(self, index_id: int) -> tuple[dict, int] | None:
        """(id part entry, row in its source) of an index id, or None."""
        parts = self.manifest["id_parts"]
        k = bisect.bisect_right([e["offset"] for e in parts], int(index_id)) - 1
        if k < 0 or index_id - parts[k]["offset"] >= parts[k]["rows"]:
            return None
        return parts[k], int(index_id - parts[k]["offset"])

    def id_of(self, index_id: int) -> str | None:
        where = self.locate(index_id)
        if where is None:
            return None
        k = self.manifest["id_parts"].index(where[0])
        return self._part(k)[where[1]]

    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[dict]]:
        """Per query, up to ``k`` hits ``{"id", "score", "index_id"}`` (vectors are L2-normalized here)."""
        q = np.atleast_2d(np.asarray(vectors, np.float32))
        norm = np.linalg.norm(q, axis=1, keepdims=True)
        q = q / np.where(norm > 0, norm, 1)
        rr = None
        if self.manifest.get("rerank_factor"):
            if self._reranker is None:
                self._reranker = Reranker(self.path, self.manifest["id_parts"], self.manifest["dim"], self.storage)
            rr = self._reranker
        scores, found = searcher(self.index, rr, self.manifest.get("rerank_factor") or 1, self.tombstones)(q, k)
        out = []
        for srow, irow in zip(scores, found):
            hits = []
            for s, i in zip(srow, irow):
                if i < 0:
                    continue
                sid = self.id_of(int(i))
                if sid is not None:
                    hits.append({"id": sid, "score": float(s), "index_id": int(i)})
            out.append(hits)
        return out

    def save(self, generation_bump: bool = True) -> dict:
        m = self.manifest
        old = m["index_file"]
        if generation_bump:
            m["generation"] += 1
            m["index_file"] = f"index-g{m['generation']:04d}.faiss"
        m["vectors"] = int(self.index.ntotal)
        m["index_bytes"] = write_index_file(self.index, join(self.path, m["index_file"]), self.storage)
        m["updated"] = datetime.now(timezone.utc).isoformat()
        write_json_atomic(join(self.path, INDEX_MANIFEST), m, self.storage)
        if generation_bump and old != m["index_file"]:
            fs, p = fsspec_fs(join(self.path, old), self.storage)
            try:
                fs.rm(p)
            except FileNotFoundError:
                pass
        return m


def load_index(path: str, storage: StorageConfig | None = None) -> LoadedIndex:
    manifest = read_json(join(path, INDEX_MANIFEST), storage)
    if manifest is None:
        raise FileNotFoundError(f"no committed index at {path} (no {INDEX_MANIFEST})")
    index = read_index_file(join(path, manifest["index_file"]), storage)
    set_params(index, manifest.get("search_params") or {})
    return LoadedIndex(path, manifest, index, storage)


def add_to_index(path: str, files: list[str], storage: StorageConfig | None = None, column: str | None = None,
                 id_column: str | None = None) -> dict:
    """Add the vectors of ``files`` to the trained index at ``path`` (no retraining): new id parts
    from ``next_id`` on; returns the updated ``_INDEX.json``."""
    import ray

    li = load_index(path, storage)
    m = li.manifest
    column = column or m["column"]
    id_column = id_column or m["id_column"]
    sizes = ray.get([ray.remote(_rows_of).remote(f, storage) for f in files])
    start = int(m["next_id"])
    first_part = 1 + max([int(posixpath.basename(e["path"])[5:10]) for e in m["id_parts"]] or [-1])
    offsets = start + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    cfg = IndexConfig(**m.get("config", {}))
    groups = _groups([(first_part + j, f, int(offsets[j])) for j, f in enumerate(files)], sizes, cfg.add_rows)
    bpv = float(li.manifest.get("index_bytes", 0)) / max(1, int(li.index.ntotal)) or 4.0 * m["dim"] + 8
    parts, _, _, build = _add_groups(li.index, groups, column, id_column, storage, path, cfg, m["dim"], bpv,
                                     np.zeros((0, m["dim"]), np.float32), np.zeros(0, np.int64), 1,
                                     bool(m.get("rerank_factor")))
    m["id_parts"].extend(parts)
    m["id_parts"].sort(key=lambda e: e["offset"])
    m["next_id"] = start + int(sum(sizes))
    m["rows"] = int(m["rows"]) + int(sum(sizes))
    m.setdefault("history", []).append({"op": "add", "files": len(files), "vectors": int(build["vectors"]),
                                        "shards": build["shards"],
                                        "at": datetime.now(timezone.utc).isoformat()})
    return li.save()


def remove_from_index(path: str, ids: list[str], storage: StorageConfig | None = None) -> dict:
    """Remove the vectors of the given ids (the id column's values): physically where faiss can
    (Flat, IVF), as tombstones for HNSW; their id map entries become null."""
    import faiss

    li = load_index(path, storage)
    m = li.manifest
    wanted = set(map(str, ids))
    gone: list[int] = []
    for k, e in enumerate(m["id_parts"]):
        col = li._part(k)
        hit = [r for r, v in enumerate(col) if v is not None and v in wanted]
        if not hit:
            continue
        gone.extend(e["offset"] + r for r in hit)
        for r in hit:
            col[r] = None
        fs, p = fsspec_fs(join(path, e["path"]), storage)
        with fs.open(p, "wb") as fh:
            pq.write_table(pa.table({"id": pa.array(col, pa.string())}), fh)
        e["vectors"] = int(e.get("vectors", 0)) - len(hit)
    arr = np.asarray(gone, np.int64)
    physically = 0
    if len(arr):
        if _hnsw(li.index) is not None:
            m["tombstones"] = sorted(set(m.get("tombstones") or []) | set(int(v) for v in arr))
        else:
            physically = int(li.index.remove_ids(faiss.IDSelectorBatch(arr)))
    m.setdefault("history", []).append({"op": "remove", "asked": len(wanted), "removed": len(arr),
                                        "physically": physically, "at": datetime.now(timezone.utc).isoformat()})
    return li.save()


# --- snapshots -----------------------------------------------------------------------------------------
def snapshot_index_dir(snapshot_path: str, column: str) -> str:
    return join(snapshot_path, SNAPSHOT_INDEX_DIR, column)


def snapshot_files(snapshot: dict) -> list[str]:
    """The snapshot's Parquet shards (its manifest names them relative to the snapshot dir)."""
    return [e["path"] if "://" in e["path"] or e["path"].startswith("/") else join(snapshot["path"], e["path"])
            for e in snapshot.get("files", []) if e.get("kind") == "parquet" and e.get("rows", 1)]


def build_snapshot_indices(snapshot: dict, cfg: IndexConfig | dict | None = None,
                           storage: StorageConfig | None = None) -> dict:
    """One index per configured column the snapshot has, into ``<snapshot>/_index/<column>/``;
    returns ``{column: summary}`` (columns absent from the snapshot are reported as skipped)."""
    cfg = cfg if isinstance(cfg, IndexConfig) else IndexConfig(**(cfg or {}))
    files = snapshot_files(snapshot)
    schema = snapshot.get("schema", {})
    model = (snapshot.get("config") or {}).get("clip")
    out = {}
    for column in cfg.columns:
        if column not in schema or column not in snapshot.get("columns", schema):
            out[column] = {"skipped": "not in the snapshot"}
            continue
        if not snapshot.get("counts", {}).get("kept"):
            out[column] = {"skipped": "the snapshot is empty"}
            continue
        try:
            m = build_index(files, column, snapshot_index_dir(snapshot["path"], column), cfg, "sample_id", storage,
                            model=model, extra={"snapshot_version": snapshot.get("version")})
        except ValueError as exc:
            out[column] = {"skipped": str(exc)}
            log.warning("index %s: %s", column, exc)
            continue
        out[column] = {"type": m["type"], "factory": m["factory"], "vectors": m["vectors"],
                       "recall": m["tuning"]["recall"], "query_ms_p50": m["tuning"]["query_ms_p50"],
                       "path": snapshot_index_dir(snapshot["path"], column)}
    return out


def resolve(path: str, storage: StorageConfig | None = None, column: str = "clip_image_embedding"
            ) -> tuple[str, dict | None]:
    """(index dir, snapshot manifest or None) for an index dir, a snapshot dir or a run output."""
    from operators.snapshot import MANIFEST, latest_committed, snapshot_dir

    if read_json(join(path, INDEX_MANIFEST), storage) is not None:
        return path, None
    snap = read_json(join(path, MANIFEST), storage)
    if snap is None:
        v = latest_committed(path, storage)
        if v is None:
            raise FileNotFoundError(f"{path}: not an index, a snapshot or a run output with a snapshot")
        snap = read_json(join(snapshot_dir(path, v), MANIFEST), storage)
    idx = snapshot_index_dir(snap["path"], column)
    if read_json(join(idx, INDEX_MANIFEST), storage) is None:
        raise FileNotFoundError(f"snapshot v={snap['version']:04d} has no index of {column} ({idx})")
    return idx, snap


def rows_of_hits(li: LoadedIndex, hits: list[dict], columns: list[str]) -> list[dict]:
    """The source rows (``columns`` that exist) of hits, read by (part, row): url, caption, image..."""
    by_source: dict[str, list[tuple[int, int]]] = {}
    for n, h in enumerate(hits):
        where = li.locate(h["index_id"])
        if where is not None:
            by_source.setdefault(where[0]["source"], []).append((n, where[1]))
    out = [dict() for _ in hits]
    for source, want in by_source.items():
        fs, p = fsspec_fs(source, li.storage)
        with fs.open(p, "rb") as fh:
            pf = pq.ParquetFile(fh)
            cols = [c for c in columns if c in pf.schema_arrow.names]
            if not cols:
                continue
            t = pf.read(columns=cols)
        rows = t.take(pa.array([r for _, r in want])).to_pylist()
        for (n, _), row in zip(want, rows):
            out[n] = row
    return out


def read_query_vectors(path: str) -> np.ndarray:
    x = np.load(path) if path.endswith(".npy") else np.loadtxt(io.StringIO(open(path).read()), ndmin=2)
    return np.atleast_2d(np.asarray(x, np.float32))


def dumps_results(results: list[list[dict]]) -> str:
    return "\n".join(json.dumps({"query": i, "results": [{"id": h["id"], "score": round(h["score"], 6)}
                                                         for h in r]}) for i, r in enumerate(results))


class QueryEmbedder:
    """Texts and images embedded with the model an index records (its ``embedding_model``: the CLIP
    stage's config the snapshot was made with), so queries land in the index's space."""

    def __init__(self, manifest: dict, storage: StorageConfig | None = None, device: str = "cpu"):
        from operators.clip import ClipConfig
        from operators.models.clip import ClipModel

        spec = manifest.get("embedding_model")
        if not spec:
            raise ValueError("this index records no embedding model (built with --embeddings): query it with "
                             "--vector-file")
        cfg = ClipConfig(**{**spec, "enabled": True, "device": device})
        self.model = ClipModel(cfg, storage)
        self.dim = self.model.dim
        if manifest.get("dim") not in (None, self.dim):
            raise ValueError(f"the index's vectors have {manifest['dim']} dims, its model {self.dim}")

    def text(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.encode_texts(list(texts)).cpu().numpy().astype(np.float32)

    def images(self, blobs: list[bytes]) -> np.ndarray:
        emb, outcomes = self.model.encode_images(list(blobs), "search")
        bad = [i for i, o in enumerate(outcomes) if o is not None]
        if bad or emb is None:
            raise ValueError(f"query image(s) {bad or list(range(len(blobs)))} cannot be decoded")
        return emb.float().cpu().numpy()
