"""Incremental refresh (jobs/refresh.py, operators/refresh.py) on a real local Ray and a loopback
image server: a second crawl that overlaps the first downloads only its new URLs (the server
counts the requests) and publishes the union; takedowns by URL, sha256 and pHash and a re-check
that finds a dead link remove samples from the new snapshot's Parquet, WebDataset shards and
search results while the parent stays as it was; the lock blocks a concurrent refresh and a stale
one is taken over; a refresh whose driver is killed resumes and publishes once."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.samples.data import generate_images, good_image_names, images_dir
from jobs.samples.server import SampleServer
from operators.lock import LockHeld, OutputLock
from operators.refresh import PhashIndex, parse_phash, read_list, recheck_draw
from pipeline_helpers import job_config

ROOT = Path(__file__).resolve().parents[1]
N = 36
SECTIONS = dict(safety={"enabled": False}, recaption={"enabled": False}, reward={"enabled": False},
                selection={"reward_top_fraction": None}, index={"queries": 50, "latency_queries": 5},
                plan={"num_buckets": 4, "shard_rows": 8}, dedup={"perceptual": {"enabled": False}})
NO_INDEX = {"index": {"enabled": False}}  # where a test does not search


# --- units without a network ------------------------------------------------------------------------
def test_phash_index_is_exact_within_the_distance():
    rng = np.random.default_rng(0)
    entries = rng.integers(-2 ** 63, 2 ** 63 - 1, 300, dtype=np.int64)
    queries = rng.integers(-2 ** 63, 2 ** 63 - 1, 500, dtype=np.int64)
    flips = [0, 1, 3, 4, 5, 9]
    near = []
    for k, f in enumerate(flips):  # an entry with f bits flipped
        v = int(entries[k]) & (2 ** 64 - 1)
        for b in rng.choice(64, f, replace=False):
            v ^= 1 << int(b)
        near.append(v - 2 ** 64 if v >= 2 ** 63 else v)
    q = np.concatenate([queries, np.array(near, np.int64)])
    got = PhashIndex(entries.tolist(), 4).match(q)
    u = entries.view(np.uint64)
    brute = np.array([min((bin(int(x ^ e)).count("1") for e in u)) <= 4 for x in q.view(np.uint64)])
    assert ((got >= 0) == brute).all()
    assert list(got[-len(flips):] >= 0) == [f <= 4 for f in flips]


def test_takedown_lists_and_hash_forms(tmp_path):
    (tmp_path / "a.txt").write_text("# comment\nhttp://Example.com/x.jpg\n\n  https://e.org/y.png  # trailing\n")
    with open(tmp_path / "b.csv", "w", newline="") as f:
        csv.writer(f).writerows([["note", "sha256"], ["x", "AB" * 32]])
    assert read_list([str(tmp_path / "a.txt")], "url") == ["http://Example.com/x.jpg", "https://e.org/y.png"]
    assert read_list([str(tmp_path / "*.csv")], "sha256") == ["AB" * 32]
    assert read_list([str(tmp_path / "missing-*.txt")], "url") == []  # an empty folder of lists this week
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_list([str(tmp_path / "missing.txt")], "url")
    assert parse_phash("ffffffffffffffff") == -1 and parse_phash("0x10") == 16 and parse_phash("-2") == -2
    assert parse_phash("0000000000000010") == 16  # 16 digits are imagehash's hex form
    with pytest.raises(ValueError, match="pHash"):
        parse_phash("zz")
    draw = recheck_draw([f"s{i}" for i in range(4000)], 0.25, "v=0002")
    assert 800 < draw.sum() < 1200 and (draw == recheck_draw([f"s{i}" for i in range(4000)], 0.25, "v=0002")).all()
    assert (draw != recheck_draw([f"s{i}" for i in range(4000)], 0.25, "v=0003")).any()  # a new slice each time


def test_the_scheduled_refresh_config_matches_the_dataset_it_refreshes():
    """cluster/ schedules configs/refresh.yaml over the dataset configs/laion-style.yaml makes: a
    refresh refuses other phase-1 stage settings, so the two must agree."""
    from jobs.config import CONFIG_DIR, load_config
    from jobs.refresh import load_refresh_config, stage_fingerprint

    refresh = load_refresh_config(CONFIG_DIR / "refresh.yaml")
    assert stage_fingerprint(refresh) == stage_fingerprint(load_config(CONFIG_DIR / "laion-style.yaml"))
    assert refresh.output.path == load_config(CONFIG_DIR / "laion-style.yaml").output.path
    assert refresh.refresh.takedown_urls and refresh.refresh.keep_versions


def test_retention_removes_the_oldest_committed_versions_only(tmp_path):
    from jobs.refresh import apply_retention

    snaps = tmp_path / "snapshots"
    for v in (1, 2, 3, 4, 5):
        d = snaps / f"v={v:04d}"
        d.mkdir(parents=True)
        (d / "part-00000.parquet").write_bytes(b"x")
        if v != 3:  # v=3: a publish that crashed before its commit, not a version
            (d / "_SNAPSHOT.json").write_text("{}")
    assert apply_retention(str(tmp_path), 0, None, 5) == []  # 0 keeps every one
    assert apply_retention(str(tmp_path), 2, None, 5) == [1, 2]
    assert sorted(p.name for p in snaps.iterdir()) == ["v=0003", "v=0004", "v=0005"]
    assert apply_retention(str(tmp_path), 1, None, 5) == [4]


# --- a dataset and its refreshes ---------------------------------------------------------------------
def _urls(server, names, path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for n in names:
            w.writerow([server.url(f"/img/{n}"), f"a photo numbered {n}"])
    return str(path)


def _snapshot(out, v):
    d = Path(out) / "snapshots" / f"v={v:04d}"
    return d, json.loads((d / "_SNAPSHOT.json").read_text())


def _rows(snap_dir):
    return pq.read_table([str(p) for p in sorted(snap_dir.glob("part-*.parquet"))]).to_pylist() if \
        list(snap_dir.glob("part-*.parquet")) else []


def _tar_ids(snap_dir):
    ids = []
    for t in sorted(snap_dir.glob("shard-*.tar")):
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    ids.append(json.loads(tar.extractfile(m).read())["sample_id"])
    return ids


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def _cfg(urls, out, **kw):
    sections = {k: dict(v) for k, v in SECTIONS.items()}
    for k, v in kw.items():
        sections.setdefault(k, {}).update(v)
    return job_config(urls, out, **sections)


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory):
    work = tmp_path_factory.mktemp("refresh")
    generate_images(images_dir(str(work)), n_good=N)
    names = good_image_names(N)
    with SampleServer(root_dir=images_dir(str(work))) as server:
        yield {"work": work, "names": names, "server": server, "out": str(work / "dataset")}


@pytest.fixture(scope="module")
def first_refresh(world):
    from jobs import curate
    from jobs.refresh import run_refresh

    server, names, out = world["server"], world["names"], world["out"]
    crawl1 = _urls(server, names[:20], world["work"] / "crawl1.csv")
    curate.run(_cfg(crawl1, out, **NO_INDEX))
    v1_dir, v1 = _snapshot(out, 1)
    v1_digest = _digest(v1_dir)
    crawl2 = _urls(server, names[10:30], world["work"] / "crawl2.csv")
    server.reset_hits()
    m = run_refresh(_cfg(crawl2, out, refresh={"recheck_fraction": 0.0}))
    hits = dict(server.hits)
    return {"manifest": m, "hits": hits, "v1": v1, "v1_dir": v1_dir, "v1_digest": v1_digest, "crawl2": crawl2}


def test_a_refresh_downloads_only_new_urls_and_publishes_the_union(world, first_refresh):
    m, hits, names = first_refresh["manifest"], first_refresh["hits"], world["names"]
    assert hits == {f"/img/{n}": 1 for n in names[20:30]}  # the 10 overlapping URLs are not requested
    assert m["crawl"] == {"input_rows": 20, "samples": 20, "known": 10, "new": 10}
    v2_dir, v2 = _snapshot(world["out"], 2)
    assert v2["parent"] == 1 and v2["refresh"]["parent"] == 1 and m["snapshot"]["version"] == 2
    rows2 = _rows(v2_dir)
    ids2 = [r["sample_id"] for r in rows2]
    ids1 = {r["sample_id"] for r in _rows(first_refresh["v1_dir"])}
    assert len(ids2) == len(set(ids2))  # every sample once
    assert ids1 <= set(ids2)  # the parent's samples are all still there
    urls2 = {r["url"] for r in rows2}
    assert {world["server"].url(f"/img/{n}") for n in names[20:30]} <= urls2  # the new ones joined
    assert m["added"] == len(ids2) - len(ids1) and m["removed"] == 0 and m["kept"] == len(ids2)
    assert sorted(_tar_ids(v2_dir)) == sorted(ids2)
    assert _digest(first_refresh["v1_dir"]) == first_refresh["v1_digest"]  # the parent is untouched
    assert v2["seen"]["kind"] == "ids" and v2["data_files"][:len(first_refresh["v1"]["data_files"])] == \
        first_refresh["v1"]["data_files"]


@pytest.fixture(scope="module")
def second_refresh(world, first_refresh):
    from jobs.refresh import run_refresh
    from operators.index import load_index

    out, server, names, work = world["out"], world["server"], world["names"], world["work"]
    v2_dir, _ = _snapshot(out, 2)
    rows = {r["url"]: r for r in _rows(v2_dir)}
    old = [server.url(f"/img/{n}") for n in names[:8]]
    by_url, by_sha, by_phash, dead = (rows[u] for u in old[:4])
    (work / "urls.txt").write_text(f"# takedown by URL\n{by_url['url'].replace('http://', 'HTTP://')}\n")
    (work / "sha.csv").write_text(f"sha256\n{by_sha['sha256'].upper()}\n")
    ph = (int(by_phash["phash"]) & (2 ** 64 - 1)) ^ 0b101  # two bits away
    (work / "phash.txt").write_text(f"{ph:016x}\n")
    os.remove(Path(images_dir(str(work))) / dead["url"].rsplit("/", 1)[1])  # a dead link now
    v2_digest = _digest(v2_dir)
    li2 = load_index(str(v2_dir / "_index" / "clip_image_embedding"))
    gone = [by_url, by_sha, by_phash, dead]
    before = [[h["id"] for h in hits] for hits in li2.search(np.array([r["clip_image_embedding"] for r in gone]), 3)]
    crawl3 = _urls(server, names[10:32], work / "crawl3.csv")
    server.reset_hits()
    m = run_refresh(_cfg(crawl3, out, refresh={
        "recheck_fraction": 1.0, "takedown_urls": [str(work / "urls.txt")], "takedown_sha256": [str(work / "sha.csv")],
        "takedown_phash": [str(work / "phash.txt")], "takedown_phash_distance": 4}))
    return {"manifest": m, "gone": gone, "before": before, "v2_dir": v2_dir, "v2_digest": v2_digest,
            "hits": dict(server.hits)}


def test_takedowns_and_rechecks_leave_the_new_snapshot_and_its_index(world, second_refresh):
    from operators.index import load_index

    m, gone = second_refresh["manifest"], second_refresh["gone"]
    gone_ids = {r["sample_id"] for r in gone}
    v3_dir, v3 = _snapshot(world["out"], 3)
    assert v3["parent"] == 2
    rows3 = _rows(v3_dir)
    ids3 = {r["sample_id"] for r in rows3}
    assert not gone_ids & ids3
    assert not gone_ids & set(_tar_ids(v3_dir)) and len(_tar_ids(v3_dir)) == len(rows3)
    assert m["taken_down"]["url"] == 1 and m["taken_down"]["sha256"] == 1 and m["taken_down"]["phash"] == 1
    assert m["rechecked"]["dropped"] == 1 and m["rechecked"]["outcomes"].get("failed/http_404") == 1
    assert m["crawl"]["new"] == 2 and m["added"] == 2
    assert m["removed"] == 4
    # the old samples were each re-requested once, the two new ones downloaded once
    v2_urls = {r["url"] for r in _rows(second_refresh["v2_dir"])}
    assert sum(second_refresh["hits"].values()) == len(v2_urls) - 3 + 2  # taken down first: not re-checked
    li3 = load_index(str(v3_dir / "_index" / "clip_image_embedding"))
    assert li3.manifest["vectors"] == len(rows3)
    after = li3.search(np.array([r["clip_image_embedding"] for r in gone]), 3)
    assert all(b[0] == r["sample_id"] for b, r in zip(second_refresh["before"], gone))  # found in the parent's
    assert not gone_ids & {h["id"] for hits in after for h in hits}  # and in no result of the new one
    assert _digest(second_refresh["v2_dir"]) == second_refresh["v2_digest"]  # the parent is unchanged
    reasons = {r["drop_reason"] for r in pq.read_table(
        [str(p) for p in (Path(m["refresh_dir"]) / "final").glob("*.parquet")]).to_pylist() if r["drop_reason"]}
    assert {"takedown_url", "takedown_sha256", "takedown_phash", "recheck_http_404"} <= reasons
    # the refresh's report (next to its manifest): the funnel ends with this version's phase-2 steps
    from jobs.report import build

    assert Path(m["report"]["path"]) == Path(m["refresh_dir"]) / "report.html" and Path(m["report"]["path"]).exists()
    rows = {f["stage"]: f for f in build(m["refresh_dir"], use_ray=False)["funnel"]}
    assert rows["refresh.takedown"]["dropped"] == {"dropped/refresh/takedown_url": 1,
                                                   "dropped/refresh/takedown_sha256": 1,
                                                   "dropped/refresh/takedown_phash": 1}
    assert rows["refresh.recheck"]["dropped"] == {"dropped/refresh/recheck_http_404": 1}
    assert rows["plan"]["entering"] == m["samples"] == sum(m["outcomes"].values())


def test_the_lock_blocks_a_second_refresh(world, second_refresh):
    """A refresh while another holds the dataset's lock refuses before any work (a stale lock is
    taken over: the killed refresh below leaves one, and tests/test_lock.py ages one)."""
    from jobs.refresh import run_refresh

    out = world["out"]
    cfg = _cfg(str(world["work"] / "crawl3.csv"), out, refresh={"recheck_fraction": 0.0})
    before = sorted(p.name for p in (Path(out) / "refreshes").iterdir())
    with OutputLock(out, purpose="refresh"):  # another refresh of the dataset is running
        with pytest.raises(LockHeld, match="held by a refresh"):
            run_refresh(cfg)
    assert sorted(p.name for p in (Path(out) / "refreshes").iterdir()) == before  # nothing started
    assert not (Path(out) / "_LOCK.json").exists()  # and the holder released it


def test_a_killed_refresh_resumes_and_publishes_once(world, second_refresh, tmp_path):
    """The driver of a refresh is killed (SIGKILL) while its wave downloads; the rerun finishes the
    same refresh dir and publishes one version with every new sample once."""
    out, names = world["out"], world["names"]
    work = world["work"]
    before = sorted(p.name for p in (Path(out) / "snapshots").iterdir())
    copies = 8  # the same images under 8 query strings: 288 new URLs, a wave of several seconds
    total = N * copies
    with SampleServer(root_dir=images_dir(str(work)), latency_ms=1500) as slow:
        crawl = tmp_path / "crawl-slow.csv"
        with open(crawl, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            for k in range(copies):
                w.writerows([slow.url(f"/img/{n}?copy={k}"), f"copy {k} of {n}"] for n in names)
        cfg = _cfg(str(crawl), out, refresh={"recheck_fraction": 0.0}, ray={"target_max_block_mb": 0.01}, **NO_INDEX)
        path = tmp_path / "refresh.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env["PYTHONPATH"] = str(ROOT)
        cmd = [sys.executable, "-m", "jobs.refresh", str(path)]
        log = open(tmp_path / "killed.log", "wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        version = int(before[-1].split("=")[1]) + 1
        rdir = Path(out) / "refreshes" / f"v={version:04d}"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if list((rdir / "data").rglob("*.parquet")):  # the wave has written some of its rows
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the refresh ended before it could be killed: " + \
            (tmp_path / "killed.log").read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        assert not (Path(out) / "snapshots" / f"v={version:04d}" / "_SNAPSHOT.json").exists()
        held = json.loads((Path(out) / "_LOCK.json").read_text())  # the killed driver's lock is left
        assert held["purpose"] == "refresh" and held["pid"] == proc.pid
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"pid {proc.pid}" in done.stderr and "taking over" in done.stderr  # stale: its process is gone
        assert not (Path(out) / "_LOCK.json").exists()
    after = sorted(p.name for p in (Path(out) / "snapshots").iterdir())
    assert after == before + [f"v={version:04d}"]  # one new version
    snap_dir, snap = _snapshot(out, version)
    rows = _rows(snap_dir)
    ids = [r["sample_id"] for r in rows]
    assert len(ids) == len(set(ids))
    m = json.loads((rdir / "_manifest.json").read_text())
    assert m["crawl"]["new"] == total and m["waves"] and sum(w["samples"] for w in m["waves"]) == total
    data = pq.read_table([str(p) for p in (rdir / "data").rglob("*.parquet")], columns=["sample_id"]).column(
        "sample_id").to_pylist()
    assert sorted(data) == sorted(set(data)) and len(data) == total  # every new sample once in phase 1's output
    assert snap["refresh"]["crawl"]["new"] == total
    shutil.rmtree(tmp_path, ignore_errors=True)
