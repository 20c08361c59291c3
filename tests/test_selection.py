"""Exact global top-fraction threshold from mergeable histograms, checked against a full sort."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from operators.selection import (apply_threshold, exact_top_threshold, high_histogram, key_to_float, low_histogram,
                                 sortable_keys, top_k)


def top_threshold(chunks, fraction: float):
    """exact_top_threshold with both passes over in-memory chunks (phase 2 runs them as Ray tasks)."""
    return exact_top_threshold(fraction, lambda: sum(high_histogram(c) for c in chunks),
                               lambda high: sum(low_histogram(c, high) for c in chunks))


def kth_largest(scores: np.ndarray, k: int) -> float:
    return float(np.sort(scores.astype(np.float32))[::-1][k - 1])


N_SORT = 20800
# (fraction, k): k = ceil(fraction * 20800) worked out by hand. 0.07, 0.14, 0.28 and 0.55 are the
# fractions whose float product lands a hair above the integer (0.07 * 20800 = 1456.0000000000002).
EXACT_K = [(1e-4, 3), (0.01, 208), (0.07, 1456), (0.14, 2912), (0.28, 5824), (0.3, 6240), (0.5, 10400),
           (0.55, 11440), (0.9, 18720), (1.0, 20800)]


@pytest.mark.parametrize("fraction,k", EXACT_K)
def test_matches_full_sort(fraction, k):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.25, 0.08, 20000), rng.uniform(-1, 1, 500),
                             np.full(300, 0.3)]).astype(np.float32)  # ties, negatives
    assert len(scores) == N_SORT
    chunks = np.array_split(scores, 7)
    cut = top_threshold(chunks, fraction)
    assert cut.n == N_SORT and cut.k == k
    assert cut.threshold == kth_largest(scores, k)
    kept = int((scores >= cut.threshold).sum())
    ties = int((scores == cut.threshold).sum())
    assert k <= kept <= k + ties - 1  # exactly k, plus the others that share the threshold


@pytest.mark.parametrize("fraction,n,k", [(0.07, 100, 7), (0.14, 100, 14), (0.28, 100, 28), (0.55, 100, 55),
                                          (0.3, 10, 3), (0.3, 11, 4), (1e-9, 5, 1), (1.0, 7, 7), (0.0, 9, 0)])
def test_top_k_is_exact_on_the_fraction_as_written(fraction, n, k):
    assert top_k(fraction, n) == k


def test_seven_percent_of_a_hundred_keeps_seven():
    scores = np.arange(100, dtype=np.float32)  # distinct: no ties to keep
    cut = top_threshold([scores], 0.07)
    assert cut.k == 7 and cut.threshold == 93.0 and int((scores >= cut.threshold).sum()) == 7


def test_negative_and_positive_zero_are_one_score():
    assert sortable_keys(np.array([-0.0], np.float32))[0] == sortable_keys(np.array([0.0], np.float32))[0]
    scores = np.array([1.0, 0.0, -0.0, -0.0, 0.0, -1.0], np.float32)
    cut = top_threshold([scores[:3], scores[3:]], 0.5)  # k = 3: the cut falls among the zeros
    assert cut.threshold == 0.0 and math.copysign(1.0, cut.threshold) == 1.0
    # the pass-2 histogram holds all four zeros in one bin
    high = int(sortable_keys(np.array([0.0], np.float32))[0]) >> 16
    assert low_histogram(scores, high).max() == 4


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


def _phase1_files(root) -> list[str]:
    """Three phase-1 data files: 4 samples dropped in phase 1, 40 kept with clip_score i/40 and the
    opposite reward 1 - i/40 (none for i = 38, 39)."""
    import pyarrow.parquet as pq

    rows = [{"sample_id": f"d{j}", "status": "dropped", "drop_stage": "download", "drop_reason": "http_404",
             "error_message": "404", "clip_score": None, "reward": None} for j in range(4)]
    rows += [{"sample_id": f"s{i:02d}", "status": "kept", "drop_stage": None, "drop_reason": None,
              "error_message": None, "clip_score": i / 40, "reward": None if i >= 38 else 1 - i / 40}
             for i in range(40)]
    schema = pa.schema([("sample_id", pa.string()), ("status", pa.string()), ("drop_stage", pa.string()),
                        ("drop_reason", pa.string()), ("error_message", pa.string()),
                        ("clip_score", pa.float32()), ("reward", pa.float32())])
    files = []
    (root / "data").mkdir()
    for f, part in enumerate((rows[0::3], rows[1::3], rows[2::3])):
        path = str(root / "data" / f"part-{f}.parquet")
        pq.write_table(pa.Table.from_pylist(part, schema), path)
        files.append(path)
    return files


def test_selections_chain_into_one_final_status(ray_session, tmp_path):
    import json

    import pyarrow.parquet as pq

    from types import SimpleNamespace

    from jobs.phase2 import run_steps, steps_of
    from operators.selection import SelectionConfig

    files = _phase1_files(tmp_path)
    cfg = SimpleNamespace(selection=SelectionConfig(clip_top_fraction=0.5, reward_top_fraction=0.25))
    out = run_steps(steps_of(cfg), files, str(tmp_path))
    clip, reward = out["steps"]["selection.clip_top_fraction"], out["steps"]["selection.reward_top_fraction"]
    # clip: top 20 of 40; reward: over the 20 survivors, 18 scored, ceil(0.25 * 18) = 5
    assert (clip["order"], clip["entering"], clip["scored"], clip["target_kept"], clip["kept"]) == (1, 40, 40, 20, 20)
    assert (reward["order"], reward["entering"], reward["scored"], reward["target_kept"], reward["kept"]) == \
        (2, 20, 18, 5, 5)
    assert clip["threshold"] == pytest.approx(20 / 40) and reward["threshold"] == pytest.approx(1 - 24 / 40)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "final"]  # one set of sidecars
    side = {r["sample_id"]: r for r in pq.read_table(str(tmp_path / "final")).to_pylist()}
    assert len(side) == 44
    assert sorted(k for k, r in side.items() if r["status"] == "kept") == [f"s{i:02d}" for i in range(20, 25)]
    for i in range(20):  # the first step to drop a sample names it
        assert (side[f"s{i:02d}"]["drop_stage"], side[f"s{i:02d}"]["drop_reason"]) == \
            ("selection", "clip_score_not_top_0.5")
    for i in range(25, 40):
        assert (side[f"s{i:02d}"]["drop_stage"], side[f"s{i:02d}"]["drop_reason"]) == \
            ("selection", "reward_not_top_0.25")
    assert side["s39"]["error_message"] == "no reward"
    assert all(side[f"d{j}"]["drop_reason"] == "http_404" for j in range(4))  # phase-1 drops untouched
    final = json.loads((tmp_path / "final" / "_FINAL.json").read_text())
    assert final["final"]["kept"] == 5 and final["final"]["order"] == ["selection.clip_top_fraction",
                                                                        "selection.reward_top_fraction"]
    assert final["final"]["outcomes"] == {"kept": 5, "dropped/download/http_404": 4,
                                          "dropped/selection/clip_score_not_top_0.5": 20,
                                          "dropped/selection/reward_not_top_0.25": 15}


def test_no_selection_writes_nothing(ray_session, tmp_path):
    from types import SimpleNamespace

    from jobs.phase2 import run_phase2
    from operators.selection import SelectionConfig

    files = _phase1_files(tmp_path)
    cfg = SimpleNamespace(selection=SelectionConfig(), output=SimpleNamespace(path=str(tmp_path)), storage=None)
    assert run_phase2(cfg, files) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
