"""CoresetStep: SimCore's rounds checked against a plain greedy loop over the full similarity matrix
(written here from the reference code's description), the stopping rule and the budget worked by
hand, k-center greedy on planted far points, and the target loaders (Parquet, images + tiny CLIP)."""

from __future__ import annotations

import json
import math
from collections import deque

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.coreset import (CoresetConfig, CoresetStep, centroids_of, grown, merge_proposals, prefixes_of,
                               propose, replay_rounds)
from operators.coreset_target import load_target

DIM = 16


# --- an independent single-process SimCore ----------------------------------------------------------
def unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_simcore(x, centroids, keys, budget=None, stop_ratio=None, stop_round=20, seed=0):
    """The obvious loop over the full (N, K) matrix: every centroid pops its ranking (similarity
    descending, ties by key) until a sample not picked in an earlier round; threshold 0 until round
    ``stop_round`` sets it to ``stop_ratio`` x that round's mean; a round below it stops and is not
    added; the round that passes the budget keeps ``default_rng(seed).choice`` of its new picks."""
    s = unit(x) @ np.asarray(centroids, np.float64).T
    n, k = s.shape
    queues = [deque(sorted(range(n), key=lambda i: (-s[i, q], keys[i]))) for q in range(k)]
    picked, order, threshold, rnd = set(), [], 0.0, 0
    while budget is None or len(order) < budget:
        if len(picked) == n:
            break
        rnd += 1
        new, value = [], 0.0
        for q in range(k):
            while True:
                i = queues[q].popleft()
                if i not in picked:
                    break
            if i not in new:
                new.append(i)
            value += s[i, q]
        value /= k
        if stop_ratio is not None:
            if rnd == stop_round:
                threshold = value * stop_ratio
            if value < threshold:
                break
        if budget is not None and len(order) + len(new) > budget:
            chosen = np.sort(np.random.default_rng(seed).choice(len(new), budget - len(order), replace=False))
            new = [new[c] for c in chosen]
        picked.update(new)
        order.extend(new)
    return [keys[i] for i in order]


# --- data -------------------------------------------------------------------------------------------
def f16(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def clustered(n, n_centers=6, dim=DIM, spread=0.35, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, dim))
    return f16(centers[rng.integers(0, n_centers, n)] + spread * rng.normal(size=(n, dim)))


def emb_array(x) -> pa.Array:
    x16 = np.asarray(x).astype(np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(x16.reshape(-1), pa.float16()), x16.shape[1])


def phase1_files(root, x, n_files, prefix="o") -> tuple[list[str], list[tuple[int, str]]]:
    """Phase-1 data files holding the rows of ``x`` round-robin, plus one dropped row each; returns
    the files and each row's key (file index, sample_id)."""
    (root / "data").mkdir(exist_ok=True)
    files, keys = [], [None] * len(x)
    for f in range(n_files):
        rows = list(range(f, len(x), n_files))
        ids = [f"{prefix}{i:05d}" for i in rows] + [f"dropped{f}"]
        emb = np.concatenate([x[rows], np.zeros((1, x.shape[1]))]) if rows else np.zeros((1, x.shape[1]))
        n = len(ids)
        t = pa.table({"sample_id": ids, "status": ["kept"] * (n - 1) + ["dropped"],
                      "drop_stage": pa.array([None] * (n - 1) + ["download"], pa.string()),
                      "drop_reason": pa.array([None] * (n - 1) + ["http_404"], pa.string()),
                      "error_message": pa.array([None] * n, pa.string()),
                      "clip_image_embedding": emb_array(emb)})
        path = str(root / "data" / f"part-{f}.parquet")
        pq.write_table(t, path)
        files.append(path)
        for i in rows:
            keys[i] = (f, f"{prefix}{i:05d}")
    return files, keys


def target_parquet(path, t) -> str:
    pq.write_table(pa.table({"clip_image_embedding": emb_array(t)}), str(path))
    return str(path)


def kept_ids(out_dir) -> set[str]:
    side = pq.read_table(str(out_dir / "final"), columns=["sample_id", "status", "drop_reason"]).to_pylist()
    assert all(r["drop_reason"] in (None, "not_in_coreset", "http_404") for r in side)
    return {r["sample_id"] for r in side if r["status"] == "kept"}


def run_step(tmp_path, x, target, n_files=3, clip_config=None, **cfg):
    from jobs.phase2 import run_steps

    files, keys = phase1_files(tmp_path, x, n_files)
    step = CoresetStep(CoresetConfig(enabled=True, target=target, **cfg), clip_config=clip_config)
    out = run_steps([step], files, str(tmp_path))
    return out["steps"]["coreset"], kept_ids(tmp_path), keys


# --- SimCore through the framework ------------------------------------------------------------------
def test_simcore_picks_planted_near_target_points_first(ray_session, tmp_path):
    rng = np.random.default_rng(1)
    tgt = unit(rng.normal(size=(5, DIM)))
    far = clustered(300, seed=2)
    far -= 3 * (far @ tgt.T) @ tgt / 5  # push the crowd away from the targets
    planted = f16(np.repeat(tgt, 2, axis=0) + 0.05 * rng.normal(size=(10, DIM)))
    x = np.concatenate([far, planted])
    target = target_parquet(tmp_path / "target.parquet", tgt)
    report, kept, keys = run_step(tmp_path, x, target, k=5, budget=10, stop_ratio=None)
    assert kept == {keys[i][1] for i in range(300, 310)}
    assert (report["picked"], report["rounds"], report["stop_reason"], report["dropped"]) == (10, 2, "budget", 300)
    assert report["target_rows"] == 5 and report["centroids"] == 5 and report["scored"] == 310


def cos_vectors(sims, dim=DIM) -> np.ndarray:
    """Vectors whose cosine to e0 is each of ``sims`` (each along its own orthogonal direction)."""
    out = np.zeros((len(sims), dim))
    for j, s in enumerate(sims):
        out[j, 0], out[j, 1 + j % (dim - 1)] = s, math.sqrt(1 - s * s)
    return out


def test_stopping_rule_stops_at_the_round_below_the_threshold(ray_session, tmp_path):
    # One centroid (e0), so round r picks the r-th most similar sample. stop_round 3 sets the
    # threshold to 0.9 x 0.97 = 0.873; rounds 4-6 (0.95, 0.92, 0.89) pass, round 7 (0.86) stops.
    designed = [0.99, 0.98, 0.97, 0.95, 0.92, 0.89, 0.86, 0.85, 0.84]
    x = f16(np.concatenate([cos_vectors(designed), cos_vectors(np.linspace(0.1, 0.5, 30))]))
    target = target_parquet(tmp_path / "t.parquet", np.eye(DIM)[:1])
    report, kept, keys = run_step(tmp_path, x, target, k=1, stop_ratio=0.9, stop_round=3)
    assert kept == {keys[i][1] for i in range(6)}
    assert (report["rounds"], report["stop_reason"]) == (6, "similarity")
    assert report["threshold"] == pytest.approx(0.9 * 0.97, abs=2e-3)
    assert report["stopped_round_similarity"] == pytest.approx(0.86, abs=2e-3)


def test_negative_round_before_stop_round_stops(ray_session, tmp_path):
    x = f16(cos_vectors([0.5, -0.1, -0.2]))
    target = target_parquet(tmp_path / "t.parquet", np.eye(DIM)[:1])
    report, kept, keys = run_step(tmp_path, x, target, n_files=2, k=1, stop_ratio=0.95, stop_round=20)
    assert kept == {keys[0][1]} and report["stop_reason"] == "similarity"


def test_budget_keeps_a_seeded_subset_of_the_last_round(ray_session, tmp_path):
    x = clustered(200, seed=3)
    tgt = clustered(4, seed=4)
    target = target_parquet(tmp_path / "t.parquet", tgt)
    report, kept, keys = run_step(tmp_path, x, target, k=4, budget=6, stop_ratio=None, seed=7)
    want = reference_simcore(x, unit(f16(tgt)), keys, budget=6, seed=7)
    assert len(kept) == 6 and kept == {k[1] for k in want}
    first_round = reference_simcore(x, unit(f16(tgt)), keys, budget=4)  # 4 distinct nearest (here)
    assert {k[1] for k in first_round} <= kept


@pytest.mark.parametrize("n_files,candidates,budget", [(4, 3, None), (5, 64, None), (3, 2, 45)])
def test_distributed_equals_single_process(ray_session, tmp_path, n_files, candidates, budget):
    x = clustered(400, seed=5)
    tgt = clustered(40, seed=6)
    target = target_parquet(tmp_path / "t.parquet", tgt)
    centroids = centroids_of(unit(f16(tgt)), 6, seed=0)
    report, kept, keys = run_step(tmp_path, x, target, n_files=n_files, k=6, budget=budget, stop_ratio=0.95,
                                  stop_round=4, candidates=candidates)
    want = reference_simcore(x, centroids, keys, budget=budget, stop_ratio=0.95, stop_round=4)
    assert kept == {k[1] for k in want} and report["picked"] == len(want)
    if candidates <= 3:
        assert report["candidate_passes"] > 1  # the lists ran out and the shards were asked again


def simcore_in_memory(tables, centroids, r0, **kw):
    """The step's driver loop without Ray: propose per table, merge per centroid, replay, grow R."""
    k = len(centroids)
    r_of = np.full(k, r0, np.int64)
    while True:
        props = pa.concat_tables([propose(t, centroids, r_of) for t in tables])
        merged = pa.concat_tables([merge_proposals(props.filter(pa.compute.equal(props.column("q"), q)), r_of)
                                   for q in range(k)])
        pre = prefixes_of(merged, k)
        rounds = replay_rounds(pre, **kw)
        if not rounds.starving:
            return rounds
        r_of = grown(r_of, rounds, pre)


@pytest.mark.parametrize("seed", range(6))
def test_proposals_replay_equals_full_matrix(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(50, 400)), int(rng.integers(1, 9))
    x = clustered(n, seed=seed, spread=float(rng.uniform(0.1, 1.0)))
    x[rng.integers(0, n, 5)] = x[0]  # exact ties: broken by key
    centroids = unit(rng.normal(size=(k, DIM)))
    shards = int(rng.integers(1, 6))
    keys = [(i % shards, f"s{i:04d}") for i in range(n)]
    tables = []
    for f in range(shards):
        rows = [i for i in range(n) if i % shards == f]
        tables.append(pa.table({"_file": pa.array([f] * len(rows), pa.int32()),
                                "sample_id": [keys[i][1] for i in rows], "clip_image_embedding": emb_array(x[rows])}))
    budget = [None, int(rng.integers(1, n))][seed % 2]
    kw = dict(budget=budget, stop_ratio=0.97, stop_round=int(rng.integers(1, 6)), seed=seed)
    got = simcore_in_memory(tables, centroids, int(rng.integers(1, 8)), **kw)
    assert got.picks == reference_simcore(x, centroids, keys, **kw)  # same picks, same order


# --- k-center ---------------------------------------------------------------------------------------
def test_kcenter_picks_the_spread_points(ray_session, tmp_path):
    rng = np.random.default_rng(8)
    crowd = f16(np.eye(DIM)[0] + 0.05 * rng.normal(size=(200, DIM)))  # around the target
    spread = f16(np.eye(DIM)[[3, 6, 9, 12]] + 0.01 * rng.normal(size=(4, DIM)))
    x = np.concatenate([crowd, spread])
    target = target_parquet(tmp_path / "t.parquet", np.eye(DIM)[:1])
    report, kept, keys = run_step(tmp_path, x, target, k=1, budget=4, method="kcenter")
    assert kept == {keys[i][1] for i in range(200, 204)} and report["picked"] == 4


def reference_kcenter(x, centers, budget):
    xn = unit(x)
    near = (xn @ np.asarray(centers).T).max(axis=1)
    out = []
    for _ in range(budget):
        j = int(np.argmin(near))
        out.append(j)
        near = np.maximum(near, xn @ xn[j])
        near[j] = np.inf
    return out


def test_kcenter_equals_single_process(ray_session, tmp_path):
    from operators.coreset import kcenter_greedy

    x = clustered(300, seed=9, spread=1.0)
    keys = [(i % 3, f"k{i:04d}") for i in range(300)]
    tables = [pa.table({"_file": pa.array([f] * 100, pa.int32()), "sample_id": [keys[i][1] for i in range(f, 300, 3)],
                        "clip_image_embedding": emb_array(x[f::3])}) for f in range(3)]
    centers = unit(np.random.default_rng(1).normal(size=(3, DIM)))
    picks, _ = kcenter_greedy(tables, centers, 25, shards=2)
    assert picks == [keys[j] for j in reference_kcenter(x, centers, 25)]


# --- the target -------------------------------------------------------------------------------------
def test_target_from_parquet_skips_nulls(tmp_path):
    t = clustered(7, seed=10)
    arr = emb_array(t)
    col = pa.FixedSizeListArray.from_arrays(arr.values, DIM, mask=pa.array([False] * 6 + [True]))
    (tmp_path / "tgt").mkdir()
    pq.write_table(pa.table({"clip_image_embedding": col}), str(tmp_path / "tgt" / "a.parquet"))
    got = load_target(str(tmp_path / "tgt"))
    assert got.kind == "parquet" and got.skipped == 1
    np.testing.assert_allclose(got.vectors, unit(t[:6]), atol=1e-12)


def test_target_from_s3(s3fs_client, s3_server, tmp_path):
    from operators.storage import StorageConfig

    t = clustered(5, seed=11)
    s3fs_client.mkdir("coreset-target")
    local = target_parquet(tmp_path / "t.parquet", t)
    s3fs_client.put(local, "coreset-target/t/part.parquet")
    got = load_target("s3://coreset-target/t", storage=StorageConfig(endpoint_url=s3_server))
    np.testing.assert_allclose(got.vectors, unit(t), atol=1e-12)


def test_target_from_an_image_folder_with_the_clip_model(tmp_path):
    pytest.importorskip("open_clip")
    from operators.clip import ClipConfig, ClipEmbedder
    from tests.conftest import ROOT
    from tests.helpers import image_batch, jpeg

    tiny = "imgcurate-tiny-clip"
    cfg = ClipConfig(enabled=True, model=tiny, pretrained=None, device="cpu",
                     model_config_path=str(ROOT / "configs" / "models" / f"{tiny}.json"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = [jpeg(s) for s in range(4)]
    for j, b in enumerate(images):
        (folder / f"{j}.jpg").write_bytes(b)
    (folder / "broken.jpg").write_bytes(b"not an image")
    step = CoresetStep(CoresetConfig(enabled=True, target=str(folder), k=2), clip_config=cfg)
    got = step._target(None)
    # the CLIP stage's own embeddings of the same images (broken.jpg sorts after 0-3.jpg)
    stage = ClipEmbedder(cfg)(image_batch(images, [["x"]] * 4))
    want = np.asarray(stage.column("clip_image_embedding").to_pylist(), np.float64)
    assert got.kind == "images" and got.skipped == 1 and got.vectors.shape == (4, 32)
    np.testing.assert_allclose(got.vectors, unit(want), atol=3e-3)


def tiny_clip_config():
    from operators.clip import ClipConfig
    from tests.conftest import ROOT

    tiny = "imgcurate-tiny-clip"
    return ClipConfig(enabled=True, model=tiny, pretrained=None, device="cpu",
                      model_config_path=str(ROOT / "configs" / "models" / f"{tiny}.json"))


def test_target_from_a_url_list_downloads_on_loopback(tmp_path, image_server, sample_dir):
    """A .txt URL list: comments and blanks skipped, URLs normalized and deduplicated, failures
    (404, a corrupt image, a non-http URL) counted by reason, the rest embedded as the CLIP stage would."""
    pytest.importorskip("open_clip")
    from pathlib import Path

    from operators.clip import ClipEmbedder
    from operators.download import DownloadConfig
    from tests.helpers import image_batch

    cfg = tiny_clip_config()
    names = ["00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg"]
    good = [image_server.url(f"/img/{n}") for n in names]
    lines = ["# the target", "", *good, good[0].replace("http://", "HTTP://") + "#a-fragment",  # one image twice
             image_server.url("/status/404"), image_server.url("/img/corrupt-0.jpg"), "ftp://127.0.0.1/x.jpg"]
    (tmp_path / "target.txt").write_text("\n".join(lines) + "\n")
    download = DownloadConfig(allow_loopback=True, timeout_s=2.0, retries=0)
    step = CoresetStep(CoresetConfig(enabled=True, target=str(tmp_path / "target.txt"), k=2), clip_config=cfg,
                       download_config=download)
    got = step._target(None)
    images = [(Path(sample_dir) / "images" / n).read_bytes() for n in names]
    stage = ClipEmbedder(cfg)(image_batch(images, [["x"]] * 4))
    want = np.asarray(stage.column("clip_image_embedding").to_pylist(), np.float64)
    assert got.kind == "urls" and got.vectors.shape == (4, 32)
    np.testing.assert_allclose(got.vectors, unit(want), atol=3e-3)
    assert got.reasons == {"http_404": 1, "not_decodable": 1, "unsupported_scheme": 1}, got.reasons
    assert got.skipped == 3

    # a CSV list with its own URL column; the SSRF guard holds: loopback denied, nothing is left
    import csv
    with open(tmp_path / "target.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["link", "caption"])
        w.writerows([[u, "c"] for u in good])
    c = CoresetConfig(enabled=True, target=str(tmp_path / "target.csv"), target_url_column="link", k=2)
    assert CoresetStep(c, clip_config=cfg, download_config=download)._target(None).vectors.shape == (4, 32)
    with pytest.raises(ValueError, match=r"none of its 4 URLs.*ssrf_blocked"):
        CoresetStep(c, clip_config=cfg, download_config=DownloadConfig(retries=0))._target(None)


def test_kmeans_centroids_find_the_target_clusters():
    rng = np.random.default_rng(12)
    centers = unit(rng.normal(size=(3, DIM)))
    t = unit(np.repeat(centers, 50, axis=0) + 0.02 * rng.normal(size=(150, DIM)))
    got = centroids_of(t, 3, seed=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0)
    assert (got @ centers.T).max(axis=0).min() > 0.99  # one centroid on each cluster


def test_config_checks():
    assert CoresetConfig(target="s3://b/urls.txt.gz").target_url_column == "url"  # URL lists are targets
    with pytest.raises(ValueError, match="budget"):
        CoresetConfig(target="t.parquet", method="kcenter")
    with pytest.raises(ValueError, match="target"):
        CoresetConfig(enabled=True)
    with pytest.raises(ValueError):
        CoresetConfig(target="t.parquet", surprise=1)
    c = CoresetConfig()
    assert (c.enabled, c.k, c.budget, c.stop_ratio, c.stop_round, c.method, c.target_column) == \
        (False, 100, None, 0.95, 20, "simcore", "clip_image_embedding")
    assert json.dumps(CoresetConfig.model_json_schema())  # every field described
    assert all(f.description for f in CoresetConfig.model_fields.values())
