"""Perceptual dedup: samples whose pHash is within ``max_hamming`` bits of a better-ranked sample's.

sha256 (``dedup.exact``) misses an image re-encoded, resized or lightly cropped under another URL;
its 64-bit pHash (Zauner 2010, imagehash's ``phash``; operators/phash.py, column ``phash``) stays
within a few bits. Near pairs over the whole run are found without comparing all pairs by
**multi-index hashing** (Norouzi, Punjani & Fleet, "Fast Search in Hamming Space with Multi-Index
Hashing", CVPR 2012; Manku, Jain & Das Sarma, WWW 2007, for the same idea on simhashes): the 64
bits are split into ``m = max_hamming + 1`` bands, and two hashes within ``max_hamming`` bits agree
exactly on at least one band (pigeonhole). Each hash is emitted once per band with the key
``(band, band value)``; a Ray Data ``groupby`` on (a hash partition of) that key brings the
candidates together, and each group is resolved with numpy: Hamming distance = popcount of the
XOR, verified exactly.

**Which sample is kept.** Samples are ranked by original image area (``orig_width *
orig_height``, larger first: the better copy of a resized one), then by ``sample_id`` (a hash of
the URL, so the choice does not depend on crawl order or partitioning). A sample is dropped
(``near_duplicate``) when it has a verified near twin ranked above it, and ``duplicate_of`` is its
best-ranked twin. This is not connected components: on a chain ``a ~ b ~ c`` with ``a`` not near
``c`` and ranks ``a > b > c``, both ``b`` and ``c`` are dropped and ``c``'s ``duplicate_of`` is ``b``,
itself dropped (follow ``duplicate_of`` to the kept sample). Every decision is local to the pairs
a sample is in, so each group gives each member its best twin seen there and a second shuffle by
``sample_id`` (crc32 partitions) keeps the best over the bands: no process holds the run, no pair
list is built. Groups are hash partitions of ``(band, value)`` (as many as data files times
bands); a partition resolves all its groups together with numpy sorts, not one call per group.

**Large groups.** A band value shared by very many samples (all-black images, a logo) must not
cost its size squared:

1. identical hashes in a group are collapsed first (they are twins of each other at distance 0;
   only the best-ranked copy takes part in the comparisons), so a million identical hashes cost
   a sort;
2. a group of at most ``exact_group`` distinct hashes is compared all-pairs (vectorised);
3. a larger group is split again by pigeonhole on the bits that still vary within it
   (``max_hamming + 1`` sub-bands; exact: every pair within ``max_hamming`` still shares a
   sub-band; a dense cluster of hashes that differ in few bits splits into small sub-groups), up to
   ``SPLIT_DEPTH`` (2) levels below the band (at most ``(max_hamming + 1)^2`` sorts of the group:
   random hashes need one level up to about a billion samples at the default); groups still larger
   are sorted by the full hash and each hash is compared with the next ``window`` hashes only
   (approximate: a near pair whose first differing bit comes early may be missed; a warning is
   logged with the group's size).

Memory: a partition is held by one worker: about one data file's rows, plus any band value
shared by very many samples (about 40 bytes a row). Cost for random hashes is
``m * n^2 / 2^(64/m)`` comparisons before the splits; benchmarks/dedup_perceptual_bench.py
measures it against a brute-force scan.
"""

from __future__ import annotations

import logging
import zlib
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators.base import DROPPED, DropReason
from operators.phase2 import FILE_COLUMN, Phase2Step, StepResult, drops
from operators.phash import popcount64

log = logging.getLogger(__name__)

NEAR_DUPLICATE = DropReason("near_duplicate", DROPPED,
                            "pHash within dedup.perceptual.max_hamming bits of a better-ranked sample (larger "
                            "original image, then smaller sample_id), named in duplicate_of")
SPLIT_DEPTH = 2  # levels of pigeonhole re-splitting inside an oversized band group
NONE = np.iinfo(np.int64).max
KEY = "_band_key"
PART = "_part"
BAND_SHIFT = 58  # band index in the key's top 6 bits, band value (<= 58 bits) below


class PerceptualConfig(BaseModel):
    """Perceptual dedup settings (``dedup.perceptual:`` in the job config)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="drop near duplicates by pHash (cheap: one groupby of 64-bit ints; "
                                            "sha256 misses re-encoded, resized and cropped copies)")
    # tests/test_dedup_perceptual.py test_max_hamming_default prints the distributions: distinct
    # generated images are >= 8 bits apart (0.1th percentile 18), JPEG q50-95 / resized 0.5-2x copies
    # of block images <= 6-8, gradients and 5% crops spread wider. 6 keeps a 2-bit margin below the
    # closest distinct pair and costs m = 7 bands of 9-10 bits.
    max_hamming: int = Field(6, ge=0, le=31, description="largest Hamming distance (bits of 64) between the pHashes "
                                                         "of near duplicates; m = max_hamming + 1 bands")
    keep: Literal["largest_image"] = Field("largest_image",
                      description="which sample of a near pair is kept: largest_image (orig_width * orig_height, "
                                  "then the smaller sample_id)")
    exact_group: int = Field(1024, ge=16, description="groups of at most this many distinct hashes are compared "
                                                     "all-pairs; larger ones are split again by pigeonhole")
    window: int = Field(256, ge=1, description="groups still larger after the splits: each hash is compared with "
                                               "the next window hashes in full-hash order (approximate)")


def band_masks(free_mask: int, parts: int) -> list[int]:
    """Split the set bits of ``free_mask`` (a 64-bit mask) into ``parts`` bands of consecutive bits,
    as even as possible (the first ones a bit wider), highest bits first."""
    bits = [b for b in range(63, -1, -1) if free_mask >> b & 1]
    parts = min(parts, len(bits))
    out, start = [], 0
    for k in range(parts):
        width = len(bits) // parts + (1 if k < len(bits) % parts else 0)
        mask = 0
        for b in bits[start:start + width]:
            mask |= 1 << b
        out.append(mask)
        start += width
    return out


def _update_runs(h: np.ndarray, r: np.ndarray, run: np.ndarray, best: np.ndarray, d: int, span: int) -> None:
    """Arrays sorted by (run, rank): each element's best (smallest) rank among earlier elements of
    its run within ``d`` bits, for runs of at most ``span`` elements; updates ``best`` in place."""
    for o in range(1, span):
        near = (run[:-o] == run[o:]) & (popcount64(h[:-o] ^ h[o:]) <= d)
        if near.any():
            best[o:] = np.where(near, np.minimum(best[o:], r[:-o]), best[o:])


def _small_runs(hs: np.ndarray, rs: np.ndarray, run: np.ndarray, size_of: np.ndarray, d: int, limit: int) -> np.ndarray:
    """Arrays sorted by (run, rank): best twin rank of each element in runs of at most ``limit``
    (all pairs), in size classes so that the offsets loop spans the class, not the largest run."""
    best = np.full(len(hs), NONE, np.int64)
    small = size_of <= limit
    lo = 1
    while lo < limit:
        hi = min(lo * 2, limit)
        sel = np.flatnonzero(small & (size_of > lo) & (size_of <= hi))
        if len(sel):
            part = best[sel]
            _update_runs(hs[sel], rs[sel], run[sel], part, d, int(size_of[sel].max()))
            best[sel] = part
        lo = hi
    return best


def _windowed(h: np.ndarray, r: np.ndarray, d: int, window: int) -> np.ndarray:
    """Approximate: sorted by full hash, each hash against the next ``window`` ones."""
    order = np.argsort(h, kind="stable")
    hs, rs = h[order], r[order]
    best = np.full(len(h), NONE, np.int64)
    for o in range(1, min(window, len(h) - 1) + 1):
        near = popcount64(hs[:-o] ^ hs[o:]) <= d
        a, b = rs[:-o], rs[o:]
        best[o:] = np.where(near & (a < b), np.minimum(best[o:], a), best[o:])
        best[:-o] = np.where(near & (b < a), np.minimum(best[:-o], b), best[:-o])
    out = np.empty_like(best)
    out[order] = best
    return out


def _distinct(h: np.ndarray, r: np.ndarray, fixed: int, d: int, cfg: PerceptualConfig, depth: int,
              stats: dict | None = None) -> np.ndarray:
    """Best-ranked twin of each of ``h`` (distinct hashes agreeing on the bits of ``fixed``), as rank
    (``NONE``: none ranked above it)."""
    n = len(h)
    best = np.full(n, NONE, np.int64)
    if n < 2:
        return best
    if n <= cfg.exact_group:
        order = np.argsort(r, kind="stable")
        sub = np.full(n, NONE, np.int64)
        _update_runs(h[order], r[order], np.zeros(n, np.int64), sub, d, n)
        best[order] = sub
        return best
    # bits that vary within the group (the others are equal for all: as good as fixed)
    free = int(np.bitwise_or.reduce(h ^ h[0])) & ~fixed & ((1 << 64) - 1)
    if bin(free).count("1") <= d:  # any two differ in at most the free bits: all are twins
        top = int(r.min())
        return np.where(r == top, NONE, top).astype(np.int64)
    if depth >= SPLIT_DEPTH:
        if stats is not None:
            stats["windowed"] = stats.get("windowed", 0) + 1
            stats["windowed_rows"] = stats.get("windowed_rows", 0) + n
        return _windowed(h, r, d, cfg.window)
    for mask in band_masks(free, d + 1):
        key = h & np.uint64(mask)
        order = np.lexsort((r, key))
        ks = key[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        sizes = np.diff(np.r_[starts, n])
        run = np.repeat(np.arange(len(starts)), sizes)
        hs, rs = h[order], r[order]
        sub = _small_runs(hs, rs, run, sizes[run], d, cfg.exact_group)
        for s, size in zip(starts[sizes > cfg.exact_group], sizes[sizes > cfg.exact_group]):
            idx = np.arange(s, s + size)
            sub[idx] = np.minimum(sub[idx], _distinct(hs[idx], rs[idx], fixed | mask, d, cfg, depth + 1, stats))
        best[order] = np.minimum(best[order], sub)
    return best


def best_twins(h: np.ndarray, r: np.ndarray, d: int, cfg: PerceptualConfig, fixed: int = 0,
               stats: dict | None = None) -> np.ndarray:
    """For each hash of a group (``h`` int64/uint64, agreeing on the bits of ``fixed``; ``r`` distinct
    ranks, smaller is better): the rank of its best-ranked twin within ``d`` bits ranked above it,
    ``NONE`` when there is none. Identical hashes are collapsed to their best-ranked copy first.
    ``stats`` (optional) counts the sub-groups resolved by the approximate window."""
    h = np.asarray(h).astype(np.int64).view(np.uint64)
    r = np.asarray(r, np.int64)
    uniq, inv = np.unique(h, return_inverse=True)
    if len(uniq) == len(h):
        return _distinct(h, r, fixed, d, cfg, 0 if fixed else -1, stats)
    rep = np.full(len(uniq), NONE, np.int64)
    np.minimum.at(rep, inv, r)
    best_u = _distinct(uniq, rep, fixed, d, cfg, 0 if fixed else -1, stats)
    own = rep[inv]
    return np.minimum(best_u[inv], np.where(r == own, NONE, own))


def near_pairs_reference(h: np.ndarray, d: int) -> set[tuple[int, int]]:
    """All pairs (i < j) within ``d`` bits, brute force (tests and the benchmark)."""
    h = np.asarray(h).astype(np.int64).view(np.uint64)
    out: set[tuple[int, int]] = set()
    for i in range(len(h) - 1):
        js = np.flatnonzero(popcount64(h[i + 1:] ^ h[i]) <= d) + i + 1
        out.update((i, int(j)) for j in js)
    return out


# --- the phase-2 step ---------------------------------------------------------------------------
def _area(t: pa.Table) -> np.ndarray:
    w = pc.fill_null(t.column("orig_width").cast(pa.int64()), 0).to_numpy()
    hgt = pc.fill_null(t.column("orig_height").cast(pa.int64()), 0).to_numpy()
    return w * hgt


def _explode(t: pa.Table, masks: list[int], partitions: int) -> pa.Table:
    """One row per (sample, band): the group key, its hash partition, and what resolving needs."""
    t = t.filter(pc.is_valid(t.column("phash")))
    h = t.column("phash").to_numpy().astype(np.int64).view(np.uint64)
    area = _area(t)
    keys = []
    for k, mask in enumerate(masks):
        shift = (mask & -mask).bit_length() - 1  # bands are consecutive bits: value = (h & mask) >> low bit
        keys.append(((np.uint64(k) << np.uint64(BAND_SHIFT)) | ((h & np.uint64(mask)) >> np.uint64(shift)))
                    .view(np.int64))
    m = len(masks)
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    # the hash partition of the key (a multiplicative hash: band values are small consecutive ints)
    part = ((key.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)) % np.uint64(partitions)
    return pa.table({KEY: pa.array(key), PART: pa.array(part.astype(np.int32)),
                     "phash": pa.array(np.tile(h.view(np.int64), m)),
                     "area": pa.array(np.tile(area, m)),
                     "sample_id": pa.concat_arrays([t.column("sample_id").combine_chunks()] * m) if m else
                     pa.array([], pa.string()),
                     FILE_COLUMN: pa.concat_arrays([t.column(FILE_COLUMN).combine_chunks()] * m) if m else
                     pa.array([], pa.int32())})


def _resolve_partition(g: pa.Table, masks: list[int], d: int, cfg: PerceptualConfig) -> pa.Table:
    """The (band, value) groups of one hash partition, resolved together with numpy: each row with
    a better-ranked twin in its group, and that twin."""
    sid = g.column("sample_id").combine_chunks()
    area = g.column("area").to_numpy()
    key = g.column(KEY).to_numpy()
    h = g.column("phash").to_numpy().view(np.uint64)
    n = len(h)
    # dense rank of each sample (its rows in several bands share it): larger area, then smaller id
    by_rank = pc.sort_indices(pa.table({"a": -area, "s": sid}),
                              sort_keys=[("a", "ascending"), ("s", "ascending")]).to_numpy()
    sorted_sid = sid.take(pa.array(by_rank))
    new = np.r_[True, (area[by_rank][1:] != area[by_rank][:-1])
                | pc.not_equal(sorted_sid[1:], sorted_sid[:-1]).to_numpy(zero_copy_only=False)] if n else \
        np.zeros(0, bool)
    rank = np.empty(n, np.int64)
    rank[by_rank] = np.cumsum(new) - 1
    row_of_rank = by_rank[new]
    order = np.lexsort((rank, key))
    ks, hs, rs = key[order], h[order], rank[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]]) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    run = np.repeat(np.arange(len(starts)), sizes)
    best = _small_runs(hs, rs, run, sizes[run], d, cfg.exact_group)
    for s, size in zip(starts[sizes > cfg.exact_group], sizes[sizes > cfg.exact_group]):
        band = int(ks[s]) >> BAND_SHIFT
        stats: dict = {}
        best[s:s + size] = best_twins(hs[s:s + size], rs[s:s + size], d, cfg, fixed=masks[band], stats=stats)
        if stats:
            log.warning("dedup.perceptual: band %d group of %d samples: %d sub-groups (%d rows) still over %d "
                        "after %d splits, compared within a window of %d (approximate)", band, size,
                        stats["windowed"], stats["windowed_rows"], cfg.exact_group, SPLIT_DEPTH, cfg.window)
    hit = np.flatnonzero(best != NONE)
    me, twin = order[hit], row_of_rank[best[hit]]
    files = g.column(FILE_COLUMN).to_numpy()
    return pa.table({"sample_id": sid.take(pa.array(me, pa.int64())),
                     FILE_COLUMN: pa.array(files[me], pa.int32()),
                     "twin": sid.take(pa.array(twin, pa.int64())),
                     "twin_area": pa.array(area[twin], pa.int64()),
                     "distance": pa.array(popcount64(h[me] ^ h[twin]), pa.int32())})


def _decide(g: pa.Table) -> pa.Table:
    """Each sample's twins over all bands (a partition by sample_id): the best-ranked one (larger
    area, then smaller sample_id) is its duplicate_of."""
    order = pc.sort_indices(g, sort_keys=[("sample_id", "ascending"), ("twin_area", "descending"),
                                          ("twin", "ascending")])
    g = g.take(order)
    sid = g.column("sample_id").combine_chunks()
    first = np.r_[True, pc.not_equal(sid[1:], sid[:-1]).to_numpy(zero_copy_only=False)] if len(sid) else \
        np.zeros(0, bool)
    g = g.filter(pa.array(first))
    msgs = [f"pHash {d} bits from {t}" for d, t in zip(g.column("distance").to_pylist(), g.column("twin").to_pylist())]
    return drops(g.column(FILE_COLUMN).to_pylist(), g.column("sample_id").to_pylist(), NEAR_DUPLICATE.name, msgs,
                 g.column("twin").to_pylist())


def _sample_partition(t: pa.Table, partitions: int) -> pa.Table:
    """A twin row's partition by its sample_id (crc32; only samples with a better twin get here)."""
    part = [zlib.crc32(s.encode()) % partitions for s in t.column("sample_id").to_pylist()]
    return t.append_column(PART, pa.array(part, pa.int32()))


class PerceptualDedupStep(Phase2Step):
    """Phase-2 step ``dedup.perceptual`` (see the module docstring)."""

    name = "dedup.perceptual"
    stage = "dedup"
    reasons = (NEAR_DUPLICATE,)

    def __init__(self, config: PerceptualConfig | dict | None = None, partitions: int | None = None):
        self.config = config if isinstance(config, PerceptualConfig) else PerceptualConfig(**(config or {}))
        self.partitions = partitions

    def reads(self) -> tuple[str, ...]:
        return ("phash", "orig_width", "orig_height")

    def run(self, ctx) -> StepResult:
        cfg = self.config
        d = cfg.max_hamming
        masks = band_masks((1 << 64) - 1, d + 1)
        # about one data file's rows (times the bands) per partition, as dedup.exact
        parts = self.partitions or max(ctx.parallelism, ctx.num_files * len(masks))
        report = {"max_hamming": d, "bands": len(masks),
                  "band_bits": [bin(m).count("1") for m in masks], "keep": cfg.keep,
                  "exact_group": cfg.exact_group, "window": cfg.window}
        candidates = ctx.alive(self.reads(), then=lambda t: _explode(t, masks, parts))
        # groups by hash partition of (band, value), each partition's groups resolved together
        twins = candidates.groupby(PART, num_partitions=parts).map_groups(
            lambda g: _resolve_partition(g, masks, d, cfg), batch_format="pyarrow")
        decisions = twins.map_batches(lambda t: _sample_partition(t, parts), batch_format="pyarrow").groupby(
            PART, num_partitions=parts).map_groups(_decide, batch_format="pyarrow")
        return StepResult(report, decisions)
