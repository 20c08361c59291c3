"""Exact dedup in phase 2: the same image bytes under several URLs are one sample with all their alt-texts."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from operators.dedup.exact import merge_captions

SCHEMA = pa.schema([("sample_id", pa.string()), ("status", pa.string()), ("drop_stage", pa.string()),
                    ("drop_reason", pa.string()), ("error_message", pa.string()), ("sha256", pa.string()),
                    ("captions", pa.list_(pa.string())), ("caption_sources", pa.list_(pa.string()))])


def _row(sid, sha, caps, status="kept", reason=None):
    return {"sample_id": sid, "status": status, "drop_stage": None if reason is None else "download",
            "drop_reason": reason, "error_message": None, "sha256": sha, "captions": caps,
            "caption_sources": [None] * len(caps)}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _files(root, groups):
    (root / "data").mkdir()
    files = []
    for f, rows in enumerate(groups):
        path = str(root / "data" / f"part-{f}.parquet")
        pq.write_table(pa.Table.from_pylist(rows, SCHEMA), path)
        files.append(path)
    return files


def test_merge_captions_keeps_order_once_each_and_caps():
    caps, srcs, scores = merge_captions([(["a", "b"], ["x", None]), (["b", "c"], None), (["d"], ["y"])], 3,
                                        [{"reward_scores": [0.1, 0.2]}, {"reward_scores": [0.2, 0.3]},
                                         {"reward_scores": [0.4]}])
    assert caps == ["a", "b", "c"] and srcs == ["x", None, None] and scores == {"reward_scores": [0.1, 0.2, 0.3]}
    _, _, partial = merge_captions([(["a"], None), (["b"], None)], 3, [{"clip_scores": [0.1]}, {"clip_scores": None}])
    assert partial == {}  # a copy without scores: the merged list carries none


def test_copies_drop_to_the_smallest_id_and_merge_their_alt_texts(ray_session, tmp_path):
    from jobs.phase2 import run_steps
    from operators.dedup.exact import ExactDedupStep

    a, b = _sha("image a"), _sha("image b")
    files = _files(tmp_path, [
        [_row("s3", a, ["a red car"]), _row("s7", b, ["b one"]), _row("s9", _sha("lonely"), ["alone"])],
        [_row("s1", a, ["red car on a road", "a red car"]), _row("s5", b, ["b two"])],
        [_row("s2", a, ["car"]), _row("s4", None, ["no image"], "dropped", "http_404"),
         _row("s6", a, ["dropped copy"], "dropped", "too_small")],
    ])
    out = run_steps([ExactDedupStep(max_captions=16)], files, str(tmp_path))
    rep = out["steps"]["dedup.exact"]
    assert (rep["entering"], rep["dropped"], rep["kept"], rep["merged"]) == (6, 3, 3, 2)  # s4, s6 dropped before
    side = {r["sample_id"]: r for r in pq.read_table(str(tmp_path / "final")).to_pylist()}
    assert len(side) == 8  # every row of the three files
    for twin, kept in (("s2", "s1"), ("s3", "s1"), ("s7", "s5")):
        assert (side[twin]["status"], side[twin]["drop_stage"], side[twin]["drop_reason"],
                side[twin]["duplicate_of"]) == ("dropped", "dedup", "exact_duplicate", kept)
    assert side["s1"]["status"] == "kept" and side["s5"]["status"] == "kept" and side["s9"]["status"] == "kept"
    # the kept sample's own captions first, then the twins' in sample_id order, each once
    assert side["s1"]["captions"] == ["red car on a road", "a red car", "car"]
    assert side["s5"]["captions"] == ["b two", "b one"]
    assert side["s9"]["captions"] is None  # nothing merged: the data file's captions stand
    # a copy dropped in phase 1 is neither a twin nor a source of captions
    assert side["s6"]["drop_reason"] == "too_small" and side["s4"]["drop_reason"] == "http_404"


def test_partitioning_does_not_change_the_result(ray_session, tmp_path):
    from jobs.phase2 import run_steps
    from operators.dedup.exact import ExactDedupStep

    rows = [_row(f"s{i:03d}", _sha(f"img {i % 13}"), [f"cap {i}"]) for i in range(120)]
    results = []
    for parts in (1, 7):
        root = tmp_path / f"p{parts}"
        root.mkdir()
        files = _files(root, [rows[0::3], rows[1::3], rows[2::3]])
        run_steps([ExactDedupStep(partitions=parts)], files, str(root))
        results.append(sorted((r["sample_id"], r["status"], r["duplicate_of"], tuple(r["captions"] or ()))
                              for r in pq.read_table(str(root / "final")).to_pylist()))
    assert results[0] == results[1]
    kept = [r for r in results[0] if r[1] == "kept"]
    assert len(kept) == 13 and all(len(r[3]) == min(16, len([i for i in range(120) if i % 13 == int(r[0][1:]) % 13]))
                                   for r in kept)


def test_merged_captions_keep_their_scores_and_a_later_top_fraction_ranks_by_the_best(ray_session, tmp_path):
    from jobs.phase2 import run_steps
    from operators.dedup.exact import ExactDedupStep
    from operators.selection import TopFractionStep

    schema = SCHEMA.append(pa.field("reward_scores", pa.list_(pa.float32()))).append(pa.field("reward", pa.float32()))
    a = _sha("image a")
    rows = [dict(_row("s1", a, ["weak alt"]), reward_scores=[0.1], reward=0.1),
            dict(_row("s2", a, ["strong alt"]), reward_scores=[0.9], reward=0.9),
            dict(_row("s3", _sha("image b"), ["middling"]), reward_scores=[0.5], reward=0.5)]
    (tmp_path / "data").mkdir()
    files = []
    for f, part in enumerate((rows[:1], rows[1:])):
        path = str(tmp_path / "data" / f"part-{f}.parquet")
        pq.write_table(pa.Table.from_pylist(part, schema), path)
        files.append(path)
    out = run_steps([ExactDedupStep(), TopFractionStep("reward_top_fraction", "reward", 0.5)], files, str(tmp_path))
    side = {r["sample_id"]: r for r in pq.read_table(str(tmp_path / "final")).to_pylist()}
    assert side["s1"]["captions"] == ["weak alt", "strong alt"]
    assert side["s1"]["reward_scores"] == [pytest.approx(0.1), pytest.approx(0.9)]
    # s1 now holds the 0.9 caption: it, not s3 (0.5), is the top half of the two samples left
    assert out["steps"]["selection.reward_top_fraction"]["threshold"] == pytest.approx(0.9)
    assert side["s1"]["status"] == "kept" and side["s3"]["drop_reason"] == "reward_not_top_0.5"
    assert side["s2"]["duplicate_of"] == "s1"
    # the snapshot's training caption is the best of the merged captions, by their carried rewards
    from operators.snapshot import PublishConfig, publish

    snap = publish(files, str(tmp_path), None, PublishConfig(shard_rows=10), final=True)
    rows = pq.read_table(str(tmp_path / "snapshots" / f"v={snap['version']:04d}")).to_pylist()
    assert [(r["sample_id"], r["caption"]) for r in rows] == [("s1", "strong alt")]
