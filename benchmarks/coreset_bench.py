"""Coreset (SimCore) benchmark: the phase-2 step through Ray on a clustered synthetic open set.

    python benchmarks/coreset_bench.py --n 1000000 --dim 512 --target 10000 --single-n 100000

Open set: ``--n`` float16 vectors around ``--clusters`` random centres; the target: ``--target``
vectors from ``--target-clusters`` of those centres (a sub-domain of the open set). It prints:

1. the step on the whole open set (phase-1 Parquet files, ``jobs.phase2.run_steps``): seconds, picks,
   rounds, why it stopped, candidate passes, and the mean cosine of the picks to their nearest target
   centroid against as many random open-set samples;
2. at ``--single-n`` rows, the same step against a single-process numpy SimCore (the full
   (N, k) matrix, one argsort per centroid, the greedy loop): both times, their ratio, and whether
   the picks are equal.

Every figure is measured in the run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from operators.coreset import CoresetConfig, CoresetStep, centroids_of  # noqa: E402


def make_data(args):
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    chunks = []
    for s in range(0, args.n, 100_000):
        m = min(100_000, args.n - s)
        c = rng.integers(0, args.clusters, m)
        chunks.append((centres[c] + args.spread * rng.normal(size=(m, args.dim)).astype(np.float32)
                       / np.sqrt(args.dim)).astype(np.float16))
    x = np.concatenate(chunks)
    c = rng.integers(0, args.target_clusters, args.target)
    t = (centres[c] + args.spread * rng.normal(size=(args.target, args.dim)).astype(np.float32)
         / np.sqrt(args.dim)).astype(np.float16)
    return x, t


def emb(x16: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x16.reshape(-1), pa.float16()), x16.shape[1])


def write_files(root: Path, x16: np.ndarray, n_files: int) -> tuple[list[str], list[tuple[int, str]]]:
    """Phase-1 files holding contiguous slices of x (so a key's order follows the row index)."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    files, keys = [], []
    bounds = np.linspace(0, len(x16), n_files + 1).astype(int)
    for f in range(n_files):
        a, b = bounds[f], bounds[f + 1]
        ids = [f"o{i:08d}" for i in range(a, b)]
        n = b - a
        t = pa.table({"sample_id": ids, "status": ["kept"] * n, "drop_stage": pa.nulls(n, pa.string()),
                      "drop_reason": pa.nulls(n, pa.string()), "error_message": pa.nulls(n, pa.string()),
                      "clip_image_embedding": emb(x16[a:b])})
        path = str(root / "data" / f"part-{f:04d}.parquet")
        pq.write_table(t, path)
        files.append(path)
        keys.extend((f, i) for i in ids)
    return files, keys


def run_step(root: Path, x16, target_path, n_files, cfg) -> tuple[dict, set[str], float]:
    from jobs.phase2 import run_steps

    files, _ = write_files(root, x16, n_files)
    step = CoresetStep(CoresetConfig(enabled=True, target=target_path, **cfg))
    t0 = time.perf_counter()
    out = run_steps([step], files, str(root))
    dt = time.perf_counter() - t0
    side = pq.read_table(str(root / "final"), columns=["sample_id", "status"])
    kept = {s for s, st in zip(side.column("sample_id").to_pylist(), side.column("status").to_pylist())
            if st == "kept"}
    return out["steps"]["coreset"], kept, dt


def single_process(x16, centroids, budget, stop_ratio, stop_round, seed):
    """SimCore in one process over the full matrix (rows in key order: contiguous files)."""
    x = x16.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ centroids.T
    n, k = s.shape
    idx = np.arange(n)
    orders = [np.lexsort((idx, -s[:, q])) for q in range(k)]
    ptr = np.zeros(k, np.int64)
    picked = np.zeros(n, bool)
    out, threshold, rnd = [], 0.0, 0
    while budget is None or len(out) < budget:
        if len(out) == n:
            break
        rnd += 1
        new, seen, value = [], set(), 0.0
        for q in range(k):
            o, j = orders[q], ptr[q]
            while picked[o[j]]:
                j += 1
            i = int(o[j])
            ptr[q] = j + 1
            value += s[i, q]
            if i not in seen:
                seen.add(i)
                new.append(i)
        value /= k
        if stop_ratio is not None:
            if rnd == stop_round:
                threshold = value * stop_ratio
            if value < threshold:
                break
        if budget is not None and len(out) + len(new) > budget:
            ch = np.sort(np.random.default_rng(seed).choice(len(new), budget - len(out), replace=False))
            new = [new[c] for c in ch]
        picked[new] = True
        out.extend(new)
    return out


def mean_nearest(x16, rows, centroids) -> float:
    x = x16[np.asarray(sorted(rows))].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return float((x @ centroids.T).max(axis=1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--target", type=int, default=10_000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--target-clusters", type=int, default=20)
    p.add_argument("--spread", type=float, default=0.8, help="noise norm relative to the unit centres")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--stop-ratio", type=float, default=0.95)
    p.add_argument("--stop-round", type=int, default=20)
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--single-n", type=int, default=100_000)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    x16, t16 = make_data(args)
    print(f"data: open set {x16.shape} float16, target {t16.shape} ({time.perf_counter() - t0:.1f} s to make)")
    cfg = dict(k=args.k, budget=args.budget, stop_ratio=args.stop_ratio, stop_round=args.stop_round, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        target_path = str(tmp / "target.parquet")
        pq.write_table(pa.table({"clip_image_embedding": emb(t16)}), target_path)
        t = t16.astype(np.float64)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        tk = time.perf_counter()
        centroids = centroids_of(t, args.k, args.seed)
        print(f"k-means: {args.k} centroids of {args.target} target vectors in {time.perf_counter() - tk:.1f} s")

        report, kept, dt = run_step(tmp / "full", x16, target_path, args.files, cfg)
        rows = [int(s[1:]) for s in kept]
        rng = np.random.default_rng(1)
        rand = rng.choice(len(x16), size=max(1, len(rows)), replace=False)
        print(f"SimCore step, {len(x16):,} open-set rows in {args.files} files: {dt:.1f} s, "
              f"picked {report['picked']:,} in {report['rounds']} rounds (stop: {report['stop_reason']}), candidate passes "
              f"{report['candidate_passes']}, largest R {report['candidates_max']}")
        if rows:
            print(f"  mean cosine to the nearest target centroid: picks {mean_nearest(x16, rows, centroids):.4f} vs "
                  f"{len(rows):,} random {mean_nearest(x16, rand, centroids):.4f}")

        m = min(args.single_n, len(x16))
        xs = x16[:m]
        report_s, kept_s, dt_d = run_step(tmp / "small", xs, target_path, args.files, cfg)
        ts = time.perf_counter()
        single = single_process(xs, centroids, args.budget, args.stop_ratio, args.stop_round, args.seed)
        dt_s = time.perf_counter() - ts
        same = {f"o{i:08d}" for i in single} == kept_s
        print(f"at {m:,} rows: distributed step {dt_d:.1f} s (picked {report_s['picked']:,}, "
              f"{report_s['candidate_passes']} passes), single-process numpy {dt_s:.1f} s (picked {len(single):,}); "
              f"ratio distributed/single {dt_d / dt_s:.2f}; picks equal: {same}")
    ray.shutdown()


if __name__ == "__main__":
    main()
