"""dedup.perceptual near-pair search (multi-index hashing by Ray Data groupby) against a brute-force scan.

Random 64-bit hashes with planted pairs (the second of a pair 1..max_hamming bits from the first,
so it must be dropped with duplicate_of = the first), generated block by block on the workers; the
step's whole plan runs (explode into bands, groupby, resolve groups, best twin per sample), and
recall of the planted pairs is counted on the workers. The brute force is a vectorised all-pairs
popcount scan of ``--brute`` hashes, scaled by (n / brute)^2 to the full size.

    python benchmarks/dedup_perceptual_bench.py --n 10000000 --cpus 2

On the 2-core dev machine (2026-12-02, shared) 10M did not finish within 7.5 minutes; 3M took 96 s
(``--n 3000000 --partitions 8``: recall 1.0, 362x the scaled brute force). At 10M the (band,
value) groups (~20k hashes) exceed ``exact_group`` and are split once more.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.dedup.perceptual import PerceptualConfig, PerceptualDedupStep  # noqa: E402
from operators.phash import popcount64  # noqa: E402

BLOCK = 100_000


def block_rows(b: int, n: int, d: int, planted_every: int, seed: int) -> pa.Table:
    """Rows of block b: random hashes; every planted_every-th id i gets a twin at id i + 1."""
    lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
    rng = np.random.default_rng([seed, b])
    h = rng.integers(0, 2**64 - 1, size=hi - lo, dtype=np.uint64, endpoint=True)
    ids = np.arange(lo, hi)
    first = np.flatnonzero((ids % planted_every == 0) & (ids + 1 < hi))
    for i in first:
        x = h[i]
        for bit in rng.choice(64, int(rng.integers(1, d + 1)), replace=False):
            x ^= np.uint64(1) << np.uint64(int(bit))
        h[i + 1] = x
    return pa.table({"_file": pa.array(np.zeros(hi - lo, np.int32)),
                     "sample_id": pa.array([f"s{i:010d}" for i in ids], pa.string()),
                     "status": pa.array(["kept"] * (hi - lo), pa.string()),
                     "phash": pa.array(h.view(np.int64)),
                     "orig_width": pa.array(np.full(hi - lo, 100, np.int32)),
                     "orig_height": pa.array(np.full(hi - lo, 100, np.int32))})


def brute_force(n: int, d: int, seed: int) -> tuple[float, int]:
    """Seconds for an all-pairs scan of n random hashes (blocked), and pairs within d."""
    h = np.random.default_rng(seed).integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    t0 = time.perf_counter()
    found = 0
    step = 512
    for s in range(0, n, step):
        blk = h[s:s + step]
        near = popcount64(blk[:, None] ^ h[None, s:]) <= d
        found += int(np.triu(near, 1).sum())
    return time.perf_counter() - t0, found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--brute", type=int, default=20_000)
    ap.add_argument("--max-hamming", type=int, default=PerceptualConfig().max_hamming)
    ap.add_argument("--planted-every", type=int, default=100)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    n, d = args.n, args.max_hamming
    blocks = -(-n // BLOCK)
    parts = args.partitions or max(2 * args.cpus, blocks // 4)
    seed, every = args.seed, args.planted_every

    def gen(batch: pa.Table) -> pa.Table:
        return pa.concat_tables([block_rows(int(b), n, d, every, seed) for b in batch.column("b").to_pylist()])

    def alive(cols, then=None):  # Phase2Context.alive's contract: ``then`` runs inside the read
        return ray.data.from_items([{"b": b} for b in range(blocks)], override_num_blocks=blocks).map_batches(
            (lambda b: then(gen(b))) if then is not None else gen, batch_format="pyarrow", batch_size=1)

    ctx = SimpleNamespace(
        alive=alive,
        parallelism=parts, num_files=1)
    step = PerceptualDedupStep(PerceptualConfig(max_hamming=d), partitions=parts)

    def score(t: pa.Table) -> pa.Table:
        sid = np.array([int(s[1:]) for s in t.column("sample_id").to_pylist()])
        dup = np.array([int(s[1:]) for s in t.column("duplicate_of").to_pylist()])
        planted = (sid % every == 1) & (sid // BLOCK == (sid - 1) // BLOCK)
        return pa.table({"decisions": [len(sid)], "planted_found": [int((planted & (dup == sid - 1)).sum())],
                         "planted_other_twin": [int((planted & (dup != sid - 1)).sum())]})

    t0 = time.perf_counter()
    result = step.run(ctx)
    rows = result.decisions.map_batches(score, batch_format="pyarrow").sum(["decisions", "planted_found",
                                                                             "planted_other_twin"])
    took = time.perf_counter() - t0
    planted = sum(len([i for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)) if i % every == 0
                       and i + 1 < min(n, (b + 1) * BLOCK)]) for b in range(blocks))
    found = rows["sum(planted_found)"]
    bt, bpairs = brute_force(args.brute, d, seed + 1)
    brute_pairs = args.brute * (args.brute - 1) / 2
    scaled = bt * (n / args.brute) ** 2
    print(f"n={n:,} hashes, max_hamming={d}, bands={result.report['bands']} {result.report['band_bits']}, "
          f"partitions={parts}, ray cpus={args.cpus}")
    print(f"perceptual (MIH groupby): {took:.1f} s, {n / took:,.0f} hashes/s, "
          f"{n * (n - 1) / 2 / took:.3g} implied pairs/s")
    print(f"  decisions {rows['sum(decisions)']:,}; planted pairs {planted:,}, found with the right twin {found:,} "
          f"(recall {found / max(planted, 1):.4f}), dropped for another twin {rows['sum(planted_other_twin)']:,}")
    print(f"brute force: {args.brute:,} hashes all-pairs {bt:.2f} s ({brute_pairs / bt:.3g} pairs/s, "
          f"{bpairs} random pairs within {d}); scaled to n: {scaled:,.0f} s")
    print(f"ratio brute force / perceptual at n: {scaled / took:,.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
