"""dedup.perceptual: near pairs by multi-index hashing equal a brute-force all-pairs scan; planted
JPEG copies are found with the right twin; max_hamming at its edges; large bands; null hashes."""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.samples.data import _pixels
from operators.dedup.perceptual import NONE, PerceptualConfig, PerceptualDedupStep, band_masks, best_twins
from operators.images import ImageProcessor

SCHEMA = pa.schema([("sample_id", pa.string()), ("status", pa.string()), ("drop_stage", pa.string()),
                    ("drop_reason", pa.string()), ("error_message", pa.string()), ("phash", pa.int64()),
                    ("orig_width", pa.int32()), ("orig_height", pa.int32())])
MASK = (1 << 64) - 1


# --- the independent reference: every pair, Python ints, the documented keep rule ---------------
def popcount(x: int) -> int:
    return bin(x & MASK).count("1")


def reference_decisions(rows: list[dict], d: int) -> dict[str, str]:
    """sample_id -> duplicate_of: every kept row with a pHash, all pairs; a row is dropped when a
    twin within d bits ranks above it (larger area, then smaller sample_id), its best such twin."""
    live = [r for r in rows if r["status"] == "kept" and r["phash"] is not None]
    hashes = np.array([r["phash"] for r in live], np.int64).view(np.uint64)
    rank = {r["sample_id"]: (-(r["orig_width"] or 0) * (r["orig_height"] or 0), r["sample_id"]) for r in live}
    out: dict[str, str] = {}
    for i, r in enumerate(live):
        dist = np.bitwise_count(hashes ^ hashes[i])
        twins = [live[j]["sample_id"] for j in np.flatnonzero(dist <= d) if j != i]
        better = [t for t in twins if rank[t] < rank[r["sample_id"]]]
        if better:
            out[r["sample_id"]] = min(better, key=rank.__getitem__)
    return out


def _flip(h: int, bits) -> int:
    for b in bits:
        h ^= 1 << int(b)
    h &= MASK
    return h - (1 << 64) if h >> 63 else h


def _row(sid, phash, w=100, h=100, status="kept"):
    return {"sample_id": sid, "status": status, "drop_stage": None if status == "kept" else "download",
            "drop_reason": None if status == "kept" else "http_404", "error_message": None,
            "phash": phash, "orig_width": w, "orig_height": h}


def _files(root, rows, n_files=3) -> list[str]:
    (root / "data").mkdir()
    files = []
    for f in range(n_files):
        path = str(root / "data" / f"part-{f}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[f::n_files], SCHEMA), path)
        files.append(path)
    return files


def _run(tmp_path, rows, config=None, n_files=3):
    from jobs.phase2 import run_steps

    files = _files(tmp_path, rows, n_files)
    out = run_steps([PerceptualDedupStep(config)], files, str(tmp_path))
    side = pq.read_table(str(tmp_path / "final")).to_pylist()
    return out, {r["sample_id"]: r for r in side}


def _random_rows(n: int, d: int, seed: int) -> list[dict]:
    """n random hashes, a fifth of them replaced by planted twins 0..d+2 bits from another, an
    identical cluster, random areas with ties."""
    rng = np.random.default_rng(seed)
    hashes = [int(x) for x in rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)]
    for j in rng.choice(n, n // 5, replace=False):
        i = int(rng.integers(0, n))
        hashes[j] = _flip(hashes[i], rng.choice(64, int(rng.integers(0, d + 3)), replace=False))
    for j in range(10, 40):
        hashes[j] = hashes[5]
    areas = rng.integers(1, 4, size=n) * 100
    return [_row(f"s{k:05d}", hashes[k], int(areas[k]), 1) for k in range(n)]


# --- the distributed step equals brute force ----------------------------------------------------
def test_distributed_equals_brute_force(ray_session, tmp_path):
    d = 6
    rows = _random_rows(3000, d, seed=0)
    want = reference_decisions(rows, d)
    assert len(want) > 400  # planted pairs, the identical cluster and chains
    out, side = _run(tmp_path, rows, {"max_hamming": d})
    got = {k: r["duplicate_of"] for k, r in side.items() if r["status"] == "dropped"}
    assert got == want
    for k in got:
        assert side[k]["drop_stage"] == "dedup" and side[k]["drop_reason"] == "near_duplicate"
    rep = out["steps"]["dedup.perceptual"]
    assert rep["bands"] == d + 1 and sum(rep["band_bits"]) == 64 and rep["dropped"] == len(want)


@pytest.mark.parametrize("d,exact_group", [(6, 1024), (6, 16), (3, 16), (10, 16), (0, 16)])
def test_groups_split_by_pigeonhole_equal_brute_force(d, exact_group):
    """Small exact_group forces the re-splitting of groups (still exact); d = 0 is exact equality."""
    rows = _random_rows(2500, d, seed=d + exact_group)
    want = reference_decisions(rows, d)
    h = np.array([r["phash"] for r in rows], np.int64)
    order = sorted(range(len(rows)), key=lambda k: (-rows[k]["orig_width"] * rows[k]["orig_height"],
                                                   rows[k]["sample_id"]))
    rank = np.empty(len(rows), np.int64)
    rank[order] = np.arange(len(rows))
    best = best_twins(h, rank, d, PerceptualConfig(max_hamming=d, exact_group=exact_group, window=10**6))
    got = {rows[k]["sample_id"]: rows[order[best[k]]]["sample_id"] for k in np.flatnonzero(best != NONE)}
    assert got == want


def test_band_masks_cover_64_bits_once():
    for m in (1, 5, 7, 11, 64):
        masks = band_masks(MASK, m)
        assert len(masks) == m and sum(masks) == MASK
        widths = [bin(x).count("1") for x in masks]
        assert max(widths) - min(widths) <= 1


# --- max_hamming at its edges -------------------------------------------------------------------
@pytest.mark.parametrize("d", [0, 3, 6, 9])
def test_exactly_max_hamming_found_one_more_not(d):
    rng = np.random.default_rng(d)
    hashes, expect_dup, expect_kept = [], set(), set()
    for p in range(40):
        base = int(rng.integers(-2**63, 2**63 - 1, dtype=np.int64))
        flips = d if p % 2 == 0 else d + 1
        hashes += [(f"a{p:02d}", base), (f"b{p:02d}", _flip(base, rng.choice(64, flips, replace=False)))]
        (expect_dup if flips == d else expect_kept).add(f"b{p:02d}")
    sids = [s for s, _ in hashes]
    rank = np.arange(len(hashes))  # a before b
    best = best_twins(np.array([h for _, h in hashes], np.int64), rank, d, PerceptualConfig(max_hamming=d))
    found = {sids[k] for k in np.flatnonzero(best != NONE)}
    # random bases are ~32 bits apart: only the planted pairs are near
    assert found == expect_dup and not found & expect_kept


def test_edges_through_the_step(ray_session, tmp_path):
    d = PerceptualConfig().max_hamming
    rng = np.random.default_rng(3)
    rows = []
    for p in range(12):
        base = int(rng.integers(-2**63, 2**63 - 1, dtype=np.int64))
        flips = d if p < 6 else d + 1
        rows += [_row(f"a{p:02d}", base, 200, 200), _row(f"b{p:02d}", _flip(base, rng.choice(64, flips, False)))]
    _, side = _run(tmp_path, rows)
    dropped = {k: r["duplicate_of"] for k, r in side.items() if r["status"] == "dropped"}
    assert dropped == {f"b{p:02d}": f"a{p:02d}" for p in range(6)}


# --- large bands --------------------------------------------------------------------------------
def test_large_bands_do_not_blow_up():
    """20k identical hashes (all-black images) and 6k hashes sharing their top 40 bits: the groups
    are collapsed and split, not compared all-pairs; the result is the brute-force one."""
    rng = np.random.default_rng(9)
    black = np.full(20000, 0x00FF00FF00FF00FF, np.int64)
    prefix = np.int64(0x5A5A5A5A5A) << np.int64(24)
    shared = (prefix | rng.integers(0, 1 << 24, size=6000)).astype(np.int64)
    h = np.concatenate([black, shared])
    rank = rng.permutation(len(h))
    cfg = PerceptualConfig(max_hamming=6, exact_group=256)
    t0 = time.perf_counter()
    best = best_twins(h, rank, 6, cfg)
    took = time.perf_counter() - t0
    # brute force on the 6k distinct ones (the black ones: every copy's twin is the best-ranked copy)
    hs = shared.view(np.uint64)
    want = np.full(len(shared), NONE, np.int64)
    rs = rank[20000:]
    for i in range(len(shared)):
        near = np.bitwise_count(hs ^ hs[i]) <= 6
        better = rs[near & (rs < rs[i])]
        if len(better):
            want[i] = better.min()
    assert np.array_equal(best[20000:], want)
    top = rank[:20000].min()
    assert np.array_equal(best[:20000], np.where(rank[:20000] == top, NONE, top))
    print(f"large bands: {took:.2f} s for 26k hashes")
    assert took < 20


def test_window_fallback_is_bounded_and_finds_adjacent_twins():
    """Past the split depth a group is compared within a window only (approximate, counted)."""
    rng = np.random.default_rng(4)
    base = np.int64(0x1234567890) << np.int64(24) | (rng.integers(0, 1 << 20, size=1500) << 1)
    base = np.unique(base)
    twins = base | np.int64(1)  # 1 bit away, adjacent in full-hash order
    h = np.concatenate([base, twins])
    rank = np.arange(len(h))
    stats: dict = {}
    t0 = time.perf_counter()
    best = best_twins(h, rank, 10, PerceptualConfig(max_hamming=10, exact_group=16, window=2), stats=stats)
    assert time.perf_counter() - t0 < 60
    assert stats["windowed"] > 0
    assert (best[len(base):] <= np.arange(len(base))).all()  # every planted twin found (its base or better)


# --- planted JPEG copies ------------------------------------------------------------------------
def _jpeg(im: Image.Image, q: int) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=q)
    return buf.getvalue()


def _copies(im: Image.Image, rng) -> list[tuple[str, bytes]]:
    w, h = im.size
    c = 0.03
    dx, dy = int(w * c), int(h * c)
    return [("jpeg70", _jpeg(im, 70)),
            ("half", _jpeg(im.resize((w // 2, h // 2), Image.Resampling.LANCZOS), 90)),
            ("crop3", _jpeg(im.crop((dx // 2, dy // 2, w - dx + dx // 2, h - dy + dy // 2)), 90))]


def _hash_rows(datas: list[tuple[str, bytes]]) -> list[dict]:
    """Rows as phase 1 writes them: the image stage's phash and original sizes."""
    n = len(datas)
    batch = pa.table({"sample_id": [s for s, _ in datas], "status": ["kept"] * n, "drop_stage": [None] * n,
                      "drop_reason": pa.nulls(n, pa.string()), "error_message": pa.nulls(n, pa.string()),
                      "image_bytes": pa.array([b for _, b in datas], pa.binary())})
    out = ImageProcessor({"min_image_size": 0})(batch)
    return [{k: r[k] for k in SCHEMA.names} for r in out.to_pylist()]


def test_planted_jpeg_copies_found_with_the_right_twin(ray_session, tmp_path):
    rng = np.random.default_rng(21)
    datas, origin = [], {}
    for i in range(24):
        w = int(rng.integers(160, 401))
        h = int(np.clip(w * rng.uniform(0.5, 2), 160, 400))
        im = Image.fromarray(_pixels(rng, w, h), "RGB")
        datas.append((f"o{i:02d}", _jpeg(im, 95)))
        for kind, data in _copies(im, rng):
            datas.append((f"o{i:02d}-{kind}", data))
            origin[f"o{i:02d}-{kind}"] = f"o{i:02d}"
    rows = _hash_rows(datas)
    assert all(r["status"] == "kept" and r["phash"] is not None for r in rows)
    d = PerceptualConfig().max_hamming
    want = reference_decisions(rows, d)
    _, side = _run(tmp_path, rows)
    got = {k: r["duplicate_of"] for k, r in side.items() if r["status"] == "dropped"}
    assert got == want
    # the twins are the planted ones: originals are never dropped (largest or tied with a
    # re-encode, and "o.." sorts before "o..-jpeg70"), a found copy names its own original or, on a
    # chain (a crop near the re-encode only), another copy of it
    assert not any(k in got for k in origin.values())
    assert all(origin[k] == origin.get(v, v) for k, v in got.items()), got
    assert sum(v in origin for v in got.values()) <= 3
    by_kind = {kind: sum(f"o{i:02d}-{kind}" in got for i in range(24)) for kind in ("jpeg70", "half", "crop3")}
    print("planted copies found (of 24):", by_kind)
    assert by_kind["jpeg70"] >= 18 and by_kind["half"] >= 18 and by_kind["crop3"] >= 6


# --- null hashes --------------------------------------------------------------------------------
def test_null_phash_rows_untouched(ray_session, tmp_path):
    rows = [_row("k0", 12345, 300, 300), _row("k1", 12345), _row("n0", None), _row("n1", None),
            _row("x0", 12345, status="dropped")]
    _, side = _run(tmp_path, rows, n_files=2)
    assert side["k1"]["status"] == "dropped" and side["k1"]["duplicate_of"] == "k0"
    for k in ("k0", "n0", "n1"):
        assert side[k]["status"] == "kept" and side[k]["duplicate_of"] is None
    assert side["x0"]["drop_stage"] == "download"  # phase 1's drop stays


# --- the default threshold ----------------------------------------------------------------------
def test_max_hamming_default():
    """Distance distributions of copies (JPEG q 50-95, resized 0.5-2x, cropped up to 5%) against
    distinct images from the sample generator (printed with -s). The default keeps a margin of 2
    bits below the closest distinct pair and catches most re-encoded and resized copies."""
    from operators.images import decode
    from operators.phash import hamming, phash

    rng = np.random.default_rng(0)
    ims = []
    for _ in range(200):
        w = int(rng.integers(64, 401))
        h = int(np.clip(w * rng.uniform(1 / 3, 3), 64, 400))
        ims.append(Image.fromarray(_pixels(rng, w, h), "RGB"))
    ph = [phash(decode(_jpeg(im, 90))) for im in ims]
    dist: dict[str, list[int]] = {"jpeg": [], "resize": [], "crop": []}
    for k, im in enumerate(ims):
        r = np.random.default_rng(1000 + k)
        dist["jpeg"].append(int(hamming(ph[k], phash(decode(_jpeg(im, int(r.integers(50, 96))))))))
        s = r.uniform(0.5, 2)
        small = im.resize((max(8, round(im.width * s)), max(8, round(im.height * s))), Image.Resampling.LANCZOS)
        dist["resize"].append(int(hamming(ph[k], phash(decode(_jpeg(small, 85))))))
        f = r.uniform(0, 0.05)
        dx, dy = int(im.width * f), int(im.height * f)
        ox, oy = int(r.integers(0, dx + 1)), int(r.integers(0, dy + 1))
        crop = im.crop((ox, oy, im.width - dx + ox, im.height - dy + oy))
        dist["crop"].append(int(hamming(ph[k], phash(decode(_jpeg(crop, 85))))))
    b = np.array(ph)
    distinct = hamming(b[:, None], b[None, :])[np.triu_indices(len(b), 1)]
    d = PerceptualConfig().max_hamming
    print(f"\ndistinct pairs ({len(distinct)}): hist {np.bincount(distinct, minlength=20)[:20].tolist()}... "
          f"min {distinct.min()} p0.1 {np.percentile(distinct, 0.1)}")
    for kind, v in dist.items():
        v = np.array(v)
        print(f"{kind:7s}: hist {np.bincount(v).tolist()} within {d}: {np.mean(v <= d):.0%}")
    assert distinct.min() >= d + 2
    assert np.mean(np.array(dist["resize"]) <= d) >= 0.9
    assert np.mean(np.array(dist["jpeg"]) <= d) >= 0.75
    assert np.mean(np.array(dist["crop"]) <= d) >= 0.2


# --- the sample web's planted copies ------------------------------------------------------------
def test_sample_twins_are_found(ray_session, sample_dir, tmp_path):
    """Every planted copy of jobs/samples/data.py (exact, re-encoded, resized, cropped) is dropped as
    a near duplicate of its original by the step alone (dedup.exact off); no original is dropped."""
    from pathlib import Path

    from jobs.samples.data import sample_cases
    from tests.conftest import N_GOOD

    cases = [c for c in sample_cases(N_GOOD) if c.path.startswith("/img/") and c.expect == "kept" and
             c.dup_of is None]
    twins = {c.path: c.twin_of for c in cases if c.twin_of}
    assert len(twins) == 12 and {p.split("-")[1] for p in twins} == {"exact", "jpeg", "resized", "cropped"}
    root = Path(sample_dir) / "images"
    rows = _hash_rows([(c.path, (root / c.path.removeprefix("/img/")).read_bytes()) for c in cases])
    _, side = _run(tmp_path, rows)
    got = {k: r["duplicate_of"] for k, r in side.items() if r["status"] == "dropped"}
    assert got == twins
