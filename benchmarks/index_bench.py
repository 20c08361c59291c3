"""kNN index benchmark: our index builder (``operators.index.build_index``, default config) against a
plain faiss exact ``IndexFlatIP`` in the same run, and autofaiss's ``build_index`` where it installs
beside our faiss.

    python benchmarks/index_bench.py                       # 1M x 512, the default config
    python benchmarks/index_bench.py --n 100000 --max-memory-mb 300   # the chooser picks a smaller type

Data: ``--n`` clustered random vectors of ``--d`` dims (``--centres`` Gaussian centres on the unit
sphere with log-normal weights, isotropic noise of a per-centre norm around ``--spread``, L2-normalized,
float32, seeded), written file by file as ``--files`` Parquet files (``sample_id`` string,
``clip_image_embedding`` fixed-size list float32) in a temp dir. It prints:

1. ours: the chosen type and factory, build seconds (train / add / tune from ``_INDEX.json``), the
   recall@10 and median / p95 single-query latency the manifest records (its held-out queries are
   drawn from the data), index bytes, peak memory (driver ``ru_maxrss``; the Ray workers' RSS sampled
   in a thread during the build: the largest total and the largest single process);
2. a plain faiss ``IndexFlatIP`` over all vectors in the driver: build time (reading the files + add),
   single-query latency, and the exact top-10 of ``--queries`` fresh queries (new vectors of the same
   distribution, not in the data);
3. our index loaded with ``load_index``: recall@10 on those fresh queries (its returned sample_ids
   mapped back to row positions) and single-query latency of ``LoadedIndex.search``: the independent
   figures;
4. autofaiss (``--no-deps`` into ``/tmp/autofaiss_site`` when it is not importable): build time,
   recall@10 on the fresh queries, latency; or one line saying why not;
5. ratios: query latency Flat / ours, build time ours / Flat, memory.

Times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from operators.index import IndexConfig, build_index, load_index  # noqa: E402

COLUMN = "clip_image_embedding"
AUTOFAISS_SITE = "/tmp/autofaiss_site"
K = 10


# --- data ------------------------------------------------------------------------------------------
class Clusters:
    """The distribution: centres on the unit sphere, their weights and noise norms (seeded)."""

    def __init__(self, d: int, centres: int, spread: float, seed: int):
        rng = np.random.default_rng([seed, 1009, 0, 0])
        c = rng.normal(size=(centres, d)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        w = rng.lognormal(0.0, 1.0, centres)
        self.weights = w / w.sum()
        self.noise = (spread * rng.uniform(0.5, 1.5, centres)).astype(np.float32)
        self.d = d

    def draw(self, rng: np.random.Generator, m: int) -> np.ndarray:
        c = rng.choice(len(self.centres), m, p=self.weights)
        x = self.centres[c] + self.noise[c, None] * rng.normal(size=(m, self.d)).astype(np.float32) / np.sqrt(self.d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x, np.float32)


def sample_id(i: int) -> str:
    return f"img-{i:09d}"


def write_files(root: Path, dist: Clusters, n: int, n_files: int, seed: int) -> list[str]:
    """One file at a time (only one file's vectors are held); file f holds rows bounds[f]:bounds[f+1].

    The generators' seed sequences ([seed, 1009, ...]) differ from the builder's ([seed, salt, file]):
    with the same sequence the builder's query draw would reuse the uniforms that chose the rows'
    centres, and its held-out queries would all come from the first few centres."""
    root.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n, n_files + 1).astype(int)
    files = []
    for f in range(n_files):
        a, b = int(bounds[f]), int(bounds[f + 1])
        x = dist.draw(np.random.default_rng([seed, 1009, 1, f]), b - a)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dist.d)
        t = pa.table({"sample_id": pa.array([sample_id(i) for i in range(a, b)], pa.string()), COLUMN: col})
        path = str(root / f"part-{f:05d}.parquet")
        pq.write_table(t, path)
        files.append(path)
        del x, col, t
    return files


def read_vectors(path: str) -> np.ndarray:
    col = pq.read_table(path, columns=[COLUMN]).column(COLUMN).combine_chunks()
    d = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, d)


# --- memory ----------------------------------------------------------------------------------------
def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


class RaySampler(threading.Thread):
    """Samples the RSS of the Ray worker processes (and the driver's) every ``every`` s."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every = every
        self.stop = threading.Event()
        self.max_total = self.max_single = self.max_driver = 0.0
        self.max_workers = 0
        self.error = None

    @staticmethod
    def workers():
        import psutil

        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                if "default_worker.py" in cmd or cmd.startswith("ray::") or p.name().startswith("ray::"):
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return out

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            try:
                rss = []
                for p in self.workers():
                    try:
                        rss.append(p.memory_info().rss / 2 ** 20)
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        pass
                self.max_total = max(self.max_total, sum(rss))
                self.max_single = max(self.max_single, max(rss, default=0.0))
                self.max_workers = max(self.max_workers, len(rss))
                self.max_driver = max(self.max_driver, me.memory_info().rss / 2 ** 20)
            except Exception as exc:  # noqa: BLE001 - a sampler must not kill the benchmark
                self.error = repr(exc)
            self.stop.wait(self.every)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


class DriverSampler(RaySampler):
    def run(self):
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            self.max_driver = max(self.max_driver, me.memory_info().rss / 2 ** 20)
            self.stop.wait(self.every)


# --- search helpers --------------------------------------------------------------------------------
def latency_ms(fn, queries: np.ndarray) -> tuple[float, float]:
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q[None, :])
        lat.append((time.perf_counter() - t0) * 1000)
    lat = np.asarray(lat)
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 95))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


def autofaiss_module():
    """(module, None) or (None, why not): importable, or installed --no-deps beside our faiss."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # its progress bars
    try:
        import autofaiss

        return autofaiss, None
    except ImportError:
        pass
    if not Path(AUTOFAISS_SITE, "autofaiss").exists():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", AUTOFAISS_SITE,
                            "autofaiss", "embedding-reader", "fire"], capture_output=True, text=True)
        if r.returncode:
            return None, f"pip install --no-deps --target {AUTOFAISS_SITE} failed: " + \
                (r.stderr.strip().splitlines() or ["?"])[-1][:300]
    if AUTOFAISS_SITE not in sys.path:
        sys.path.append(AUTOFAISS_SITE)
    try:
        import autofaiss

        return autofaiss, None
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        return None, f"import autofaiss failed: {exc!r}"[:300]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--centres", type=int, default=5000)
    p.add_argument("--spread", type=float, default=0.7, help="noise norm around the unit centres (per-centre x0.5-1.5)")
    p.add_argument("--files", type=int, default=16)
    p.add_argument("--queries", type=int, default=1000, help="fresh held-out queries (not in the data)")
    p.add_argument("--latency-queries", type=int, default=200, help="of those, timed one at a time")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--max-memory-mb", type=float, default=None,
                   help=f"index.max_memory_mb (default: the config's, {IndexConfig().max_memory_mb:g})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-autofaiss", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (printed)")
    args = p.parse_args()

    import faiss
    import ray

    cfg = IndexConfig() if args.max_memory_mb is None else IndexConfig(max_memory_mb=args.max_memory_mb)
    faiss_version = faiss.__version__
    print(f"index bench: n={args.n:,} d={args.d} centres={args.centres} spread={args.spread} files={args.files} "
          f"queries={args.queries} cpus={args.cpus} faiss {faiss_version} omp threads {faiss.omp_get_max_threads()} "
          f"max_memory_mb={cfg.max_memory_mb:g} seed={args.seed}")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False

    tmp = Path(tempfile.mkdtemp(prefix="index-bench-"))
    try:
        dist = Clusters(args.d, args.centres, args.spread, args.seed)
        t0 = time.perf_counter()
        files = write_files(tmp / "data", dist, args.n, args.files, args.seed)
        data_bytes = sum(os.path.getsize(f) for f in files)
        print(f"data: {args.n:,} x {args.d} float32 in {len(files)} Parquet files ({data_bytes / 2 ** 20:,.0f} MB) "
              f"written in {time.perf_counter() - t0:.1f} s; driver ru_maxrss so far {maxrss_mb():,.0f} MB")

        # 1. ours
        out_dir = str(tmp / "index")
        rss_before = maxrss_mb()
        driver0 = rss_mb()
        with RaySampler() as mon:
            t0 = time.perf_counter()
            m = build_index(files, COLUMN, out_dir, cfg)
            ours_build = time.perf_counter() - t0
        ours_maxrss = maxrss_mb()
        tu, sec = m["tuning"], m["seconds"]
        print(f"ours: {m['type']} {m['factory']} ({m['choice']}), search {tu['params']}, "
              f"rerank x{m.get('rerank_factor') or '-'}")
        print(f"  build {ours_build:.1f} s (train {sec['train']:.1f} + add {sec['add']:.1f} + tune {sec['tune']:.1f}); "
              f"index {m['index_bytes'] / 2 ** 20:,.1f} MB ({m['vectors']:,} vectors)")
        print(f"  manifest: recall@{tu['k']} {tu['recall']:.4f} (target {tu['recall_target']}, "
              f"{tu['queries']} queries drawn from the data), single query p50 {tu['query_ms_p50']:.3f} ms "
              f"p95 {tu['query_ms_p95']:.3f} ms; ladder {[(s['value'], s['recall']) for s in tu['ladder']]}")
        print(f"  memory: driver ru_maxrss {ours_maxrss:,.0f} MB (before the build {rss_before:,.0f} MB; sampled "
              f"during it {mon.max_driver:,.0f} MB); Ray workers' RSS: largest total {mon.max_total:,.0f} MB, "
              f"largest process {mon.max_single:,.0f} MB ({mon.max_workers} workers at most)"
              + (f"; sampler error {mon.error}" if mon.error else ""))
        ours_peak = mon.max_driver - driver0 + mon.max_total  # the build's own: driver growth + the workers
        ray.shutdown()

        # 2. Flat, in the driver
        flat = faiss.IndexFlatIP(args.d)
        rss0 = rss_mb()
        with DriverSampler() as fmon:
            t0 = time.perf_counter()
            t_add = 0.0
            for f in files:
                x = read_vectors(f)
                ta = time.perf_counter()
                flat.add(x)
                t_add += time.perf_counter() - ta
                del x
            flat_build = time.perf_counter() - t0
        flat_bytes = flat.ntotal * args.d * 4
        flat_peak = fmon.max_driver - rss0
        qrng = np.random.default_rng([args.seed, 1009, 2, 0])
        fresh = dist.draw(qrng, args.queries)
        t0 = time.perf_counter()
        _, truth = flat.search(fresh, K)
        gt_s = time.perf_counter() - t0
        lq = fresh[:args.latency_queries]
        flat_p50, flat_p95 = latency_ms(lambda q: flat.search(q, K), lq)
        print(f"Flat (IndexFlatIP): build {flat_build:.1f} s (reading the files + add; add alone {t_add:.2f} s), "
              f"{flat_bytes / 2 ** 20:,.0f} MB, driver RSS +{flat_peak:,.0f} MB; exact top-{K} of "
              f"{args.queries} fresh queries in {gt_s:.1f} s; single query p50 {flat_p50:.3f} ms p95 {flat_p95:.3f} ms")

        # 3. ours, loaded, on the fresh queries
        pos = {sample_id(i): i for i in range(args.n)}
        rss1 = rss_mb()
        t0 = time.perf_counter()
        li = load_index(out_dir)
        load_s = time.perf_counter() - t0
        loaded_mb = rss_mb() - rss1
        t0 = time.perf_counter()
        hits = li.search(fresh, K)
        batch_s = time.perf_counter() - t0
        found = np.full((len(fresh), K), -1, np.int64)
        for r, row in enumerate(hits):
            for c, h in enumerate(row[:K]):
                found[r, c] = pos.get(h["id"], -1)
        ours_recall = recall(found, truth)
        ours_p50, ours_p95 = latency_ms(lambda q: li.search(q, K), lq)
        raw_p50, raw_p95 = latency_ms(lambda q: li.index.search(q, K), lq) if not m.get("rerank_factor") else \
            (float("nan"), float("nan"))
        print(f"ours on the fresh queries: recall@{K} {ours_recall:.4f} (manifest {tu['recall']:.4f}); "
              f"LoadedIndex.search single query p50 {ours_p50:.3f} ms p95 {ours_p95:.3f} ms "
              f"(faiss alone p50 {raw_p50:.3f} ms); {len(fresh)} queries in one call {batch_s:.2f} s; "
              f"load {load_s:.1f} s, +{loaded_mb:,.0f} MB")
        del li, hits

        # 4. autofaiss
        af = None
        if args.no_autofaiss:
            print("autofaiss: skipped (--no-autofaiss)")
        else:
            mod, why = autofaiss_module()
            if mod is None:
                print(f"autofaiss: not run: {why}")
            else:
                af = run_autofaiss(mod, flat, args, fresh, truth, lq)
        if faiss.__version__ != faiss_version:
            print(f"WARNING: faiss changed from {faiss_version} to {faiss.__version__}")

        # 5. ratios
        print(f"ratios: query latency Flat / ours {flat_p50 / ours_p50:.1f}x (p50, LoadedIndex.search; "
              f"vs the manifest's {flat_p50 / max(tu['query_ms_p50'], 1e-9):.1f}x); build ours / Flat "
              f"{ours_build / flat_build:.1f}x; index bytes ours / Flat {m['index_bytes'] / flat_bytes:.2f}; "
              f"build memory ours (driver growth + workers' total, sampled peaks) {ours_peak:,.0f} MB / Flat's "
              f"(driver growth) {flat_peak:,.0f} MB = {ours_peak / max(flat_peak, 1):.1f}x")
        if af:
            print(f"        ours / autofaiss: build {ours_build / af['build']:.2f}x, recall {ours_recall:.4f} vs "
                  f"{af['recall']:.4f}, p50 latency {ours_p50 / af['p50']:.2f}x, index bytes "
                  f"{m['index_bytes'] / max(af['bytes'], 1):.2f}")
        verdict = "met" if ours_recall >= 0.95 else "NOT met"
        print(f"target recall@{K} >= 0.95 on fresh queries: {verdict} ({ours_recall:.4f}); "
              f"latency {ours_p50:.3f} ms vs Flat {flat_p50:.3f} ms")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run_autofaiss(mod, flat, args, fresh, truth, lq) -> dict | None:
    import logging

    import faiss

    x = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * args.d).view(np.float32).reshape(flat.ntotal, args.d)
    threads = faiss.omp_get_max_threads()
    rss0 = rss_mb()
    try:
        with DriverSampler() as mon:
            t0 = time.perf_counter()
            index, infos = mod.build_index(embeddings=x, save_on_disk=False, max_index_query_time_ms=10,
                                           max_index_memory_usage="4G", min_nearest_neighbors_to_retrieve=K,
                                           nb_cores=args.cpus, verbose=logging.WARNING)
            build = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not raised
        print(f"autofaiss: build_index failed with our faiss {faiss.__version__}: {exc!r}"[:400])
        return None
    finally:
        faiss.omp_set_num_threads(threads)  # autofaiss sets faiss's threads globally
    if index is None:
        print(f"autofaiss: build_index returned no index (infos {infos})")
        return None
    _, found = index.search(fresh, K)
    r = recall(found, truth)
    p50, p95 = latency_ms(lambda q: index.search(q, K), lq)
    nbytes = int(faiss.serialize_index(index).nbytes)
    infos = infos or {}
    print(f"autofaiss {mod.__version__ if hasattr(mod, '__version__') else ''}: {infos.get('index_key', '?')} "
          f"({infos.get('index_param', '?')}): build {build:.1f} s, {nbytes / 2 ** 20:,.1f} MB, driver RSS "
          f"+{mon.max_driver - rss0:,.0f} MB; recall@{K} on the fresh queries {r:.4f}; single query p50 {p50:.3f} ms "
          f"p95 {p95:.3f} ms")
    del index
    return {"build": build, "recall": r, "p50": p50, "bytes": nbytes}


if __name__ == "__main__":
    main()
