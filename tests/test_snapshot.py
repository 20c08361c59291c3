"""The published snapshot: kept rows only, merged captions, fixed-size shards, WebDataset read back
with the webdataset library, versions that never touch each other, local and loopback S3.

Expectations are worked out here from the synthetic rows (and a brute-force join of the data files
with their sidecars), never with the code under test."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.base import DROPPED, DropReason
from operators.phase2 import Phase2Step, StepResult, drops, merges
from operators.snapshot import (PublishConfig, finish_rows, image_extension, list_versions, publish,
                                shard_segments)

EMB = 4
SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("status", pa.string()), ("drop_stage", pa.string()), ("drop_reason", pa.string()),
    ("error_message", pa.string()), ("url", pa.string()), ("captions", pa.list_(pa.string())),
    ("caption_sources", pa.list_(pa.string())), ("image", pa.binary()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("clip_scores", pa.list_(pa.float32())),
    ("clip_score", pa.float32()), ("clip_best_caption", pa.int16()), ("reward_scores", pa.list_(pa.float32())),
    ("reward", pa.float32()), ("best_caption", pa.string()), ("best_caption_source", pa.string()),
    ("clip_image_embedding", pa.list_(pa.float32(), EMB)), ("download_open_request_s", pa.float64()),
])


def jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8 + i % 5, 8), ((i * 37) % 256, (i * 11) % 256, (i * 5) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def sid(i: int) -> str:
    return hashlib.blake2b(f"u{i}".encode(), digest_size=16).hexdigest()


def row(i: int) -> dict:
    """Sample i: i % 10 == 9 dropped in phase 1; kept ones have captions c0, c1 and by kind i % 3:
    0 the reward's best c1 (CLIP's is c0), 1 CLIP's best only (c1), 2 neither (the first caption)."""
    r = {f.name: None for f in SCHEMA}
    r.update(sample_id=sid(i), url=f"http://img.test/{i}.jpg", captions=[f"c0-{i}", f"c1-{i}"],
             caption_sources=["alt", "alt"])
    if i % 10 == 9:
        r.update(status="dropped", drop_stage="download", drop_reason="http_404", error_message="404")
        return r
    img = jpeg(i)
    r.update(status="kept", image=img, sha256=hashlib.sha256(img).hexdigest(), width=8 + i % 5, height=8,
             clip_image_embedding=[float(i)] * EMB, download_open_request_s=1.0 if i % 7 == 0 else None)
    if i % 3 == 0:  # the reward model's best wins over CLIP's
        r.update(clip_scores=[0.3, 0.1], clip_score=0.3, clip_best_caption=0,
                 reward_scores=[0.2, 0.9], reward=0.9, best_caption=f"c1-{i}", best_caption_source="alt")
    if i % 3 == 1:
        r.update(clip_scores=[0.1, 0.3], clip_score=0.3, clip_best_caption=1)
    return r


N = 60


def write_files(root: Path, n: int = N, nfiles: int = 3) -> list[str]:
    (root / "data").mkdir(parents=True)
    files = []
    for f in range(nfiles):
        rows = [row(i) for i in range(n) if i % nfiles == f]
        path = root / "data" / f"part-{f}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, SCHEMA), str(path), row_group_size=4)  # several row groups
        files.append(str(path))
    return files[::-1]  # publish sorts them


class FakeDedup(Phase2Step):
    """Drops the ids in ``dropped`` (as duplicates of ``keeper``) and gives ``merged`` captions."""

    name = "test.dedup"
    stage = "dedup"
    reasons = (DropReason("exact_duplicate", DROPPED, "same bytes as a kept sample"),)

    def __init__(self, dropped: list[str], merged: dict[str, tuple[list, list]], keeper: str | None = None):
        self.dropped, self.merged, self.keeper = dropped, merged, keeper

    def run(self, ctx) -> StepResult:
        import ray

        alive = ctx.alive(["captions"]).take_all()  # tiny test inputs: the driver may hold them
        where = {r["sample_id"]: r["_file"] for r in alive}
        d = [s for s in self.dropped if s in where]
        m = [s for s in self.merged if s in where]
        tables = [drops([where[s] for s in d], d, "exact_duplicate", "dup", [self.keeper] * len(d)),
                  merges([where[s] for s in m], m, [self.merged[s][0] for s in m], [self.merged[s][1] for s in m])]
        return StepResult({"dropped": len(d)}, ray.data.from_arrow(pa.concat_tables(tables)))


# Samples 0, 1, 2 get merged captions (kinds 0, 1, 2); 3, 4, 5 and 10 are dropped as their copies.
MERGED = {sid(0): (["c0-0", "c1-0", "dup-alt-0"], ["alt", "alt", "dedup:x"]),
          sid(1): (["dup-alt-1", "c1-1", "c0-1"], ["dedup:x", "alt", "alt"]),  # reordered: realigned by text
          sid(2): (["c0-2", "c1-2", "dup-alt-2"], ["alt", "alt", "dedup:x"])}
DUPS = [sid(i) for i in (3, 4, 5, 10)]


def phase2(root: Path, files: list[str], dropped=DUPS, merged=MERGED) -> None:
    from jobs.phase2 import run_steps

    run_steps([FakeDedup(dropped, merged, sid(0))], files, str(root))


def expected(files: list[str]) -> list[dict]:
    """Brute force: every kept row of the data files joined with its sidecar, files in path order,
    sample_id order within a file, with the captions the rules above give by hand."""
    out = []
    for f in sorted(files):
        data = pq.read_table(f).to_pylist()
        side = pq.read_table(str(Path(f).parent.parent / "final" / Path(f).name)).to_pylist()
        rows = []
        for d, s in zip(data, side):
            assert d["sample_id"] == s["sample_id"]
            if s["status"] != "kept":
                continue
            i = next(k for k in range(N) if sid(k) == d["sample_id"])
            caps = s["captions"] if s["captions"] is not None else d["captions"]
            caption = {0: f"c1-{i}", 1: f"c1-{i}", 2: f"c0-{i}"}[i % 3]
            sources = s["caption_sources"] if s["captions"] is not None else d["caption_sources"]
            rows.append({**d, "captions": caps, "caption": caption, "i": i, "caption_sources": sources})
        out += sorted(rows, key=lambda r: r["sample_id"])
    return out


def read_parts(snap: Path) -> list[pa.Table]:
    return [pq.read_table(str(p)) for p in sorted(snap.glob("part-*.parquet"))]


# --- without Ray --------------------------------------------------------------------------------
def test_shard_segments_by_hand():
    assert shard_segments([3, 0, 5, 2], 4) == [(0, [(0, 0, 3), (2, 0, 1)]), (4, [(2, 1, 5)]), (8, [(3, 0, 2)])]
    assert shard_segments([4, 4], 4) == [(0, [(0, 0, 4)]), (4, [(1, 0, 4)])]
    assert shard_segments([], 4) == [(0, [])] and shard_segments([0, 0], 3) == [(0, [])]


def test_image_extension():
    from PIL import Image

    def enc(fmt):
        b = io.BytesIO()
        Image.new("RGB", (4, 4)).save(b, fmt)
        return b.getvalue()
    assert [image_extension(enc(f)) for f in ("JPEG", "PNG", "WEBP")] == ["jpg", "png", "webp"]


def test_finish_rows_realigns_per_caption_columns_by_text():
    t = pa.table({"sample_id": ["a", "b"], "captions": [["x", "y"], ["p", "q"]],
                  "clip_scores": pa.array([[0.1, 0.2], [0.5, 0.6]], pa.list_(pa.float32())),
                  "clip_best_caption": pa.array([1, 0], pa.int16()),
                  "_merged_captions": pa.array([["z", "y", "x"], None], pa.list_(pa.string())),
                  "_merged_caption_sources": pa.array([["d", "alt", "alt"], None], pa.list_(pa.string()))})
    out = finish_rows(t, "caption").to_pylist()
    assert out[0]["captions"] == ["z", "y", "x"] and out[0]["clip_best_caption"] == 1 and out[0]["caption"] == "y"
    assert [None if v is None else round(v, 4) for v in out[0]["clip_scores"]] == [None, 0.2, 0.1]
    assert out[1]["captions"] == ["p", "q"] and out[1]["caption"] == "p" and out[1]["clip_best_caption"] == 0
    assert "_merged_captions" not in out[0]


def test_config_is_checked():
    with pytest.raises(ValueError):
        PublishConfig(shard_rows=0)
    with pytest.raises(ValueError):
        PublishConfig(bogus=1)
    with pytest.raises(ValueError):
        PublishConfig(images=False, columns=["image"])
    with pytest.raises(ValueError):
        PublishConfig(columns=["status"])
    assert PublishConfig().tar_rows == 10000 and PublishConfig(webdataset_shard_rows=7).tar_rows == 7


# --- through Ray --------------------------------------------------------------------------------
def test_snapshot_has_the_kept_set_in_fixed_shards(ray_session, tmp_path, monkeypatch):
    import operators.snapshot as snapshot

    files = write_files(tmp_path)
    phase2(tmp_path, files)
    want = expected(files)
    assert len(want) == 54 - 4  # 6 dropped in phase 1, 4 as duplicates
    seen = {}
    real = snapshot.write_json_atomic

    def check_last(path, obj, storage=None):  # every shard is complete when the manifest is written
        snap = Path(path).parent
        assert not (snap / "_SNAPSHOT.json").exists()
        for e in obj["files"]:
            assert (snap / e["path"]).stat().st_size == e["bytes"]
        seen["manifest"] = obj
        real(path, obj, storage)
    monkeypatch.setattr(snapshot, "write_json_atomic", check_last)

    m = publish(files, str(tmp_path), None, {"shard_rows": 7, "webdataset": True}, {"models": {"clip": "tiny"}})
    snap = tmp_path / "snapshots" / "v=0001"
    assert seen["manifest"] == m == json.loads((snap / "_SNAPSHOT.json").read_text())
    parts = read_parts(snap)
    assert [p.num_rows for p in parts] == [7] * 7 + [1]
    got = pa.concat_tables(parts).to_pylist()
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in want]
    assert not {sid(i) for i in (3, 4, 5, 10, 9, 19)} & {r["sample_id"] for r in got}
    for g, w in zip(got, want):
        assert g["captions"] == w["captions"] and g["caption_sources"] == w["caption_sources"]
        assert g["caption"] == w["caption"], w["i"]
        assert g["image"] == w["image"] and g["url"] == w["url"] and g["width"] == w["width"]
        assert g["clip_image_embedding"] == w["clip_image_embedding"]
    by_id = {r["sample_id"]: r for r in got}
    assert by_id[sid(0)]["captions"] == ["c0-0", "c1-0", "dup-alt-0"]  # merged by the dedup step
    assert by_id[sid(1)]["clip_best_caption"] == 1 and by_id[sid(1)]["caption"] == "c1-1"
    assert [None if v is None else round(v, 3) for v in by_id[sid(1)]["clip_scores"]] == [None, 0.3, 0.1]
    assert by_id[sid(0)]["reward_scores"][2] is None and by_id[sid(0)]["caption"] == "c1-0"
    assert by_id[sid(0)]["clip_best_caption"] == 0
    assert not {"status", "drop_stage", "drop_reason", "error_message", "download_open_request_s"} & set(got[0])

    assert m["version"] == 1 and m["parent"] is None and m["models"] == {"clip": "tiny"}
    assert m["counts"]["samples"] == N and m["counts"]["kept"] == len(want)
    assert m["counts"]["parquet_shards"] == 8 and m["counts"]["webdataset_shards"] == 8
    names = sorted(p.name for p in snap.iterdir())
    assert names == sorted(["_SNAPSHOT.json", *(f"part-{k:05d}.parquet" for k in range(8)),
                            *(f"shard-{k:05d}.tar" for k in range(8))])
    assert sum(e["rows"] for e in m["files"] if e["kind"] == "parquet") == len(want)


def test_webdataset_reads_back_as_the_parquet_snapshot(ray_session, tmp_path):
    import webdataset as wds

    files = write_files(tmp_path)
    phase2(tmp_path, files)
    m = publish(files, str(tmp_path), None, {"shard_rows": 8, "webdataset": True, "webdataset_shard_rows": 5})
    snap = tmp_path / "snapshots" / "v=0001"
    parquet = pa.concat_tables(read_parts(snap)).to_pylist()
    urls = [str(p) for p in sorted(snap.glob("shard-*.tar"))]
    assert len(urls) == math.ceil(len(parquet) / 5) == m["counts"]["webdataset_shards"]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [r["sample_id"] for r in parquet]
    for s, r in zip(samples, parquet):
        assert s["jpg"] == r["image"] and s["txt"] == r["caption"]
        meta = s["json"]
        assert meta["sample_id"] == r["sample_id"] and meta["captions"] == r["captions"]
        assert meta["url"] == r["url"] and (meta["width"], meta["height"]) == (r["width"], r["height"])
        assert meta["clip_score"] == pytest.approx(r["clip_score"]) if r["clip_score"] is not None else \
            meta["clip_score"] is None
        assert "image" not in meta and "clip_image_embedding" not in meta
    import tarfile

    with tarfile.open(urls[0]) as t:
        counts = [len([n for n in t.getnames() if n.endswith(ext)]) for ext in (".jpg", ".txt", ".json")]
    assert counts == [5, 5, 5]


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_second_publish_is_a_new_version_and_leaves_the_first_alone(ray_session, tmp_path):
    files = write_files(tmp_path)
    phase2(tmp_path, files)
    cfg = {"shard_rows": 9, "webdataset": True}
    publish(files, str(tmp_path), None, cfg)
    v1 = tmp_path / "snapshots" / "v=0001"
    before = _digests(v1)
    m2 = publish(files, str(tmp_path), None, cfg)
    assert m2["version"] == 2 and m2["parent"] == 1
    assert _digests(v1) == before
    v2 = _digests(tmp_path / "snapshots" / "v=0002")
    # the same inputs give the same shards, byte for byte
    assert {k: v for k, v in v2.items() if k != "_SNAPSHOT.json"} == \
        {k: v for k, v in before.items() if k != "_SNAPSHOT.json"}
    assert list_versions(str(tmp_path)) == {1: True, 2: True}


def test_uncommitted_version_dir_is_emptied_and_reused(ray_session, tmp_path):
    files = write_files(tmp_path)
    phase2(tmp_path, files)
    publish(files, str(tmp_path), None, {"shard_rows": 20})
    v1 = tmp_path / "snapshots" / "v=0001"
    before = _digests(v1)
    crashed = tmp_path / "snapshots" / "v=0002"
    crashed.mkdir()
    (crashed / "part-00099.parquet").write_bytes(b"half a shard")
    assert list_versions(str(tmp_path)) == {1: True, 2: False}
    from jobs.phase2 import Phase2Context

    m = publish(Phase2Context(files, str(tmp_path)), config={"shard_rows": 20})  # the job passes its context
    assert m["version"] == 2 and m["parent"] == 1 and m["reused_uncommitted"] is True
    assert m["counts"]["kept"] == 50 and m["path"] == str(crashed)
    assert sorted(p.name for p in crashed.iterdir()) == ["_SNAPSHOT.json", "part-00000.parquet",
                                                         "part-00001.parquet", "part-00002.parquet"]
    assert _digests(v1) == before


def test_empty_kept_set_is_an_empty_valid_snapshot(ray_session, tmp_path):
    import webdataset as wds

    files = write_files(tmp_path, n=9)  # samples 0..8, all kept in phase 1
    phase2(tmp_path, files, dropped=[sid(i) for i in range(9)], merged={})
    m = publish(files, str(tmp_path), None, {"shard_rows": 4, "webdataset": True})
    snap = tmp_path / "snapshots" / "v=0001"
    assert m["counts"]["kept"] == 0 and m["counts"]["samples"] == 9
    t = pq.read_table(str(snap / "part-00000.parquet"))
    assert t.num_rows == 0 and {"sample_id", "captions", "image", "caption"} <= set(t.column_names)
    tar = str(snap / "shard-00000.tar")
    assert list(wds.WebDataset([tar], shardshuffle=False, empty_check=False).decode()) == []
    import tarfile

    with tarfile.open(tar) as t:
        assert t.getnames() == []
    assert [e["rows"] for e in m["files"]] == [0, 0]


def test_without_phase2_the_data_status_is_final_and_columns_select(ray_session, tmp_path):
    files = write_files(tmp_path, n=20)
    m = publish(files, str(tmp_path), None, {"shard_rows": 100, "images": False, "columns": ["url", "reward"]})
    assert m["status_from"] == "data"
    t = pq.read_table(str(tmp_path / "snapshots" / "v=0001" / "part-00000.parquet"))
    assert t.column_names == ["sample_id", "url", "reward", "caption"]
    kept = sorted(sid(i) for i in range(20) if i % 10 != 9)
    assert sorted(t.column("sample_id").to_pylist()) == kept
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "part-0.parquet").write_bytes(b"x")  # sidecars of a phase 2 that never committed
    with pytest.raises(RuntimeError, match="phase 2 did not finish"):
        publish(files, str(tmp_path), None, {})
    with pytest.raises(ValueError, match="not in the data files"):
        (tmp_path / "final" / "part-0.parquet").unlink()
        publish(files, str(tmp_path), None, {"columns": ["nope"]})
    assert publish(files, str(tmp_path), None, {"enabled": False}) == {}
    assert list_versions(str(tmp_path)) == {1: True}
    with pytest.raises(RuntimeError, match="did not commit"):
        publish(files, str(tmp_path), None, {}, final=True)
    phase2(tmp_path, files)  # now sidecars with _FINAL.json: the job says phase 2 did not run this time
    m = publish(files, str(tmp_path), None, {"shard_rows": 100}, final=False)
    assert m["status_from"] == "data" and m["counts"]["kept"] == 18


def test_publish_through_loopback_s3(ray_session, s3_server, s3fs_client, tmp_path):
    import webdataset as wds

    from operators.storage import StorageConfig

    fs = s3fs_client
    fs.mkdir("imgcurate-snap")
    local = write_files(tmp_path)
    files = []
    for f in local:
        fs.put(f, f"imgcurate-snap/run/data/{Path(f).name}")
        files.append(f"s3://imgcurate-snap/run/data/{Path(f).name}")
    storage = StorageConfig(endpoint_url=s3_server)
    from jobs.phase2 import run_steps

    run_steps([FakeDedup(DUPS, MERGED, sid(0))], files, "s3://imgcurate-snap/run", storage)
    m = publish(files, "s3://imgcurate-snap/run", storage, {"shard_rows": 16, "webdataset": True})
    m2 = publish(files, "s3://imgcurate-snap/run", storage, {"shard_rows": 16, "images": False, "webdataset": True})
    assert (m["version"], m2["version"], m2["parent"]) == (1, 2, 1)
    assert json.loads(fs.cat("imgcurate-snap/run/snapshots/v=0001/_SNAPSHOT.json")) == m
    parts = sorted(fs.glob("imgcurate-snap/run/snapshots/v=0001/part-*.parquet"))
    tables = [pq.read_table(io.BytesIO(fs.cat(p))) for p in parts]
    assert [t.num_rows for t in tables] == [16, 16, 16, 2]
    got = pa.concat_tables(tables).to_pylist()
    # the expected rows: the same steps run locally give the reference sidecars
    phase2(tmp_path, local)
    want = expected(local)
    assert [(r["sample_id"], r["captions"], r["caption"]) for r in got] == \
        [(r["sample_id"], r["captions"], r["caption"]) for r in want]
    tars = sorted(fs.glob("imgcurate-snap/run/snapshots/v=0001/shard-*.tar"))
    for k, t in enumerate(tars):
        (tmp_path / f"s{k}.tar").write_bytes(fs.cat(t))
    samples = list(wds.WebDataset([str(tmp_path / f"s{k}.tar") for k in range(len(tars))], shardshuffle=False).decode())
    assert [(s["__key__"], s["txt"], s["jpg"]) for s in samples] == [(r["sample_id"], r["caption"], r["image"])
                                                                      for r in got]
    for e in m["files"]:
        assert fs.size(f"imgcurate-snap/run/snapshots/v=0001/{e['path']}") == e["bytes"]
    assert not (tmp_path / "imgcurate-snap").exists()
    # v=0002 without images in its Parquet shards: the tars still carry them
    v2 = pq.read_table(io.BytesIO(fs.cat("imgcurate-snap/run/snapshots/v=0002/part-00000.parquet")))
    assert "image" not in v2.column_names and v2.num_rows == 16
    assert fs.cat("imgcurate-snap/run/snapshots/v=0002/shard-00000.tar") == \
        fs.cat("imgcurate-snap/run/snapshots/v=0001/shard-00000.tar")
