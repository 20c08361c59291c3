"""Phase 0, "plan": URL lists -> sample shards, one Parquet file per hash-prefix bucket.

Scatter tasks (one per input file) route rows to buckets; merge tasks (one per bucket) merge
rows sharing a URL. The driver only sees per-file and per-bucket counts. ``_PLAN.json`` is
written last; a rerun with the same input config reuses a committed plan.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import ray

from jobs.config import ConfigError, JobConfig
from operators.commoncrawl import merge_stats
from operators.sources import bucket_dir, expand_paths, merge_bucket, scatter_file, unify_extra_schema
from operators.storage import fsspec_fs, join, read_json, write_json_atomic

log = logging.getLogger(__name__)
PLAN_VERSION = 1


def plan_dir(cfg: JobConfig) -> str:
    return join(cfg.output.path, "plan")


def plan_fingerprint(cfg: JobConfig) -> str:
    return cfg.fingerprint("input", "plan")


def load_plan(cfg: JobConfig) -> dict | None:
    return read_json(join(plan_dir(cfg), "_PLAN.json"), cfg.storage)


def run_plan(cfg: JobConfig) -> dict:
    """Build (or reuse) the sample shards. Returns the plan manifest."""
    existing = load_plan(cfg)
    fp = plan_fingerprint(cfg)
    if existing is not None:
        if existing.get("fingerprint") == fp:
            log.info("plan: reusing committed plan (%d samples in %d buckets)",
                     existing["samples"], len(existing["buckets"]))
            return existing
        raise ConfigError(
            f"{cfg.output.path} holds a plan made from another input config "
            f"(fingerprint {existing.get('fingerprint')} != {fp}); use a new output.path or output.overwrite=true")
    t0 = time.time()
    files = expand_paths(cfg.input, cfg.storage)
    pdir = plan_dir(cfg)
    scatter_dir = join(pdir, "_scatter")
    fs, sp = fsspec_fs(scatter_dir, cfg.storage)
    if fs.exists(sp):  # leftovers of an interrupted plan: start the shuffle over
        fs.rm(sp, recursive=True)
    nb = cfg.plan.num_buckets
    local = is_small_input(files, cfg)
    file_stats = _run_each(scatter_file, [(i, f, cfg.input, cfg.storage, scatter_dir, nb, cfg.plan.scatter_flush_rows)
                                          for i, f in enumerate(files)], local)
    extra = unify_extra_schema([pa.ipc.read_schema(pa.py_buffer(s["extra_schema"])) for s in file_stats])
    samples_dir = join(pdir, "samples")
    bucket_stats = _run_each(merge_bucket, [(b, scatter_dir, bucket_dir(samples_dir, b), extra, cfg.storage,
                                             cfg.plan.shard_rows) for b in range(nb)], local)
    fs.rm(sp, recursive=True)
    manifest = {
        "version": PLAN_VERSION,
        "fingerprint": fp,
        "input_files": [{"path": s["file"], "rows": s["rows"], **({"records": s["records"]} if "records" in s else {})}
                        for s in file_stats],
        "input_rows": sum(s["rows"] for s in file_stats),
        "samples": sum(b["samples"] for b in bucket_stats),
        "invalid_urls": sum(b["invalid"] for b in bucket_stats),
        "buckets": [{"bucket": b["bucket"], "samples": b["samples"],
                     "files": b["files"]} for b in bucket_stats],
        "extra_columns": [f.name for f in extra],
        "seconds": round(time.time() - t0, 3),
        "where": "driver" if local else "ray tasks",
    }
    wat = [s["records"] for s in file_stats if "records" in s]
    if wat:  # Common Crawl WAT input: records and links that gave no row, by reason (operators/commoncrawl.py)
        manifest["records"] = merge_stats(wat)
    write_json_atomic(join(pdir, "_PLAN.json"), manifest, cfg.storage)
    log.info("plan: %d input rows -> %d samples (%d without a usable URL) in %.1fs (%s)",
             manifest["input_rows"], manifest["samples"], manifest["invalid_urls"], manifest["seconds"],
             manifest["where"])
    return manifest


def _run_each(fn, calls: list[tuple], local: bool) -> list:
    """``fn(*args)`` for each args tuple: in this process for a small input (no task and worker
    start-up), else as Ray tasks of one CPU, retried."""
    if local:
        return [fn(*a) for a in calls]
    remote = ray.remote(num_cpus=1, max_retries=3)(fn)
    return ray.get([remote.remote(*a) for a in calls])


def is_small_input(files: list[str], cfg: JobConfig) -> bool:
    """Whether the input files total at most ``plan.local_max_bytes`` (an unknown size counts as large)."""
    limit = cfg.plan.local_max_bytes
    if limit <= 0:
        return False
    total = 0
    for f in files:
        fs, p = fsspec_fs(f, cfg.storage)
        try:
            size = fs.size(p)
        except (OSError, ValueError):
            return False
        if size is None:
            return False
        total += size
        if total > limit:
            return False
    return True


def waves_of(plan: dict, max_samples: int) -> list[list[dict]]:
    """Group consecutive buckets into waves of at most ``max_samples`` (a bucket is never split)."""
    waves: list[list[dict]] = []
    cur: list[dict] = []
    n = 0
    for b in plan["buckets"]:
        if b["samples"] == 0:
            continue
        if cur and n + b["samples"] > max_samples:
            waves.append(cur)
            cur, n = [], 0
        cur.append(b)
        n += b["samples"]
    if cur:
        waves.append(cur)
    return waves


def shard_rows_of(bucket: dict, shard_rows: int) -> list[int]:
    """Rows of each of a bucket's shard files: merge_bucket cuts its samples every ``shard_rows``."""
    n = bucket["samples"]
    return [min(shard_rows, n - k * shard_rows) for k in range(len(bucket["files"]))]


def pack_shards(buckets: list[dict], shard_rows: int, target_rows: int) -> list[list[str]]:
    """The wave's shard files in groups of about ``target_rows`` samples (a file is never split):
    one download call each. With many buckets over few URLs every shard holds a few rows, and a
    call per shard would leave most of an actor's request slots idle."""
    groups: list[list[str]] = []
    cur: list[str] = []
    n = 0
    for b in buckets:
        for path, rows in zip(b["files"], shard_rows_of(b, shard_rows)):
            if cur and n + rows > target_rows:
                groups.append(cur)
                cur, n = [], 0
            cur.append(path)
            n += rows
    if cur:
        groups.append(cur)
    return groups
