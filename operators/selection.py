"""Global top-fraction selection with an exact threshold in two streaming passes.

DataComp (Gadre et al., 2023) keeps the top 30% of a pool by CLIP score; Compress & Align
keeps a top fraction by reward. At billions of rows the scores cannot be sorted in one
process, so the threshold is found exactly with two mergeable histograms over the float32
bit pattern (mapped to an order-preserving uint32 key): pass 1 counts the high 16 bits,
pass 2 counts the low 16 bits inside the one high bucket that holds the cut. Memory is two
arrays of 65,536 counters per task, whatever the number of rows; partial histograms from
many tasks simply add.

The target count is ``k = ceil(fraction * N)`` computed exactly on the fraction as written
(0.07 of 100 is 7, not the 8 that float arithmetic gives), and the threshold is exactly the
k-th largest score. Ties at the threshold are all kept (DataComp's reference
``baselines/apply_filter.py`` also keeps ``score >= threshold``), so the kept count can exceed k
by the number of rows that share the threshold value. DataComp takes its threshold at sorted
position ``int(fraction * N)`` (0-based), which keeps one more row than k when ``fraction * N``
is an integer; ours keeps exactly k then. ``-0.0`` and ``+0.0`` are one score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from operators.base import DROPPED, DropReason
from operators.phase2 import Phase2Step, StepResult, drops

BINS = 1 << 16
TOP_FRACTION_REASON = DropReason("{column}_not_top_{fraction}", DROPPED,
                                 "below the global top fraction by that score (selection.clip_top_fraction: "
                                 "`clip_score_not_top_0.3`; selection.reward_top_fraction: `reward_not_top_0.3`)")


class SelectionConfig(BaseModel):
    """Phase-2 selections (``selection:`` in the job config). They apply in the order listed here,
    each over what the previous kept (jobs/phase2.py); a sample's final status names the first
    that dropped it."""

    model_config = ConfigDict(extra="forbid")

    clip_top_fraction: float | None = Field(None, gt=0, le=1, description="step 1: keep the top fraction by "
                                                                         "clip_score over the whole run (DataComp: 0.3)")
    reward_top_fraction: float | None = Field(None, gt=0, le=1, description="step 2: keep the top fraction by "
                                                                           "reward of what step 1 kept (Compress & "
                                                                           "Align: <= 0.3)")

    def fractions(self) -> dict[str, tuple[str, float]]:
        """The configured selections: name -> (score column, fraction)."""
        picked = {"clip_top_fraction": ("clip_score", self.clip_top_fraction),
                  "reward_top_fraction": ("reward", self.reward_top_fraction)}
        return {k: v for k, v in picked.items() if v[1] is not None}


def top_k(fraction: float, n: int) -> int:
    """``ceil(fraction * n)`` in exact arithmetic on the fraction as written: the shortest decimal
    that reads back as the float (``repr``), so 0.07 is 7/100, not the binary 0.0700000000000000067."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    f = Fraction(repr(float(fraction)))
    return -(-(f.numerator * int(n)) // f.denominator)


def sortable_keys(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys with the same order (negative floats flipped, positives offset);
    ``-0.0`` is folded into ``+0.0`` first, so equal scores have one key."""
    v = np.ascontiguousarray(values, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0
    bits = v.view(np.uint32)
    neg = (bits >> 31).astype(bool)
    return np.where(neg, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def keys_to_floats(keys: np.ndarray) -> np.ndarray:
    """The inverse of ``sortable_keys``: uint32 keys -> their float32 values."""
    k = np.asarray(keys, dtype=np.uint32)
    bits = np.where((k >> np.uint32(31)).astype(bool), k & np.uint32(0x7FFFFFFF), ~k).astype(np.uint32)
    return bits.view(np.float32)


def key_to_float(key: int) -> float:
    return float(keys_to_floats(np.array([key], dtype=np.uint32))[0])


def scores_of(table: pa.Table, column: str) -> np.ndarray:
    """Scores of kept rows with a non-null, finite score."""
    mask = pc.and_(pc.equal(table.column("status"), "kept"), pc.is_valid(table.column(column)))
    vals = pc.filter(table.column(column), mask).to_numpy(zero_copy_only=False).astype(np.float32)
    return vals[np.isfinite(vals)]


def high_histogram(values: np.ndarray) -> np.ndarray:
    """Pass 1: counts of the high 16 bits of the keys."""
    return np.bincount(sortable_keys(values) >> np.uint32(16), minlength=BINS).astype(np.int64)


def low_histogram(values: np.ndarray, high: int) -> np.ndarray:
    """Pass 2: counts of the low 16 bits of the keys whose high 16 bits equal ``high``."""
    keys = sortable_keys(values)
    sel = keys[(keys >> np.uint32(16)) == np.uint32(high)]
    return np.bincount(sel & np.uint32(0xFFFF), minlength=BINS).astype(np.int64)


@dataclass
class Cut:
    """Where the top ``k`` of ``n`` scores begin."""

    n: int
    k: int
    high: int | None = None
    above_high: int = 0  # rows in high buckets strictly above ``high``
    threshold: float | None = None


def locate_high(hist: np.ndarray, fraction: float) -> Cut:
    """From the merged pass-1 histogram: the high bucket that holds the k-th largest score."""
    n = int(hist.sum())
    k = top_k(fraction, n)
    cut = Cut(n=n, k=k)
    if k == 0:
        cut.threshold = math.inf
        return cut
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))  # first position where the cumulative count reaches k
    cut.high = BINS - 1 - idx
    cut.above_high = int(from_top[idx - 1]) if idx > 0 else 0
    return cut


def finish_threshold(cut: Cut, low_hist: np.ndarray) -> Cut:
    """From the merged pass-2 histogram: the exact k-th largest score."""
    if cut.high is None:
        return cut
    need = cut.k - cut.above_high
    from_top = np.cumsum(low_hist[::-1])
    idx = int(np.searchsorted(from_top, need))
    low = BINS - 1 - idx
    cut.threshold = key_to_float((cut.high << 16) | low)
    return cut


def exact_top_threshold(fraction: float, high_pass: Callable[[], np.ndarray],
                        low_pass: Callable[[int], np.ndarray]) -> Cut:
    """Exact threshold from two passes over the scores: ``high_pass()`` returns the merged
    ``high_histogram`` of all scores, ``low_pass(high)`` the merged ``low_histogram`` inside the
    high bucket that holds the cut (phase 2 runs each pass as one Ray task per file)."""
    cut = locate_high(high_pass(), fraction)
    if cut.high is None:
        return cut
    return finish_threshold(cut, low_pass(cut.high))


def apply_threshold(table: pa.Table, column: str, threshold: float, stage: str, reason: str) -> pa.Table:
    """Final status of each row: kept rows below the threshold (or without a score) are dropped."""
    from operators.base import KEPT, mark

    kept = pc.equal(table.column("status"), KEPT).to_pylist()
    rows = [k for k, v in enumerate(kept) if v]
    idx, msgs = _below(table.take(pa.array(rows, pa.int64())), column, threshold)
    outcomes: list = [None] * table.num_rows
    for j, m in zip(idx, msgs):
        outcomes[rows[j]] = (DROPPED, reason, m)
    return mark(table, stage, outcomes)


# --- the phase-2 step ---------------------------------------------------------------------------
def _below(table: pa.Table, column: str, threshold: float) -> tuple[list[int], list[str]]:
    """Rows of ``table`` (all kept) outside the top: below the threshold, or without a finite score."""
    idx, msgs = [], []
    for k, s in enumerate(table.column(column).to_pylist()):
        if s is None or not math.isfinite(s):
            idx.append(k)
            msgs.append(f"no {column}")
        elif s < threshold:
            idx.append(k)
            msgs.append(f"{column} {s} < {threshold:.6g}")
    return idx, msgs


def _bins(table: pa.Table, column: str, high: int | None) -> pa.Table:
    """Non-empty histogram bins of the finite scores in ``table``: pass 1 (``high`` None) counts the
    high 16 bits of the keys, pass 2 the low 16 bits inside high bucket ``high``."""
    vals = pc.drop_null(table.column(column)).to_numpy(zero_copy_only=False).astype(np.float32)
    keys = sortable_keys(vals[np.isfinite(vals)])
    if high is None:
        keys = keys >> np.uint32(16)
    else:
        keys = keys[(keys >> np.uint32(16)) == np.uint32(high)] & np.uint32(0xFFFF)
    bins, counts = np.unique(keys, return_counts=True)
    return pa.table({"bin": pa.array(bins.astype(np.int64)), "n": pa.array(counts.astype(np.int64))})


class TopFractionStep(Phase2Step):
    """Phase-2 step: keep the top ``fraction`` by ``column`` of the samples still kept. The two
    histogram passes are merged by Ray Data's ``groupby("bin").sum`` (at most 65,536 rows reach the
    driver), then every kept row below the exact threshold, or without a score, is dropped."""

    stage = "selection"
    reasons = (TOP_FRACTION_REASON,)

    def __init__(self, key: str, column: str, fraction: float):
        self.name = f"selection.{key}"
        self.column = column
        self.fraction = fraction

    def reads(self) -> tuple[str, ...]:
        return (self.column,)

    def run(self, ctx):
        col = self.column

        def hist(high: int | None) -> np.ndarray:
            ds = ctx.alive([col], then=lambda t: _bins(t, col, high))
            out = np.zeros(BINS, np.int64)
            for row in ds.groupby("bin").sum("n").take_all():
                out[int(row["bin"])] = int(row["sum(n)"])
            return out

        cut = exact_top_threshold(self.fraction, lambda: hist(None), lambda high: hist(high))
        reason = TOP_FRACTION_REASON.format(column=col, fraction=self.fraction)
        threshold = cut.threshold

        def decide(t: pa.Table) -> pa.Table:
            idx, msgs = _below(t, col, threshold)
            sel = pa.array(idx, pa.int64())
            return drops(t.column("_file").take(sel).to_pylist(), t.column("sample_id").take(sel).to_pylist(),
                         reason, msgs)

        decisions = ctx.alive([col], then=decide)
        report = {"column": col, "fraction": self.fraction, "scored": cut.n, "target_kept": cut.k,
                  "threshold": threshold}
        return StepResult(report, decisions)
