"""The main job: plan (phase 0), then the streaming download pipeline (phase 1) in waves.

``python -m jobs.curate CONFIG [--set a.b=c ...]`` runs it, locally or under
``ray job submit``. Rerunning the same command resumes: a committed plan is reused,
completed waves are skipped and the interrupted wave resumes row by row through Ray
Data's checkpointing. The run manifest ``_manifest.json`` is written last.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import posixpath
import sys
import time
from importlib import metadata

import ray

from jobs.config import ConfigError, JobConfig, load_config
from jobs.phase2 import run_phase2
from jobs.plan import load_plan, pack_shards, plan_dir, run_plan, waves_of
from jobs.sizing import PipelinePlan, StageNeed, fit_pipeline
from jobs.stages import describe, model_stages, models_of, recaption_cache_root
from operators.download import HttpDownloader
from operators.images import ImageProcessor
from operators.recaption.vllm import apply_vllm_recaption
from operators.shards import SampleShards
from operators.sinks import PARQUET_OPTIONS, SinkConfig, count_written, sink_prep
from operators.lock import LOCK_NAME, OutputLock
from operators.refresh import seen_of_plan
from operators.snapshot import publish
from operators.storage import arrow_fs, fsspec_fs, join, read_json, write_json_atomic

log = logging.getLogger("imgcurate")


class JobError(RuntimeError):
    """The job ran but an invariant failed (e.g. a wave lost or duplicated samples)."""


# --- process-wide state: only here (STYLE.md habit 7) --------------------------------
def init_ray(cfg: JobConfig) -> None:
    if ray.is_initialized():
        return
    kwargs: dict = {"address": cfg.ray.address, "log_to_driver": True, "include_dashboard": False}
    if cfg.ray.address in (None, "local"):
        if cfg.ray.num_cpus:
            kwargs["num_cpus"] = cfg.ray.num_cpus
        if cfg.ray.node_ip_address:
            kwargs["_node_ip_address"] = cfg.ray.node_ip_address
        if cfg.ray.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
    try:
        ray.init(**kwargs)
    except ValueError:
        # Connecting to an existing cluster: resources are the cluster's, not ours to set.
        kwargs.pop("num_cpus", None)
        kwargs.pop("object_store_memory", None)
        kwargs.pop("include_dashboard", None)
        kwargs.pop("_node_ip_address", None)
        ray.init(**kwargs)
        return
    if cfg.ray.address in (None, "local"):
        start_data_services()


def start_data_services(timeout_s: float = 120.0) -> int:
    """Start Ray Data's cluster-wide service actors with the cluster (a lookup where they run already).

    Ray Data runs three detached actors per cluster (its stats actor, the actor location tracker
    and the autoscaling coordinator), created by the first dataset that needs them and kept by
    the cluster across jobs. A long-running cluster has them already; on a fresh local one they
    would each start a worker process (~1 s of CPU for Ray Data's imports) in the middle of the
    first wave, next to the download actors. Started here they are part of starting the cluster.
    Best effort: these are Ray Data's internal helpers, and Ray Data creates them itself anyway.
    Returns how many are running (0 if they could not be started here).
    """
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.execution.node_trackers import get_or_create_actor_location_tracker
        from ray.data._internal.stats import get_or_create_stats_actor

        handles = [f() for f in (get_or_create_stats_actor, get_or_create_actor_location_tracker,
                                 get_or_create_autoscaling_coordinator)]
        ray.get([h.__ray_ready__.remote() for h in handles], timeout=timeout_s)
        return len(handles)
    except Exception as exc:  # noqa: BLE001 - an optimisation only: Ray Data starts them when needed
        log.warning("could not start Ray Data's service actors ahead of the job (%s); Ray Data will "
                    "start them itself", exc)
        return 0


def _data_context(cfg: JobConfig):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.enable_operator_progress_bars = cfg.ray.progress_bars
    ctx.target_max_block_size = int(cfg.ray.target_max_block_mb * 1024 * 1024)
    return ctx


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("imgcurate", "ray", "pyarrow", "aiohttp", "img2dataset", "pillow", "opencv-python-headless",
                "s3fs"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# --- phase 1 ----------------------------------------------------------------------------
def stage_needs(cfg: JobConfig) -> tuple[StageNeed, list[StageNeed]]:
    """What the download pool and each model stage ask for, as config declares it (never probed)."""
    d = cfg.download
    download = StageNeed("download", download_actor_cpus(cfg), 0.0, d.pool_min, d.pool_max,
                         ("download.num_cpus", "images.num_cpus", "download.pool_min"))
    models = []
    for stage, stage_cfg, _ in model_stages(cfg):
        name = stage.section
        if name == "recaption" and stage_cfg.backend == "vllm":
            # The vLLM processor sizes its own engine actors; its cache lookup and store actors (two
            # pools of up to 2 x 0.25 CPU, apply_vllm_recaption) and one GPU per engine replica.
            models.append(StageNeed("recaption.cache", 0.25, 0.0, 2, 4, ("recaption.enabled",)))
            models.append(StageNeed("recaption.vllm", 0.0, 1.0, stage_cfg.vllm.concurrency,
                                    stage_cfg.vllm.concurrency, (), ("recaption.vllm.concurrency",)))
            continue
        r = stage.resources(cfg)  # with the stage's context (safety: whether it reuses the CLIP embeddings)
        models.append(StageNeed(name, r.num_cpus, r.num_gpus, r.pool[0], r.pool[1],
                                (f"{name}.num_cpus", f"{name}.pool_min"),
                                (f"{name}.num_gpus", f"{name}.pool_min", f"{name}.device")))
    return download, models


def size_wave(cfg: JobConfig, resuming: bool, cluster: dict | None = None) -> PipelinePlan:
    """Fit the wave's operators to the cluster the job runs on (jobs/sizing.py)."""
    if cluster is None:
        cluster = ray.cluster_resources()
    download, models = stage_needs(cfg)
    return fit_pipeline(download, models, float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0)),
                        resuming=resuming, read_fused=not resuming and cfg.download.batch_size is None,
                        write_cpus=cfg.output.write_num_cpus, write_concurrency=cfg.output.write_concurrency)


def build_pipeline(cfg: JobConfig, ds, plan: PipelinePlan):
    """Read -> download+images (actors) -> model stages (actors) -> sink prep: map-like ops
    only, so Ray Data's checkpointing applies. Pool sizes and task concurrency come from ``plan``."""
    from ray.data import ActorPoolStrategy

    # Download and image work share one actor pool: each finished chunk is decoded, resized and
    # re-encoded on the actor's calling threads (OpenCV releases the GIL) while its event loop
    # keeps downloading, so raw bytes never cross the object store and no separate image stage
    # pays per-task overhead. The actor holds the CPUs of both and resizes on at most as many
    # threads as images.num_cpus (rounded up).
    d = HttpDownloader.resources(cfg.download)
    # With download.batch_size null (the default) each call takes one block, a group of sample shards,
    # and the read fuses into this actor (wave_dataset gives it the same CPUs): no read tasks to
    # schedule and no input blocks through the object store.
    lo, hi = plan.pools["download"]
    ds = ds.map_batches(
        HttpDownloader,
        fn_constructor_kwargs={"config": cfg.download, "then": ImageProcessor(cfg.images),
                               "then_threads": max(1, math.ceil(ImageProcessor.resources(cfg.images).num_cpus))},
        batch_format="pyarrow", batch_size=d.batch_size, num_cpus=download_actor_cpus(cfg),
        compute=ActorPoolStrategy(
            min_size=lo, max_size=hi,
            max_tasks_in_flight_per_actor=cfg.download.batches_in_flight,
            max_concurrent_calls_per_actor=cfg.download.batches_in_flight, enable_true_multi_threading=True),
    )
    # Model stages: GPU actors (CPU when configured so), in the order each reads the last's columns.
    for stage, stage_cfg, kwargs in model_stages(cfg):
        name, op = stage.section, stage.operator
        if name == "recaption" and stage_cfg.backend == "vllm":
            ds = apply_vllm_recaption(ds, stage_cfg, cfg.storage, recaption_cache_root(cfg))
            continue
        r = stage.resources(cfg)
        lo, hi = plan.pools[name]
        ds = ds.map_batches(
            op, fn_constructor_kwargs={"config": stage_cfg, "storage": cfg.storage, **kwargs},
            batch_format="pyarrow", batch_size=r.batch_size, num_cpus=r.num_cpus, num_gpus=r.num_gpus or None,
            compute=ActorPoolStrategy(min_size=lo, max_size=hi))
    # The same CPUs and concurrency as the write that follows, or Ray Data would not fuse the two (run_wave).
    sink = SinkConfig(thumbnails_per_reason=cfg.report.dropped_thumbnails_per_block, seed=cfg.report.seed)
    return ds.map_batches(sink_prep, fn_kwargs={"config": sink}, batch_format="pyarrow", batch_size=None,
                          zero_copy_batch=True,
                          num_cpus=plan.write_cpus, concurrency=plan.write_concurrency)


def download_actor_cpus(cfg: JobConfig) -> float:
    """CPUs one download actor holds: its downloads and the image work it runs."""
    return HttpDownloader.resources(cfg.download).num_cpus + ImageProcessor.resources(cfg.images).num_cpus


def wave_dataset(cfg: JobConfig, groups: list[list[str]], plan: PipelinePlan):
    """The wave's pipeline over its groups of sample shards, up to the sink: one read task (and
    block) per group, bounded work per task, no sampling task before the first download as
    read_parquet runs (operators/shards.py). The read fuses into the download actor (same CPUs)
    unless the wave resumes: then Ray Data's checkpoint filter sits between them, and the read
    runs as small tasks of its own."""
    fs, _ = arrow_fs(cfg.output.path, cfg.storage)
    groups = [[arrow_fs(f, cfg.storage)[1] for f in g] for g in groups]
    tasks = ({"num_cpus": download_actor_cpus(cfg)} if plan.read_fused
             else {"num_cpus": plan.read_cpus, "concurrency": plan.read_concurrency})
    ds = ray.data.read_datasource(SampleShards(groups, fs), override_num_blocks=len(groups), **tasks)
    return build_pipeline(cfg, ds, plan)


def wave_groups(cfg: JobConfig, buckets: list[dict], plan: PipelinePlan) -> list[list[str]]:
    """The wave's shards packed into download calls of about ``plan.shard_rows`` samples, but small
    enough that every download actor gets ``batches_in_flight`` calls (a small wave still spreads)."""
    samples = sum(b["samples"] for b in buckets)
    calls = plan.pools["download"][1] * cfg.download.batches_in_flight
    target = max(1, min(cfg.plan.shard_rows, math.ceil(samples / calls)))
    return pack_shards(buckets, cfg.plan.shard_rows, target)


def wave_paths(cfg: JobConfig, i: int) -> dict[str, str]:
    out = cfg.output.path
    return {"data": join(out, "data", f"wave={i:05d}"), "checkpoint": join(out, "_checkpoints", f"wave={i:05d}"),
            "marker": join(out, "waves", f"wave={i:05d}.json")}


def occupancy(busy: dict | None, cfg: JobConfig) -> dict | None:
    """Mean open requests per download actor while it had work, against download.concurrency."""
    if not busy or not busy.get("active_s"):
        return None
    mean = busy["open_request_s"] / busy["active_s"]
    return {"mean_open_requests": round(mean, 2), "concurrency": cfg.download.concurrency,
            "occupancy": round(mean / cfg.download.concurrency, 4), "active_s": round(busy["active_s"], 3),
            "open_request_s": round(busy["open_request_s"], 3)}


def run_wave(cfg: JobConfig, i: int, buckets: list[dict]) -> dict:
    from ray.data.checkpoint import CheckpointConfig

    paths = wave_paths(cfg, i)
    expected = sum(b["samples"] for b in buckets)
    ctx = _data_context(cfg)
    fs, _ = arrow_fs(cfg.output.path, cfg.storage)
    data_fs_path = arrow_fs(paths["data"], cfg.storage)[1]
    cfs, cp = fsspec_fs(paths["checkpoint"], cfg.storage)
    # Ray Data inserts its checkpoint filter whenever the wave's checkpoint folder exists.
    resuming = cfg.ray.checkpoint and cfs.exists(cp)
    plan = size_wave(cfg, resuming)
    log.info("wave %d%s: %s", i, " (resuming)" if resuming else "", plan.describe())
    if i == 0:
        log.info("the chain:\n%s", describe(cfg, plan))
    groups = wave_groups(cfg, buckets, plan)
    t0 = time.time()
    if cfg.ray.checkpoint:
        ctx.checkpoint_config = CheckpointConfig(
            id_column="sample_id", checkpoint_path=arrow_fs(paths["checkpoint"], cfg.storage)[1],
            override_filesystem=fs, delete_checkpoint_on_success=False)
        # One filter actor, as sized above (Ray Data would scale it up to 10 actors of 1 CPU).
        ctx.checkpoint_config.checkpoint_actor_pool_max_size = 1
    ds = wave_dataset(cfg, groups, plan)
    try:
        ds.write_parquet(data_fs_path, filesystem=fs, concurrency=plan.write_concurrency,
                         ray_remote_args={"num_cpus": plan.write_cpus}, **PARQUET_OPTIONS)
    finally:
        ctx.checkpoint_config = None
    seconds = time.time() - t0
    written = count_written(paths["data"], cfg.storage)
    if written["rows"] != expected:
        raise JobError(f"wave {i}: {expected} samples planned but {written['rows']} rows written "
                       f"under {paths['data']}; not committing the wave")
    marker = {"wave": i, "buckets": [b["bucket"] for b in buckets], "samples": expected,
              "outcomes": written["outcomes"], "files": written["files"], "seconds": round(seconds, 3),
              "resources": plan.to_json(), "download_calls": len(groups), "stats": operator_stats(ds)}
    if "recaption" in written:
        marker["recaption"] = written["recaption"]
    busy = occupancy(written.get("download_busy"), cfg)
    if busy:
        marker["download"] = busy
    write_json_atomic(paths["marker"], marker, cfg.storage)
    if cfs.exists(cp):
        cfs.rm(cp, recursive=True)
    log.info("wave %d: %d samples in %.1fs (%.1f samples/s)", i, expected, seconds, expected / max(seconds, 1e-9))
    return marker


def operator_stats(ds) -> list[dict]:
    """Ray Data's figures per operator of a wave just written (its ``DatasetStatsSummary``): wall
    time, CPU time of its tasks, rows in and out, in execution order. Empty (with a warning) if
    this Ray cannot give them: they only inform the run report."""
    try:
        summary = ds.get_stats_summary()
    except Exception as exc:  # noqa: BLE001 - a developer API of Ray Data; the wave itself is done
        log.warning("no Ray Data stats for the report: %s", exc)
        return []
    out: list[dict] = []

    def visit(s) -> None:
        for parent in s.parents:
            visit(parent)
        for op in s.operators_stats:
            out.append({"operator": op.operator_name, "wall_s": round(op.time_total_s or 0.0, 3),
                        "cpu_s": round(op.cpu_time.sum if op.cpu_time else 0.0, 3),
                        "tasks": int(op.wall_time.count) if op.wall_time else 0,
                        "rows_in": int(op.total_input_num_rows or 0),
                        "rows_out": int(op.output_num_rows.sum) if op.output_num_rows else 0})

    visit(summary)
    return out


# --- the job ------------------------------------------------------------------------------
def check_run_identity(cfg: JobConfig) -> None:
    """An output folder belongs to one config: resume only with the same settings."""
    fp = cfg.fingerprint()  # every section but the run sections: a new stage's too
    run_path = join(cfg.output.path, "_RUN.json")
    existing = read_json(run_path, cfg.storage)
    if existing is not None and existing.get("fingerprint") != fp:
        if not cfg.output.overwrite:
            raise ConfigError(
                f"{cfg.output.path} holds the output of another config (fingerprint {existing.get('fingerprint')} "
                f"!= {fp}); use a new output.path, or output.overwrite=true to replace it")
        fs, p = fsspec_fs(cfg.output.path, cfg.storage)
        log.warning("output.overwrite: deleting %s (all but this run's lock)", cfg.output.path)
        for entry in fs.ls(p, detail=False):
            if posixpath.basename(entry.rstrip("/")) != LOCK_NAME:
                fs.rm(entry, recursive=True)
        existing = None
    if existing is None:
        write_json_atomic(run_path, {"fingerprint": fp, "name": cfg.name, "started": time.time()}, cfg.storage)


def run(cfg: JobConfig, phase2_only: bool = False) -> dict:
    """Run (or resume) the whole job; returns the run manifest. With ``phase2_only`` (``imgcurate
    phase2``), phase 1 must be finished in ``output.path`` under the same phase-1 config: nothing is
    downloaded, and phase 2 reruns with the config's phase-2 settings. The whole run holds the
    output's lock (operators/lock.py): a second run of the same output refuses with ``LockHeld``."""
    with OutputLock(cfg.output.path, cfg.storage, purpose="phase2" if phase2_only else "run",
                    stale_after_s=cfg.output.lock_stale_after_s, heartbeat_s=cfg.output.lock_heartbeat_s):
        return _run(cfg, phase2_only)


def _run(cfg: JobConfig, phase2_only: bool) -> dict:
    t0 = time.time()
    init_ray(cfg)
    if phase2_only:
        plan = _finished_plan(cfg)
    else:
        check_run_identity(cfg)
        plan = run_plan(cfg)
    t_plan = time.time() - t0
    waves = waves_of(plan, cfg.plan.wave_max_samples)
    markers = []
    resumed = 0
    for i, buckets in enumerate(waves):
        marker = read_json(wave_paths(cfg, i)["marker"], cfg.storage)
        if marker is not None:
            resumed += 1
        elif phase2_only:
            raise ConfigError(f"{cfg.output.path}: wave {i} of phase 1 is not finished; run `imgcurate run` first")
        else:
            marker = run_wave(cfg, i, buckets)
        markers.append(marker)
    t_sel = time.time()
    files = [f for m in markers for f in m["files"]]
    phase2 = run_phase2(cfg, files)
    t_pub = time.time()
    snapshot = publish(files, cfg.output.path, cfg.storage, cfg.publish, final=bool(phase2),
                       manifest_extra={"name": cfg.name, "models": models_of(cfg),
                                       "config": cfg.model_dump(mode="json"), "phase2": phase2.get("steps", {}),
                                       "phase1_fingerprint": cfg.fingerprint(), "data_files": files,
                                       "seen": seen_of_plan(plan_dir(cfg), plan)})
    t_idx = time.time()
    indices = {}
    if snapshot and cfg.index.enabled:  # kNN indices into the new snapshot (operators/index.py)
        from operators.index import build_snapshot_indices

        indices = build_snapshot_indices(snapshot, cfg.index, cfg.storage)
    timings = {"plan_s": round(t_plan, 3), "total_s": round(time.time() - t0, 3),
               "phase1_s": round(sum(m["seconds"] for m in markers), 3), "phase2_s": round(t_pub - t_sel, 3),
               "publish_s": round(t_idx - t_pub, 3), "index_s": round(time.time() - t_idx, 3)}
    manifest = manifest_of(cfg, plan, markers, resumed, phase2, timings)
    if snapshot:
        manifest["snapshot"] = {"version": snapshot["version"], "path": snapshot.get("path"),
                                "kept": snapshot["counts"]["kept"], "parent": snapshot.get("parent"),
                                "indices": indices}
    # Data files first, manifest last: a reader trusts only a committed manifest.
    write_json_atomic(join(cfg.output.path, "_manifest.json"), manifest, cfg.storage)
    if cfg.report.enabled:
        write_run_report(cfg, manifest)
    return manifest


def write_run_report(cfg: JobConfig, manifest: dict) -> None:
    """The HTML report next to the manifest (jobs/report.py). A report that cannot be written is
    logged, not raised: the run it describes is committed already."""
    from jobs.report import write_report

    try:
        path, size = write_report(cfg.output.path, cfg.storage, cfg.report)
    except Exception as exc:  # noqa: BLE001 - the run is done; `imgcurate report` can write it again
        log.warning("the run report could not be written (%s: %s); `imgcurate report %s` writes it again",
                    type(exc).__name__, exc, cfg.output.path)
        return
    manifest["report"] = {"path": path, "bytes": size}
    log.info("run report: %s (%.2f MB)", path, size / 1e6)


def _finished_plan(cfg: JobConfig) -> dict:
    """The committed plan of a phase-1 output made by this phase-1 config (for a phase-2 rerun)."""
    existing = read_json(join(cfg.output.path, "_RUN.json"), cfg.storage)
    if existing is None:
        raise ConfigError(f"{cfg.output.path} holds no run; `imgcurate run` makes one first")
    if existing.get("fingerprint") != cfg.fingerprint():
        raise ConfigError(f"{cfg.output.path} holds the output of another phase-1 config (fingerprint "
                          f"{existing.get('fingerprint')} != {cfg.fingerprint()}); phase 2 reruns only over the "
                          f"config that made it (its phase-2 sections may differ)")
    plan = load_plan(cfg)
    if plan is None:
        raise ConfigError(f"{cfg.output.path} has no committed plan; run `imgcurate run` first")
    return plan


def manifest_of(cfg: JobConfig, plan: dict, markers: list[dict], resumed: int, phase2: dict,
                timings: dict) -> dict:
    """The run manifest from the plan, the wave markers and the phase-2 report (``run_selection``'s).
    ``outcomes``/``kept`` count phase 1; ``final`` counts each sample's final status (phase 1's when
    no phase-2 step is configured)."""
    outcomes: dict[str, int] = {}
    for m in markers:
        for k, v in m["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
    processed = sum(m["samples"] for m in markers)
    manifest = {
        "name": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "versions": versions(),
        "models": models_of(cfg),
        "input_rows": plan["input_rows"],
        "samples": plan["samples"],
        "outcomes": dict(sorted(outcomes.items())),
        "kept": outcomes.get("kept", 0),
        "waves": [{"wave": m["wave"], "samples": m["samples"], "seconds": m["seconds"], "files": m["files"],
                   "stats": m.get("stats", [])} for m in markers],
        "waves_resumed": resumed,
        "phase2": phase2.get("steps", {}),
        "data_files": [f for m in markers for f in m["files"]],
        "timings": timings,
        "finished": time.time(),
    }
    manifest["final"] = phase2.get("final") or {"kept": manifest["kept"], "outcomes": manifest["outcomes"],
                                                "sidecars": None, "order": []}
    steps = manifest["phase2"]
    if "selection.reward_top_fraction" in steps:  # Compress & Align's figure: how much of the run was removed
        kept = manifest["final"]["kept"]
        manifest["compression"] = {"samples": plan["samples"],
                                   "scored": steps["selection.reward_top_fraction"]["scored"],
                                   "kept": kept,
                                   "kept_fraction": kept / max(plan["samples"], 1),
                                   "compression_ratio": 1 - kept / max(plan["samples"], 1)}
    recap = [m["recaption"] for m in markers if "recaption" in m]
    if recap:  # how often the recaption was the reward model's best caption
        r = {k: sum(x.get(k, 0) for x in recap) for k in ("recaptioned", "cached", "ranked", "won")}
        r["win_rate"] = r["won"] / r["ranked"] if r["ranked"] else None
        manifest["recaption"] = r
    busy = [m["download"] for m in markers if m.get("download")]
    if busy:  # the occupancy of the download actors' request slots over the run
        manifest["download"] = occupancy({"open_request_s": sum(b["open_request_s"] for b in busy),
                                          "active_s": sum(b["active_s"] for b in busy)}, cfg)
    manifest["throughput_samples_per_s"] = round(processed / max(timings["phase1_s"], 1e-9), 2)
    return manifest


def summary_table(manifest: dict) -> str:
    """A human summary: samples per status, stage and reason, and throughput."""
    rows = [("kept", "", "", manifest.get("kept", 0))]
    for key, n in manifest["outcomes"].items():
        if key != "kept":
            rows.append((*key.split("/", 2), n))
    widths = [max(len(str(r[i])) for r in rows + [("status", "stage", "reason", 0)]) for i in range(3)]
    fmt = "{:<%d}  {:<%d}  {:<%d}  {:>8}" % tuple(widths)
    rule = "-" * (sum(widths) + 14)
    lines = [fmt.format("status", "stage", "reason", "samples"), rule]
    lines += [fmt.format(*r) for r in rows]
    t = manifest["timings"]
    lines += [rule, f"{manifest['input_rows']} input rows -> {manifest['samples']} samples; "
              f"plan {t['plan_s']:.1f}s, download+images {t['phase1_s']:.1f}s "
              f"({manifest['throughput_samples_per_s']:.1f} samples/s), total {t['total_s']:.1f}s"]
    if manifest.get("download"):
        d = manifest["download"]
        lines.append(f"download: {d['mean_open_requests']:.1f} open requests per actor on average while it had work, "
                     f"of download.concurrency {d['concurrency']} ({d['occupancy']:.0%})")
    for name, step in sorted((manifest.get("phase2") or {}).items(), key=lambda kv: kv[1].get("order", 0)):
        detail = (f", top {step['fraction']:g} of {step['scored']} scored, threshold {step['threshold']:.4f}"
                  if "fraction" in step and step.get("threshold") is not None else "")
        merged = f", {step['merged']} captions merged" if step.get("merged") else ""
        lines.append(f"phase 2, step {step['order']} {name}: {step['entering']} -> {step['kept']} kept "
                     f"({step['dropped']} dropped{merged}{detail})")
    if manifest.get("snapshot"):
        snap = manifest["snapshot"]
        lines.append(f"snapshot v={snap['version']:04d}: {snap['kept']} samples at {snap['path']}"
                     + (f" (parent v={snap['parent']:04d})" if snap.get("parent") else ""))
        for column, ix in (snap.get("indices") or {}).items():
            lines.append(f"index {column}: " + (f"skipped ({ix['skipped']})" if "skipped" in ix else
                                                f"{ix['factory']}, {ix['vectors']} vectors, recall@10 {ix['recall']:.3f}, "
                                                f"{ix['query_ms_p50']:.2f} ms/query"))
    final = manifest.get("final") or {}
    if final.get("sidecars"):
        lines.append(f"final: {final['kept']} of {manifest['samples']} samples kept "
                     f"(each sample's final status in {final['sidecars']})")
    if manifest.get("compression"):
        c = manifest["compression"]
        lines.append(f"compression (every phase-2 step, the reward top fraction among them): "
                     f"{c['compression_ratio']:.1%} removed, "
                     f"{c['kept']} of {c['samples']} samples kept")
    if manifest.get("recaption"):
        r = manifest["recaption"]
        won = (f"the recaption was the reward model's best caption for {r['won']} of {r['ranked']} "
               f"({r['win_rate']:.1%})" if r["ranked"] else "no reward ranking (reward stage off)")
        lines.append(f"recaption: {r['recaptioned']} samples recaptioned ({r['cached']} from the cache); {won}")
    if manifest.get("report"):
        lines.append(f"report: {manifest['report']['path']} ({manifest['report']['bytes'] / 1e6:.1f} MB)")
    models = manifest.get("models") or {}
    if not models:
        lines.append("models: none enabled (download and images only)")
    for stage, m in models.items():
        meaningless = "captions are gibberish" if stage == "recaption" else "scores are meaningless"
        note = f"RANDOM WEIGHTS ({meaningless})" if m.get("random_weights") else f"pretrained={m['pretrained']}"
        lines.append(f"models: {stage} = {m['model']} ({note})")
    return "\n".join(lines)


def job_args(prog: str, description: str, argv: list[str] | None) -> argparse.Namespace:
    """``CONFIG [--set KEY=VALUE ...]`` of a ``python -m jobs.X`` entry point, with INFO logging."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = job_args("python -m jobs.curate", __doc__.splitlines()[0], argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        manifest = run(cfg)
    except ConfigError as exc:  # found once the cluster is known: another config's output, resources
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(manifest))
    print(f"output: {cfg.output.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
