"""SemDeDup (operators/dedup/semantic.py) on synthetic clustered embeddings with planted near-duplicates.

Prints, for N x 512 embeddings (float16, as the CLIP stage writes them):
- the algorithm's core on numpy (``semdedup_arrays``: k-means, assignment, split, per-cluster
  blocked cosines; no Ray), its time per phase, and recall / precision of the planted pairs;
- exact all-pairs search (faiss ``IndexFlatIP`` range search at ``1 - eps``) on a subset of
  ``--exact`` rows, against SemDeDup on the same subset: how many of the exact above-threshold
  pairs SemDeDup covers (one of the two dropped), and the time ratio, extrapolated to N as n^2;
- the Ray path (``SemanticDedupStep`` through ``jobs.phase2.run_steps`` on Parquet files, local
  Ray with ``--ray-cpus``) at ``--ray-n`` rows, and whether it drops exactly what the numpy core
  drops on the same rows (same sample, same centroids).

Data: ``--centers`` random centres; a base item is ``normalize(c + 0.5 * g / sqrt(d))`` (mutual
cosine within a centre ~0.8, below 1 - eps); ``--dup-rate`` of the rows are planted twins
``normalize(x + tau * g / sqrt(d))`` of a base item with tau drawn so the pair's cosine is about
uniform in [0.95, 0.995] (above 1 - 0.07). A planted pair is recalled when one of its two is dropped;
precision is the share of drops that are members of a planted pair.

    python benchmarks/dedup_semantic_bench.py                 # 1M rows (the issue's size)
    python benchmarks/dedup_semantic_bench.py --n 200000 --ray-n 20000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from operators.dedup.semantic import SemanticConfig, semdedup_arrays  # noqa: E402


def make_data(n: int, d: int, centers: int, dup_rate: float, seed: int):
    """(float16 embeddings, ids, twin_of: index of the planted original or -1)."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup_rate)
    n_base = n - n_dup
    c = rng.standard_normal((centers, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, d), np.float16)
    step = 100_000
    lab = rng.integers(0, centers, n_base)
    for s in range(0, n_base, step):
        e = min(n_base, s + step)
        v = c[lab[s:e]] + 0.5 * rng.standard_normal((e - s, d)).astype(np.float32) / np.sqrt(d)
        out[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    orig = rng.choice(n_base, n_dup, replace=False)
    target = rng.uniform(0.95, 0.995, n_dup).astype(np.float32)
    tau = np.sqrt(1 / target ** 2 - 1)  # cos(x, x + tau g/sqrt(d)) ~ 1 / sqrt(1 + tau^2)
    for s in range(0, n_dup, step):
        e = min(n_dup, s + step)
        v = out[orig[s:e]].astype(np.float32) + tau[s:e, None] * rng.standard_normal((e - s, d)).astype(
            np.float32) / np.sqrt(d)
        out[n_base + s:n_base + e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    twin_of = np.full(n, -1, np.int64)
    twin_of[n_base:] = orig
    perm = rng.permutation(n)
    inv = np.empty(n, np.int64)
    inv[perm] = np.arange(n)
    out, twin_of = out[perm], twin_of[perm]
    twin_of = np.where(twin_of >= 0, inv[np.maximum(twin_of, 0)], -1)
    ids = np.array([f"s{i:08d}" for i in range(n)], object)
    return out, ids, twin_of


def planted_scores(dropped: np.ndarray, twin_of: np.ndarray) -> dict:
    dup = np.flatnonzero(twin_of >= 0)
    pair_hit = dropped[dup] | dropped[twin_of[dup]]
    member = np.zeros(len(dropped), bool)
    member[dup] = True
    member[twin_of[dup]] = True
    n_drop = int(dropped.sum())
    return {"pairs": len(dup), "recall": float(pair_hit.mean()) if len(dup) else float("nan"),
            "precision": float((dropped & member).sum() / n_drop) if n_drop else float("nan"), "dropped": n_drop}


def subset(twin_of: np.ndarray, size: int, seed: int) -> np.ndarray:
    """About ``size`` rows: whole planted pairs plus base rows, in the data's proportions."""
    rng = np.random.default_rng(seed + 1)
    n = len(twin_of)
    frac = min(1.0, size / n)
    dup = np.flatnonzero(twin_of >= 0)
    pick_dup = dup[rng.random(len(dup)) < frac]
    rest = np.setdiff1d(np.arange(n), np.concatenate([dup, twin_of[dup]]))
    pick_rest = rest[rng.random(len(rest)) < frac]
    rows = np.unique(np.concatenate([pick_dup, twin_of[pick_dup], pick_rest]))
    return rows[:size] if len(rows) > size else rows


def exact_pairs(x: np.ndarray, thr: float) -> tuple[np.ndarray, float]:
    """All pairs i < j with cosine > thr (faiss IndexFlatIP range search), and the seconds it took."""
    import faiss

    t = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, nbr = index.range_search(x, float(thr))
    rows = np.repeat(np.arange(len(x)), np.diff(lims.astype(np.int64)))
    keep = rows < nbr
    pairs = np.stack([rows[keep], nbr[keep]], 1)
    return pairs, time.perf_counter() - t


def normalized(e: np.ndarray) -> np.ndarray:
    x = e.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ray_path(emb, ids, cfg: SemanticConfig, cpus: int, files: int):
    """SemanticDedupStep through the phase-2 runner on Parquet files: (dropped mask, seconds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from jobs.phase2 import run_steps
    from operators.dedup.semantic import SemanticDedupStep

    tmp = tempfile.mkdtemp(prefix="semdedup_bench_")
    os.makedirs(os.path.join(tmp, "data"))
    n, d = emb.shape
    paths = []
    for f, rows in enumerate(np.array_split(np.arange(n), files)):
        k = len(rows)
        t = pa.table({"sample_id": pa.array(ids[rows].tolist(), pa.string()),
                      "status": pa.array(["kept"] * k, pa.string()),
                      "drop_stage": pa.nulls(k, pa.string()), "drop_reason": pa.nulls(k, pa.string()),
                      "error_message": pa.nulls(k, pa.string()),
                      "clip_image_embedding": pa.FixedSizeListArray.from_arrays(
                          pa.array(emb[rows].reshape(-1), pa.float16()), d)})
        p = os.path.join(tmp, "data", f"part-{f:03d}.parquet")
        pq.write_table(t, p)
        paths.append(p)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    out = run_steps([SemanticDedupStep(cfg)], paths, tmp)
    secs = time.perf_counter() - t0
    side = pq.read_table(os.path.join(tmp, "final"), columns=["sample_id", "status"]).to_pydict()
    ray.shutdown()
    gone = {s for s, st in zip(side["sample_id"], side["status"]) if st == "dropped"}
    return np.array([i in gone for i in ids]), secs, out["steps"]["dedup.semantic"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--centers", type=int, default=2000)
    ap.add_argument("--dup-rate", type=float, default=0.05)
    ap.add_argument("--eps", type=float, default=0.07)
    ap.add_argument("--n-clusters", type=int, default=None, help="default: the config's auto rule")
    ap.add_argument("--exact", type=int, default=50_000, help="rows of the exact all-pairs subset")
    ap.add_argument("--ray-n", type=int, default=50_000, help="rows for the Ray path (0: skip)")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = SemanticConfig(enabled=True, eps=a.eps, n_clusters=a.n_clusters)
    print(f"SemDeDup benchmark: {a.n:,} x {a.d} float16, {a.centers} centres, {a.dup_rate:.0%} planted twins, "
          f"eps {a.eps} (cosine > {1 - a.eps:.2f}), keep {cfg.keep}, faiss threads {_threads()}")
    t = time.perf_counter()
    emb, ids, twin_of = make_data(a.n, a.d, a.centers, a.dup_rate, a.seed)
    print(f"data: {time.perf_counter() - t:.1f} s")

    t = time.perf_counter()
    res = semdedup_arrays(emb, ids, cfg)
    total = time.perf_counter() - t
    sc = planted_scores(res.dropped, twin_of)
    sizes = np.unique(res.key[res.key >= 0], return_counts=True)[1]
    print(f"\n[numpy core, {a.n:,} rows] {total:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in res.seconds.items())}); "
          f"{res.n_clusters} clusters, {len(sizes)} tasks, largest {sizes.max():,}, split {len(res.split)}")
    print(f"  planted pairs {sc['pairs']:,}: recall {sc['recall']:.4f}, precision {sc['precision']:.4f}, "
          f"dropped {sc['dropped']:,}")

    rows = subset(twin_of, a.exact, a.seed)
    sub_twin = np.full(len(rows), -1, np.int64)
    pos = {int(r): k for k, r in enumerate(rows)}
    for k, r in enumerate(rows):
        if twin_of[r] >= 0 and int(twin_of[r]) in pos:
            sub_twin[k] = pos[int(twin_of[r])]
    xs = normalized(emb[rows])
    pairs, t_exact = exact_pairs(xs, 1 - a.eps)
    t = time.perf_counter()
    sub = semdedup_arrays(emb[rows], ids[rows], cfg)
    t_sem = time.perf_counter() - t
    covered = sub.dropped[pairs[:, 0]] | sub.dropped[pairs[:, 1]]
    ex_drop = np.zeros(len(rows), bool)  # exact SemDeDup over the subset as one cluster: drop the later of each pair
    ex_drop[pairs.max(1)] = True
    sc_sub, sc_ex = planted_scores(sub.dropped, sub_twin), planted_scores(ex_drop, sub_twin)
    extrap = t_exact * (a.n / len(rows)) ** 2
    print(f"\n[exact all-pairs, {len(rows):,}-row subset] IndexFlatIP range search {t_exact:.1f} s: "
          f"{len(pairs):,} pairs above {1 - a.eps:.2f}; planted recall {sc_ex['recall']:.4f}, "
          f"precision {sc_ex['precision']:.4f}")
    print(f"  SemDeDup on the subset: {t_sem:.1f} s ({sub.n_clusters} clusters), covers {covered.mean():.4f} of the "
          f"exact pairs; planted recall {sc_sub['recall']:.4f}, precision {sc_sub['precision']:.4f}")
    print(f"  time ratio exact / SemDeDup: {t_exact / t_sem:.2f}x at {len(rows):,}; at {a.n:,} exact extrapolates "
          f"(n^2) to {extrap:.0f} s vs SemDeDup {total:.1f} s measured: {extrap / total:.1f}x")

    if a.ray_n:
        rn = min(a.ray_n, a.n)
        rrows = subset(twin_of, rn, a.seed + 7)
        r_twin = np.full(len(rrows), -1, np.int64)
        rpos = {int(r): k for k, r in enumerate(rrows)}
        for k, r in enumerate(rrows):
            if twin_of[r] >= 0 and int(twin_of[r]) in rpos:
                r_twin[k] = rpos[int(twin_of[r])]
        t = time.perf_counter()
        core = semdedup_arrays(emb[rrows], ids[rrows], cfg)
        t_core = time.perf_counter() - t
        dropped, t_ray, rep = ray_path(emb[rrows], ids[rrows], cfg, a.ray_cpus, files=8)
        sr = planted_scores(dropped, r_twin)
        print(f"\n[Ray path, {len(rrows):,} rows, 8 files, {a.ray_cpus} CPUs] run_steps {t_ray:.1f} s vs numpy core "
              f"{t_core:.1f} s ({t_ray / t_core:.1f}x); {rep['n_clusters']} clusters; planted recall {sr['recall']:.4f}, "
              f"precision {sr['precision']:.4f}; same drops as the numpy core: {bool((dropped == core.dropped).all())}")


def _threads() -> int:
    import faiss

    return faiss.omp_get_max_threads()


if __name__ == "__main__":
    main()
