"""Exact global top-fraction threshold from mergeable histograms, checked against a full sort."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from operators.selection import (apply_threshold, exact_top_threshold, high_histogram, key_to_float, low_histogram,
                                 sortable_keys)


def top_threshold(chunks, fraction: float):
    """exact_top_threshold with both passes over in-memory chunks (phase 2 runs them as Ray tasks)."""
    return exact_top_threshold(fraction, lambda: sum(high_histogram(c) for c in chunks),
                               lambda high: sum(low_histogram(c, high) for c in chunks))


def threshold_by_sort(scores: np.ndarray, fraction: float) -> float:
    k = math.ceil(fraction * len(scores))
    return float(np.sort(scores.astype(np.float32))[::-1][k - 1])


@pytest.mark.parametrize("fraction", [1e-4, 0.01, 0.3, 0.5, 0.9, 1.0])
def test_matches_full_sort(fraction):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.25, 0.08, 20000), rng.uniform(-1, 1, 500),
                             np.full(300, 0.3)]).astype(np.float32)  # ties, negatives
    chunks = np.array_split(scores, 7)
    cut = top_threshold(chunks, fraction)
    assert cut.threshold == threshold_by_sort(scores, fraction)
    assert cut.n == len(scores) and cut.k == math.ceil(fraction * len(scores))
    assert (scores >= cut.threshold).sum() >= cut.k


def test_ties_at_threshold_are_all_kept():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.1], np.float32)
    cut = top_threshold([scores], 0.4)  # k = 2
    assert cut.threshold == np.float32(0.5)
    assert (scores >= cut.threshold).sum() == 4


def test_empty_input_keeps_nothing():
    cut = top_threshold([np.array([], np.float32)], 0.3)
    assert cut.n == 0 and cut.threshold == math.inf


def test_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        top_threshold([np.ones(3, np.float32)], 1.5)


def test_sortable_keys_preserve_order_and_invert():
    rng = np.random.default_rng(1)
    v = np.sort(np.concatenate([rng.normal(0, 10, 1000), [-np.inf, np.inf, 0.0, -1e-30, 1e-30]]).astype(np.float32))
    keys = sortable_keys(v)
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)
    for x, k in zip(v[::97], keys[::97]):
        assert key_to_float(int(k)) == x


def test_apply_threshold_marks_only_kept_rows():
    t = pa.table({
        "status": ["kept", "kept", "dropped", "kept"],
        "drop_stage": pa.array([None, None, "download", None], pa.string()),
        "drop_reason": pa.array([None, None, "http_404", None], pa.string()),
        "error_message": pa.array([None] * 4, pa.string()),
        "clip_score": pa.array([0.5, 0.1, None, None], pa.float32()),
    })
    out = apply_threshold(t, "clip_score", 0.3, "selection", "clip_score_not_top_0.3").to_pylist()
    assert [r["status"] for r in out] == ["kept", "dropped", "dropped", "dropped"]
    assert out[1]["drop_reason"] == "clip_score_not_top_0.3" and out[1]["drop_stage"] == "selection"
    assert out[2]["drop_reason"] == "http_404"  # untouched
    assert out[3]["drop_reason"] == "clip_score_not_top_0.3"  # kept but unscored: not in the top
