"""Exact dedup: samples whose downloaded bytes have the same sha256 are one image.

Many URLs of one image are many alt-texts of it (LAION's pool holds the same stock photo under
thousands of URLs), so the kept sample gets its twins' captions: its own first, then the twins'
in ``sample_id`` order, each distinct caption once, at most ``dedup.max_captions``. Their
per-caption ``clip_scores`` / ``reward_scores`` come along (phase 1 scored each copy's captions
on the same image bytes, so the scores are the ones the model would give the merged list), and
the snapshot's best caption is then the best of them all. Which sample is kept: the smallest ``sample_id`` (a hash of the URL,
so the choice does not depend on crawl order, waves or partitioning). The others are dropped
with ``exact_duplicate`` and ``duplicate_of`` = the kept sample.

Distributed: alive rows are partitioned by a prefix of their sha256 (Ray Data ``groupby`` on it,
as many partitions as data files, so a partition holds about one data file's narrow columns
whatever the run size); all copies of an image share a prefix, so each partition resolves its own
groups alone.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from operators.base import DROPPED, DropReason
from operators.phase2 import FILE_COLUMN, Phase2Step, StepResult, drops, merges

EXACT_DUPLICATE = DropReason("exact_duplicate", DROPPED,
                             "the same image bytes (sha256) as a kept sample, named in duplicate_of")
PART = "_part"


def partition_of(sha256: pa.Array, partitions: int) -> pa.Array:
    """The partition of each sha256 (hex): its first 8 hex digits modulo ``partitions``."""
    prefix = pc.utf8_slice_codeunits(sha256, 0, 8).to_pylist()
    return pa.array([int(p, 16) % partitions for p in prefix], pa.int32())


def merge_captions(groups: list[tuple[list | None, list | None]], max_captions: int,
                   scores: list[dict[str, list | None]] | None = None) -> tuple[list, list, dict[str, list]]:
    """Captions of one image from its copies, kept sample first: each distinct caption once, at most
    ``max_captions``; their sources and per-caption scores (by column) stay aligned. A score list
    is carried only when every copy has it."""
    caps: list = []
    srcs: list = []
    seen: set = set()
    cols = [c for c in (scores[0] if scores else {}) if all(s.get(c) is not None for s in scores)]
    out_scores: dict[str, list] = {c: [] for c in cols}
    for g, (captions, sources) in enumerate(groups):
        captions = list(captions or [])
        sources = (list(sources or []) + [None] * len(captions))[:len(captions)]
        for j, (c, s) in enumerate(zip(captions, sources)):
            if c is None or c in seen or len(caps) >= max_captions:
                continue
            seen.add(c)
            caps.append(c)
            srcs.append(s)
            for col in cols:
                vals = scores[g][col]
                out_scores[col].append(vals[j] if j < len(vals) else None)
    return caps, srcs, out_scores


def resolve_exact(table: pa.Table, merge: bool, max_captions: int, score_columns: tuple[str, ...] = ()) -> pa.Table:
    """Decisions for one partition: every sha256 with several samples keeps the smallest sample_id."""
    if table.num_rows == 0:
        return drops([], [], EXACT_DUPLICATE.name, None)
    order = pc.sort_indices(table, sort_keys=[("sha256", "ascending"), ("sample_id", "ascending")])
    t = table.take(order)
    sha = t.column("sha256").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, sha[1:] != sha[:-1]])
    ends = np.r_[starts[1:], len(sha)]
    ids = t.column("sample_id").to_pylist()
    files = t.column(FILE_COLUMN).to_pylist()
    captions = t.column("captions").to_pylist() if merge else None
    sources = t.column("caption_sources").to_pylist() if merge else None
    score_lists = {c: t.column(c).to_pylist() for c in score_columns} if merge else {}
    d_files, d_ids, d_twins = [], [], []
    m_files, m_ids, m_caps, m_srcs = [], [], [], []
    m_scores: dict[str, list] = {c: [] for c in score_lists}
    for a, b in zip(starts, ends):
        if b - a < 2:
            continue
        d_files += files[a + 1:b]
        d_ids += ids[a + 1:b]
        d_twins += [ids[a]] * (b - a - 1)
        if merge:
            caps, srcs, scores = merge_captions([(captions[k], sources[k]) for k in range(a, b)], max_captions,
                                                [{c: v[k] for c, v in score_lists.items()} for k in range(a, b)])
            if caps != list(captions[a] or []):
                m_files.append(files[a])
                m_ids.append(ids[a])
                m_caps.append(caps)
                m_srcs.append(srcs)
                for c in m_scores:
                    m_scores[c].append(scores.get(c))
    msgs = [f"same sha256 as {twin}" for twin in d_twins]
    out = drops(d_files, d_ids, EXACT_DUPLICATE.name, msgs, d_twins)
    if m_ids:
        out = pa.concat_tables([out, merges(m_files, m_ids, m_caps, m_srcs, m_scores)])
    return out


class ExactDedupStep(Phase2Step):
    """Phase-2 step ``dedup.exact`` (see the module docstring)."""

    name = "dedup.exact"
    stage = "dedup"
    reasons = (EXACT_DUPLICATE,)

    def __init__(self, merge_captions: bool = True, max_captions: int = 16, partitions: int | None = None):
        self.merge = merge_captions
        self.max_captions = max_captions
        self.partitions = partitions

    def reads(self) -> tuple[str, ...]:
        return ("sha256", "captions", "caption_sources") if self.merge else ("sha256",)

    def run(self, ctx) -> StepResult:
        parts = self.partitions or max(ctx.parallelism, ctx.num_files)
        merge, max_captions = self.merge, self.max_captions
        # Per-caption scores travel with merged captions (the same image: the same score).
        scored = tuple(c for c in ("clip_scores", "reward_scores") if merge and c in ctx.data_columns())
        cols = [*self.reads(), *scored]

        def keyed(t: pa.Table) -> pa.Table:
            t = t.filter(pc.is_valid(t.column("sha256")))
            return t.append_column(PART, partition_of(t.column("sha256"), parts))

        ds = ctx.alive(cols, then=keyed)
        decisions = ds.groupby(PART, num_partitions=min(parts, ctx.parallelism)).map_groups(
            lambda g: resolve_exact(g, merge, max_captions, scored), batch_format="pyarrow")
        return StepResult({"partitions": parts, "merge_captions": merge}, decisions)
