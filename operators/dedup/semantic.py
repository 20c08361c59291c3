"""SemanticDedupStep: SemDeDup on the CLIP image embeddings (phase 2, ``dedup.semantic``).

SemDeDup (Abbas, Tirumala, Simig, Ganguli, Morcos, 2023, "SemDeDup: Data-efficient learning at
web-scale through semantic deduplication", arXiv:2303.09540; reference code
github.com/facebookresearch/SemDeDup, also NVIDIA NeMo Curator's semantic dedup): spherical k-means
over L2-normalized embeddings; within each cluster, order the items by a keep policy and drop each
item whose maximum cosine to any item *earlier in the order* exceeds ``1 - eps``.

How it runs at scale (no process holds a per-sample structure of the run):

1. k-means (faiss, spherical) is trained on a deterministic sample of at most ``kmeans_sample``
   alive embeddings: a row is sampled when a seeded 64-bit hash of its ``sample_id`` falls below
   ``kmeans_sample / alive`` of the hash range; only the sample reaches the driver.
2. Every alive row is assigned to its nearest centroid in parallel (``map_batches`` with the
   centroids in the object store) and written with its cluster and its cosine to the centroid to
   the step's work dir.
3. Cluster sizes are counted (``groupby("cluster").count()``: one row per cluster to the driver).
   A cluster larger than ``max_cluster_size`` is split: a second spherical k-means with
   ``ceil(2 * size / max_cluster_size)`` centroids is trained on a sample of that cluster and its
   rows go to their nearest sub-centroid. Near-duplicates at ``eps`` are far closer to each other
   than to anything else, so they almost always fall into one sub-cluster; a pair that straddles
   two sub-clusters is missed (both kept). This is the one approximation beyond SemDeDup's own
   (which already misses pairs that straddle two k-means clusters).
4. ``groupby(task key).map_groups``: each (sub-)cluster is one independent task that orders its
   items by the keep policy and computes the cosines in blocks of ``block`` x ``block``.

The keep policy orders a cluster as the reference's ``sort_clusters.py`` does: ``hard`` (the
reference's default) puts the items farthest from the cluster centroid first, so they are the ones
kept; ``easy`` the closest first; ``random`` orders by a seeded hash of ``sample_id`` (the
reference shuffles with a seeded RNG; a hash does not depend on the order rows arrive in). Ties are
broken by ``sample_id``; in a split cluster the order uses the cosine to the parent centroid.

The rule is the reference's ``M = max(triu(S, 1), dim=0); drop M > 1 - eps``: an item is compared
with **all** earlier items, dropped or kept. So an item whose only near twin was itself dropped is
dropped too (a chain a ~ b ~ c drops b and c). Comparing with kept items only would keep c there;
we follow the paper's rule, which is also the one a block computation gives without serialising the
cluster. ``duplicate_of`` is the most similar earlier *kept* item of the same task (its cosine is in
``error_message``; in a chain it can be below ``1 - eps``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.base import DROPPED, DropReason
from operators.phase2 import DECISION_SCHEMA, FILE_COLUMN, Phase2Step, StepResult, drops

log = logging.getLogger(__name__)

EMBEDDING = "clip_image_embedding"  # written by the CLIP stage (operators/clip.py IMAGE_EMBEDDING)
SEMANTIC_DUPLICATE = DropReason("semantic_duplicate", DROPPED,
                                "its CLIP image embedding's cosine to an earlier item of its k-means cluster "
                                "exceeds 1 - dedup.semantic.eps (SemDeDup); duplicate_of names the kept twin")
AUTO_CLUSTER_SIZE = 10_000  # n_clusters null: about this many items a cluster (the paper: 440M / 50,000 = 8,800)
MAX_AUTO_CLUSTERS = 50_000  # ... at most the paper's 50,000 clusters
SUB = 1 << 20  # task key = cluster * SUB + sub-cluster
BLOCK = 2048  # rows per block of the within-cluster cosine matrix
SPLIT_SAMPLE_PER_CENTROID = 256  # faiss's max_points_per_centroid: sub-k-means trains on at most this many a centroid


class SemanticConfig(BaseModel):
    """SemDeDup settings (``dedup.semantic:`` in the job config)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="run SemDeDup over the CLIP image embeddings (needs clip.enabled with "
                                             "clip.write_embeddings)")
    eps: float = Field(0.07, gt=0, lt=1, description=(
        "drop an item whose cosine to an earlier item of its cluster exceeds 1 - eps; 0.07 is the paper's "
        "aggressive end on LAION-440M (about half removed with little loss); smaller is stricter (NeMo Curator "
        "suggests 0.01)"))
    n_clusters: int | None = Field(None, ge=1, description=(
        "k-means clusters; null: ceil(alive / 10,000), at most 50,000 (the paper: 50,000 for 440M), at most the "
        "k-means sample"))
    keep: Literal["hard", "easy", "random"] = Field("hard", description=(
        "which item of a duplicate group survives: hard = farthest from its centroid (the paper's default), easy = "
        "closest, random = seeded"))
    max_cluster_size: int = Field(100_000, ge=2, description=(
        "a cluster larger than this is split by a sub-k-means into about size / (max / 2) parts, one task each "
        "(pairs that straddle two parts are missed)"))
    kmeans_sample: int = Field(1_000_000, ge=1, description=(
        "train k-means on at most this many embeddings (the sample reaches the driver: 1M x 512 float32 = 2 GB)"))
    kmeans_iters: int = Field(20, ge=1, description="k-means iterations (faiss's default is 25, the reference 100)")
    seed: int = Field(1234, ge=0, description="seeds the k-means, the sample and keep=random (the reference's 1234)")

    def clusters_for(self, alive: int, sample: int) -> int:
        """The k-means cluster count for ``alive`` embedded rows and a training sample of ``sample``."""
        k = self.n_clusters if self.n_clusters is not None else \
            min(MAX_AUTO_CLUSTERS, math.ceil(alive / AUTO_CLUSTER_SIZE))
        return max(1, min(k, sample))


# --- the algorithm's core, on numpy (also used directly by the benchmark) ----------------------
def hash64(ids, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each id (blake2b): the sample and keep=random's order, independent of
    how rows are partitioned."""
    key = int(seed).to_bytes(8, "little")
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, key=key).digest(), "little")
                     for i in ids], dtype=np.uint64)


def normalize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalized float32 rows and the mask of rows that could be normalized (finite, non-zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1) if x.size else np.zeros(len(x), np.float32)
    ok = np.isfinite(norms) & (norms > 0)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norms[ok, None]
    return out, ok


def embeddings_of(column) -> tuple[np.ndarray, np.ndarray]:
    """A (fixed-size or plain) list column of floats -> (normalized float32 matrix, valid mask); null
    rows, rows of the wrong width and zero vectors are invalid (left untouched)."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(col)
    if n == 0:
        return np.zeros((0, 0), np.float32), np.zeros(0, bool)
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
        valid = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), bool)
        flat = col.flatten()  # skips null rows and honours the slice offset
        x = np.zeros((n, d), np.float32)
        x[valid] = np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(-1, d)
    else:
        rows = col.to_pylist()
        widths = [len(r) for r in rows if r is not None]
        d = max(set(widths), key=widths.count) if widths else 0
        valid = np.array([r is not None and len(r) == d for r in rows], bool)
        x = np.zeros((n, d), np.float32)
        for k in np.flatnonzero(valid):
            x[k] = rows[k]
    x, ok = normalize(x)
    return x, valid & ok


def train_centroids(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Spherical k-means (faiss) on normalized rows ``x``: (k, d) unit centroids."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(int(k), len(x)))
    if k == 1:
        c = x.mean(0, keepdims=True)
        return normalize(c)[0] if np.linalg.norm(c) > 0 else x[:1].copy()
    km = faiss.Kmeans(x.shape[1], k, niter=int(iters), seed=int(seed), spherical=True, verbose=False,
                      max_points_per_centroid=SPLIT_SAMPLE_PER_CENTROID)
    km.cp.min_points_per_centroid = 1  # a small sample is a choice of the config, not an error worth a warning
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each normalized row by inner product: (index, cosine)."""
    import faiss

    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64), sims[:, 0].astype(np.float32)


def keep_order(cos_to_centroid: np.ndarray, ids, keep: str, seed: int) -> np.ndarray:
    """The order SemDeDup walks a cluster in (first = kept first): a permutation of the rows."""
    ids = np.asarray(ids, dtype=object)
    tie = np.argsort(ids, kind="stable")  # ties broken by sample_id
    if keep == "hard":
        key = cos_to_centroid.astype(np.float64)[tie]  # ascending cosine = farthest first
    elif keep == "easy":
        key = -cos_to_centroid.astype(np.float64)[tie]
    elif keep == "random":
        key = hash64(ids[tie], seed + 1)
    else:
        raise ValueError(f"keep must be hard, easy or random, got {keep!r}")
    return tie[np.argsort(key, kind="stable")]


@dataclass
class Dedup:
    """SemDeDup within one ordered group: ``dropped[j]``, and for a dropped row the position of its most
    similar earlier kept row (``twin``, -1 otherwise), that cosine (``twin_cos``) and its max cosine to
    any earlier row (``max_cos``)."""

    dropped: np.ndarray
    twin: np.ndarray
    twin_cos: np.ndarray
    max_cos: np.ndarray


def semdedup_ordered(x: np.ndarray, eps: float, block: int = BLOCK) -> Dedup:
    """SemDeDup on normalized rows already in keep order: row j is dropped when
    ``max_{i<j} x_i . x_j > 1 - eps``; its twin is the ``argmax`` over earlier kept rows. Two passes of
    ``block`` x ``block`` pieces of the cosine matrix (memory O(block^2)): the max over earlier rows
    (n^2 / 2 dot products), then the twins, for the dropped columns only."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    max_cos = np.full(n, -np.inf, np.float32)
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        xj = x[j0:j1]
        for i0 in range(0, j1, block):
            s = x[i0:min(j1, i0 + block)] @ xj.T
            if i0 == j0:  # the diagonal piece: i < j only
                s[np.tril_indices(j1 - j0)] = -np.inf
            max_cos[j0:j1] = np.maximum(max_cos[j0:j1], s.max(0))
    dropped = max_cos > np.float32(1.0 - eps)
    twin = np.full(n, -1, np.int64)
    twin_cos = np.full(n, -np.inf, np.float32)
    gone = np.flatnonzero(dropped)
    kept_rows = np.flatnonzero(~dropped)
    for c0 in range(0, len(gone), block):
        cols = gone[c0:c0 + block]
        xj = x[cols]
        best = np.full(len(cols), -np.inf, np.float32)
        arg = np.full(len(cols), -1, np.int64)
        earlier = kept_rows[kept_rows < cols[-1]]
        for r0 in range(0, len(earlier), block):
            rows = earlier[r0:r0 + block]
            s = x[rows] @ xj.T
            s[rows[:, None] >= cols[None, :]] = -np.inf
            a = s.argmax(0)
            v = s[a, np.arange(len(cols))]
            better = v > best
            best = np.where(better, v, best)
            arg = np.where(better, rows[a], arg)
        twin[cols], twin_cos[cols] = arg, best
    return Dedup(dropped, twin, twin_cos, max_cos)


def dedup_group(x: np.ndarray, cos_to_centroid: np.ndarray, ids, keep: str, eps: float, seed: int,
                block: int = BLOCK) -> Dedup:
    """SemDeDup of one (sub-)cluster given in any row order: the result is indexed like the input rows
    (``twin`` is an input row index)."""
    order = keep_order(np.asarray(cos_to_centroid), ids, keep, seed)
    d = semdedup_ordered(x[order], eps, block)
    n = len(order)
    dropped = np.zeros(n, bool)
    twin = np.full(n, -1, np.int64)
    twin_cos = np.full(n, -np.inf, np.float32)
    max_cos = np.full(n, -np.inf, np.float32)
    dropped[order], twin_cos[order], max_cos[order] = d.dropped, d.twin_cos, d.max_cos
    twin[order] = np.where(d.twin >= 0, order[np.maximum(d.twin, 0)], -1)
    return Dedup(dropped, twin, twin_cos, max_cos)


def split_counts(counts: dict[int, int], max_cluster_size: int) -> dict[int, int]:
    """Clusters to split: cluster -> number of sub-clusters (``ceil(2 * size / max_cluster_size)``, so
    sub-clusters average half the cap and rarely exceed it)."""
    return {c: math.ceil(2 * n / max_cluster_size) for c, n in counts.items() if n > max_cluster_size}


def sub_assign(x: np.ndarray, clusters: np.ndarray, sub_centroids: dict[int, np.ndarray]) -> np.ndarray:
    """The sub-cluster of each row (0 for rows of clusters that are not split)."""
    sub = np.zeros(len(x), np.int64)
    for c, cents in sub_centroids.items():
        rows = np.flatnonzero(clusters == c)
        if len(rows):
            sub[rows] = nearest(x[rows], cents)[0]
    return sub


@dataclass
class ArrayResult:
    """SemDeDup of an in-memory matrix (``semdedup_arrays``): per row, dropped / twin row (-1) / task key."""

    dropped: np.ndarray
    twin: np.ndarray
    twin_cos: np.ndarray
    key: np.ndarray
    n_clusters: int
    split: dict
    seconds: dict


def semdedup_arrays(emb: np.ndarray, ids, config: SemanticConfig, block: int = BLOCK) -> ArrayResult:
    """The whole algorithm on one in-memory matrix, with the same functions and the same sample rule
    as the Ray step (for the benchmark and the tests; the step never holds the run in memory)."""
    import time

    t = time.perf_counter()
    seconds: dict = {}
    ids = np.asarray(ids, dtype=object)
    x, ok = normalize(emb)
    rows = np.flatnonzero(ok)
    h = hash64(ids[rows], config.seed)
    cut = _sample_cut(config.kmeans_sample, len(rows))
    pick = rows[h < cut]
    pick = pick[np.argsort(h[h < cut], kind="stable")][:config.kmeans_sample]
    k = config.clusters_for(len(rows), len(pick))
    centroids = train_centroids(x[pick], k, config.kmeans_iters, config.seed)
    seconds["kmeans"] = time.perf_counter() - t
    t = time.perf_counter()
    cluster, cos = np.full(len(x), -1, np.int64), np.zeros(len(x), np.float32)
    cluster[rows], cos[rows] = nearest(x[rows], centroids)
    seconds["assign"] = time.perf_counter() - t
    t = time.perf_counter()
    counts = dict(zip(*np.unique(cluster[rows], return_counts=True)))
    split = split_counts({int(c): int(n) for c, n in counts.items()}, config.max_cluster_size)
    subs = {}
    for c, m in split.items():
        members = rows[cluster[rows] == c]
        hm = hash64(ids[members], config.seed)
        cm = _sample_cut(SPLIT_SAMPLE_PER_CENTROID * m, len(members))
        subs[c] = train_centroids(x[members[hm < cm]], m, config.kmeans_iters, config.seed + 1 + c)
    key = np.full(len(x), -1, np.int64)
    key[rows] = cluster[rows] * SUB + sub_assign(x[rows], cluster[rows], subs)
    seconds["split"] = time.perf_counter() - t
    t = time.perf_counter()
    dropped, twin = np.zeros(len(x), bool), np.full(len(x), -1, np.int64)
    twin_cos = np.full(len(x), -np.inf, np.float32)
    order = rows[np.argsort(key[rows], kind="stable")]
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    for g in np.split(order, bounds):
        if len(g) < 2:
            continue
        d = dedup_group(x[g], cos[g], ids[g], config.keep, config.eps, config.seed, block)
        dropped[g] = d.dropped
        twin[g] = np.where(d.twin >= 0, g[np.maximum(d.twin, 0)], -1)
        twin_cos[g] = d.twin_cos
    seconds["dedup"] = time.perf_counter() - t
    return ArrayResult(dropped, twin, twin_cos, key, len(centroids), split, seconds)


def _sample_cut(want: int, n: int) -> np.uint64:
    """Hash threshold that samples about ``want`` of ``n`` rows (all when want >= n), with 10% slack so
    the sorted sample can be cut to exactly ``want``."""
    if n <= 0 or want >= n:
        return np.uint64(np.iinfo(np.uint64).max)
    frac = min(1.0, 1.1 * want / n)
    return np.uint64(min(float(np.iinfo(np.uint64).max), frac * 2.0 ** 64))


# --- the phase-2 step ---------------------------------------------------------------------------
def _sample_rows(t: pa.Table, seed: int, cut: int) -> pa.Table:
    """The rows of a batch in the k-means sample: their hash and their embedding as stored (float16 from
    the CLIP stage: half the bytes of float32 reach the driver)."""
    _, ok = embeddings_of(t.column(EMBEDDING))
    h = hash64(t.column("sample_id").to_pylist(), seed)
    sel = pa.array(np.flatnonzero(ok & (h < np.uint64(cut))), pa.int64())
    return pa.table({"h": pa.array(h).take(sel), "x": t.column(EMBEDDING).take(sel)})


def _gather_sample(ds) -> tuple[np.ndarray, np.ndarray]:
    """The sample on the driver, sorted by hash: (hashes, normalized float32 rows)."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        return np.zeros(0, np.uint64), np.zeros((0, 0), np.float32)
    t = pa.concat_tables(tables, promote_options="permissive")
    h = t.column("h").to_numpy()
    order = np.argsort(h, kind="stable")
    t = t.take(pa.array(order, pa.int64()))
    x, _ = embeddings_of(t.column("x"))
    return h[order], x


class SemanticDedupStep(Phase2Step):
    """Phase-2 step ``dedup.semantic``: SemDeDup over ``clip_image_embedding`` of the samples still kept
    (see the module docstring for the passes). Rows without an embedding are left untouched."""

    name = "dedup.semantic"
    stage = "dedup"
    reasons = (SEMANTIC_DUPLICATE,)

    def __init__(self, config: SemanticConfig | None = None, block: int = BLOCK):
        self.config = config or SemanticConfig()
        self.block = int(block)
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {block}")

    def reads(self) -> tuple[str, ...]:
        return (EMBEDDING,)

    def run(self, ctx) -> StepResult:
        import ray

        from operators.storage import arrow_fs, fsspec_fs

        cfg, block = self.config, self.block
        seed, eps, keep = cfg.seed, cfg.eps, cfg.keep
        alive = ctx.alive().count()
        report: dict = {"eps": eps, "threshold": 1 - eps, "keep": keep, "seed": seed}
        if alive == 0:
            return StepResult({**report, "embedded": 0, "n_clusters": 0}, None)

        # 1. the k-means sample (hash of sample_id below a cut), sorted by hash and cut to kmeans_sample
        cut = int(_sample_cut(cfg.kmeans_sample, alive))
        h, sample = _gather_sample(ctx.alive([EMBEDDING]).map_batches(
            lambda t: _sample_rows(t, seed, cut), batch_format="pyarrow"))
        sample = sample[:cfg.kmeans_sample]
        if len(sample) == 0:
            return StepResult({**report, "embedded": 0, "n_clusters": 0}, None)
        k = cfg.clusters_for(alive, len(sample))
        centroids = train_centroids(sample, k, cfg.kmeans_iters, seed)
        sampled = len(sample)
        del sample, h
        cref = ray.put(centroids)

        # 2. nearest centroid of every alive row, written to the work dir
        work = ctx.work_dir("dedup.semantic")
        fs, root = fsspec_fs(work, ctx.storage)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        afs, aroot = arrow_fs(work, ctx.storage)
        assigned = aroot.rstrip("/") + "/assigned"

        def assign(t: pa.Table) -> pa.Table:
            x, ok = embeddings_of(t.column(EMBEDDING))
            sel = pa.array(np.flatnonzero(ok), pa.int64())
            cl, cos = nearest(x[ok], ray.get(cref))
            ids = t.column("sample_id").take(sel)
            return pa.table({FILE_COLUMN: t.column(FILE_COLUMN).take(sel), "sample_id": ids,
                             EMBEDDING: t.column(EMBEDDING).take(sel),
                             "cluster": pa.array(cl, pa.int64()), "cos": pa.array(cos, pa.float32())})

        ctx.alive([EMBEDDING]).map_batches(assign, batch_format="pyarrow").write_parquet(assigned, filesystem=afs)

        def read(columns=None):
            return ray.data.read_parquet(assigned, filesystem=afs, columns=columns)

        # 3. cluster sizes; oversized clusters get sub-centroids trained on a sample of their rows
        counts = {int(r["cluster"]): int(r["count()"])
                  for r in read(["cluster"]).groupby("cluster", num_partitions=ctx.parallelism).count().take_all()}
        embedded = sum(counts.values())
        split = split_counts(counts, cfg.max_cluster_size)
        subs: dict[int, np.ndarray] = {}
        if split:
            cuts = {c: int(_sample_cut(SPLIT_SAMPLE_PER_CENTROID * m, counts[c])) for c, m in split.items()}

            def split_sample(t: pa.Table) -> pa.Table:
                cl = t.column("cluster").to_numpy()
                mine = np.isin(cl, np.array(list(cuts), np.int64))
                t = t.filter(pa.array(mine))
                x, _ = embeddings_of(t.column(EMBEDDING))
                hh = hash64(t.column("sample_id").to_pylist(), seed)
                cl = t.column("cluster").to_numpy()
                sel = hh < np.array([cuts[int(c)] for c in cl], np.uint64) if len(cl) else np.zeros(0, bool)
                d = x.shape[1] if x.ndim == 2 else 0
                return pa.table({"cluster": pa.array(cl[sel], pa.int64()), "h": pa.array(hh[sel]),
                                 "x": pa.FixedSizeListArray.from_arrays(pa.array(x[sel].reshape(-1), pa.float32()), d)})

            parts = [t for t in ray.get(read(["cluster", "sample_id", EMBEDDING]).map_batches(
                split_sample, batch_format="pyarrow").to_arrow_refs()) if t.num_rows]
            if not parts:  # cannot happen (an oversized cluster has rows); keep the guard cheap
                raise RuntimeError("dedup.semantic: no sample rows for the clusters to split")
            st = pa.concat_tables(parts)
            d = st.schema.field("x").type.list_size
            scl, sh = st.column("cluster").to_numpy(), st.column("h").to_numpy()
            sx = np.asarray(st.column("x").combine_chunks().flatten().to_numpy(), np.float32).reshape(-1, d)
            for c, m in sorted(split.items()):
                rows = np.flatnonzero(scl == c)
                rows = rows[np.argsort(sh[rows], kind="stable")]
                subs[c] = train_centroids(sx[rows], m, cfg.kmeans_iters, seed + 1 + c)
            del st, sx
        sref = ray.put(subs)

        def keyed(t: pa.Table) -> pa.Table:
            cl = t.column("cluster").to_numpy()
            sub = np.zeros(len(cl), np.int64)
            mine = ray.get(sref)
            if mine and len(cl):
                x, _ = embeddings_of(t.column(EMBEDDING))
                sub = sub_assign(x, cl, mine)
            return t.append_column("key", pa.array(cl * SUB + sub, pa.int64()))

        # 4. one task per (sub-)cluster
        def dedup(g: pa.Table) -> pa.Table:
            if g.num_rows < 2:
                return DECISION_SCHEMA.empty_table()
            x, _ = embeddings_of(g.column(EMBEDDING))
            ids = np.asarray(g.column("sample_id").to_pylist(), dtype=object)
            r = dedup_group(x, g.column("cos").to_numpy(), ids, keep, eps, seed, block)
            idx = np.flatnonzero(r.dropped)
            if not len(idx):
                return DECISION_SCHEMA.empty_table()
            twins = ids[r.twin[idx]]
            msgs = [f"cosine {float(mc):.4f} > {1 - eps:.4g} to an earlier item; kept twin {tw} at {float(tc):.4f}"
                    for mc, tw, tc in zip(r.max_cos[idx], twins, r.twin_cos[idx])]
            files = g.column(FILE_COLUMN).take(pa.array(idx, pa.int64())).to_pylist()
            return drops(files, ids[idx].tolist(), SEMANTIC_DUPLICATE.name, msgs, twins.tolist())

        decisions = read().map_batches(keyed, batch_format="pyarrow").groupby(
            "key", num_partitions=ctx.parallelism).map_groups(dedup, batch_format="pyarrow")
        sizes = sorted(counts.values())
        report.update({"embedded": embedded, "no_embedding": alive - embedded, "n_clusters": len(centroids),
                       "kmeans_sample": sampled, "kmeans_iters": cfg.kmeans_iters,
                       "largest_cluster": sizes[-1] if sizes else 0,
                       "clusters_split": len(split), "sub_clusters": int(sum(split.values())),
                       "max_cluster_size": cfg.max_cluster_size, "work_dir": work})
        return StepResult(report, decisions)
