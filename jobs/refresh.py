"""Incremental refresh: a new crawl against a dataset's latest snapshot, published as the next version.

``python -m jobs.refresh CONFIG [--set a.b=c ...]`` (or ``imgcurate refresh CONFIG``) with the
dataset's job config (the same stages as the run that made it) whose ``input`` names the new crawl:

1. holds the dataset's lock (``<output>/_LOCK.json``, operators/lock.py): two refreshes, or a
   refresh and a run, of one dataset never run at once;
2. plans the crawl into ``<output>/refreshes/v=NNNN/`` (``NNNN``: the version it will publish),
   then anti-joins it bucket by bucket against the ids the parent snapshot's lineage has seen
   (operators/refresh.py), so phase 1 downloads only samples whose ``sample_id`` is new;
3. runs phase 1 on the new samples in waves (resumable as ``imgcurate run``'s);
4. runs phase 2 over the parent's data files and the new ones together: takedowns first, then
   re-checks of a seeded fraction of old samples, then the configured dedup, selections and coreset;
5. publishes ``<output>/snapshots/v=NNNN/`` (Parquet, WebDataset, kNN indices), whose
   ``_SNAPSHOT.json`` names its ``parent`` and says what changed (``refresh``: added, re-checked,
   removed, taken down), and applies ``refresh.keep_versions``.

A rerun after a crash (a killed driver, a lost head) resumes the same refresh dir: the plan, the
anti-join and finished waves are reused; phase 2 and the publish are redone from the start (they
write only the refresh dir's sidecars and the uncommitted version dir). A refresh whose crawl and
takedowns were already published (the latest snapshot records the same ``crawl_fingerprint``) is
a no-op.
"""

from __future__ import annotations

import logging
import posixpath
import sys
import time

import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from jobs.config import PHASE2_SECTIONS, RUN_SECTIONS, ConfigError, JobConfig, load_config
from jobs.curate import (JobError, check_run_identity, init_ray, job_args, run_wave, versions, wave_paths,
                         write_run_report)
from jobs.phase2 import run_steps, steps_of
from jobs.plan import run_plan, waves_of
from jobs.stages import models_of
from operators.base import KEPT
from operators.lock import LockHeld, OutputLock
from operators.phase2 import FINAL_DIR
from operators.refresh import (DELTA_DIR, SEEN_DIR, RecheckStep, Takedowns, TakedownStep, antijoin_buckets,
                               bucket_groups, seen_of_plan)
from operators.snapshot import MANIFEST, latest_committed, list_versions, publish, snapshot_dir
from operators.storage import arrow_fs, fsspec_fs, join, read_json, write_json_atomic

log = logging.getLogger("imgcurate")

REFRESHES_DIR = "refreshes"
DELTA_MANIFEST = "_DELTA.json"


def load_refresh_config(path: str, overrides: list[str] | None = None) -> JobConfig:
    """A refresh's config is the dataset's job config (its ``input``: the new crawl; ``refresh``: how)."""
    return load_config(path, overrides)


def refresh_dir(root: str, version: int) -> str:
    return join(root, REFRESHES_DIR, f"v={version:04d}")


def stage_fingerprint(cfg: JobConfig) -> str:
    """The phase-1 stages' settings (not the input, plan, run or phase-2 sections): a refresh's old
    and new samples went through the same stages only if these agree."""
    data = cfg.model_dump(mode="json")
    sections = [k for k in data if k not in RUN_SECTIONS | PHASE2_SECTIONS | {"input", "plan"}]
    return cfg.fingerprint(*sections)


def crawl_fingerprint(cfg: JobConfig) -> str:
    """What a refresh publishes from: the crawl, the plan, the phase-1 stages and the takedowns."""
    return cfg.fingerprint(*[k for k in cfg.model_dump(mode="json") if k not in {"name", "output", "storage", "ray"}])


def lineage(root: str, parent: dict | None, storage) -> tuple[list[str], dict | None]:
    """(data files, seen-ids reference) of the parent snapshot's lineage: from its manifest, or for a
    snapshot made before refreshes recorded them, from the run manifest and plan of the output."""
    if parent is None:
        return [], None
    files = parent.get("data_files")
    seen = parent.get("seen")
    if files is None or seen is None:
        run_manifest = read_json(join(root, "_manifest.json"), storage)
        plan = read_json(join(plan_dir_of(root), "_PLAN.json"), storage)
        if run_manifest is None or plan is None:
            raise ConfigError(f"{root}: snapshot v={parent['version']:04d} records no data files and the output has "
                              f"no run manifest and plan to find them; refresh needs the run's output")
        files = run_manifest["data_files"] if files is None else files
        seen = seen_of_plan(plan_dir_of(root), plan) if seen is None else seen
    return list(files), seen


def plan_dir_of(root: str) -> str:
    return join(root, "plan")


def run_antijoin(cfg: JobConfig, rdir: str, plan: dict, seen: dict | None) -> dict:
    """The crawl's new samples, bucket by bucket (committed as ``delta/_DELTA.json``; reused on resume)."""
    path = join(rdir, DELTA_DIR, DELTA_MANIFEST)
    done = read_json(path, cfg.storage)
    if done is not None:
        log.info("refresh: reusing the anti-join (%d new of %d crawl samples)", done["samples"], done["crawl_samples"])
        return done
    if seen is not None and seen["num_buckets"] != len(plan["buckets"]):
        raise ConfigError(f"plan.num_buckets={len(plan['buckets'])} but the dataset's seen ids are in "
                          f"{seen['num_buckets']} buckets; a refresh uses the dataset's plan.num_buckets")
    t0 = time.time()
    task = ray.remote(num_cpus=1, max_retries=3)(antijoin_buckets)
    groups = bucket_groups(plan, cfg.refresh.antijoin_buckets_per_task)
    seen_ref = ray.put(seen)
    results = [r for part in ray.get([task.remote(g, seen_ref, join(rdir, DELTA_DIR), join(rdir, SEEN_DIR),
                                                  cfg.plan.shard_rows, cfg.storage) for g in groups]) for r in part]
    results.sort(key=lambda r: r["bucket"])
    delta = {"buckets": [{"bucket": r["bucket"], "samples": r["samples"], "files": r["files"]} for r in results],
             "samples": sum(r["samples"] for r in results), "crawl_samples": sum(r["crawl_samples"] for r in results),
             "known": sum(r["known"] for r in results), "seen": sum(r["seen"] for r in results),
             "seconds": round(time.time() - t0, 3)}
    write_json_atomic(path, delta, cfg.storage)
    log.info("refresh: %d of the crawl's %d samples are new (%d seen before)", delta["samples"],
             delta["crawl_samples"], delta["known"])
    return delta


def _kept_in(sidecars: list[str], storage) -> int:
    n = 0
    for s in sidecars:
        fs, p = arrow_fs(s, storage)
        n += int(pc.sum(pc.equal(pq.read_table(p, columns=["status"], filesystem=fs).column("status"), KEPT)).as_py()
                 or 0)
    return n


def count_kept(rdir: str, files: list[str], storage, per_task: int = 64) -> int:
    sidecars = [join(rdir, FINAL_DIR, posixpath.basename(f)) for f in files]
    task = ray.remote(num_cpus=1)(_kept_in)
    return sum(ray.get([task.remote(sidecars[k:k + per_task], storage) for k in range(0, len(sidecars), per_task)]))


def apply_retention(root: str, keep: int, storage, current: int) -> list[int]:
    """Remove the oldest committed snapshots beyond the newest ``keep`` (0: keep all)."""
    if keep <= 0:
        return []
    committed = sorted(v for v, ok in list_versions(root, storage).items() if ok)
    gone = [v for v in committed[:-keep] if v != current]
    for v in gone:
        fs, p = fsspec_fs(snapshot_dir(root, v), storage)
        # the manifest first: the version stops being committed before its files go
        fs.rm(posixpath.join(p, MANIFEST))
        fs.rm(p, recursive=True)
        log.info("refresh: retention removed snapshot v=%04d (refresh.keep_versions=%d)", v, keep)
    return gone


def run_refresh(cfg: JobConfig) -> dict:
    """Run (or resume) a refresh of the dataset at ``output.path``; returns its manifest."""
    with OutputLock(cfg.output.path, cfg.storage, purpose="refresh", stale_after_s=cfg.output.lock_stale_after_s,
                    heartbeat_s=cfg.output.lock_heartbeat_s):
        return _refresh(cfg)


def _refresh(cfg: JobConfig) -> dict:
    t0 = time.time()
    root, storage = cfg.output.path, cfg.storage
    init_ray(cfg)
    parent_v = latest_committed(root, storage)
    parent = read_json(join(snapshot_dir(root, parent_v), MANIFEST), storage) if parent_v else None
    crawl_fp = crawl_fingerprint(cfg)
    if parent is not None and (parent.get("refresh") or {}).get("crawl_fingerprint") == crawl_fp:
        log.info("refresh: snapshot v=%04d was published from this crawl and these takedowns already", parent_v)
        return {"already_published": True, "snapshot": _snapshot_summary(parent), "parent": parent.get("parent")}
    theirs = None
    if parent is not None and parent.get("config"):
        try:
            theirs = stage_fingerprint(JobConfig.model_validate(parent["config"]))
        except ValueError as exc:  # a snapshot of an older config schema: not comparable here
            log.warning("refresh: cannot compare the stages with snapshot v=%04d's config (%s)", parent_v,
                        str(exc).splitlines()[0])
        if theirs is not None and theirs != stage_fingerprint(cfg):
            raise ConfigError(f"the refresh's phase-1 stage settings differ from those snapshot v={parent_v:04d} was "
                              f"made with (fingerprint {stage_fingerprint(cfg)} != {theirs}): old and new samples "
                              f"would not be comparable; refresh with the dataset's config and only a new input")
    version = (parent_v or 0) + 1
    rdir = refresh_dir(root, version)
    rcfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"path": rdir, "overwrite": True})})
    check_run_identity(rcfg)  # an unfinished refresh dir of another config is started over
    old_files, seen = lineage(root, parent, storage)
    takedowns = Takedowns(cfg.refresh, cfg.input.max_url_length, storage)  # bad lists fail before any work
    plan = run_plan(rcfg)
    t_plan = time.time()
    delta = run_antijoin(rcfg, rdir, plan, seen)
    markers, resumed = [], 0
    for i, buckets in enumerate(waves_of(delta, cfg.plan.wave_max_samples)):
        marker = read_json(wave_paths(rcfg, i)["marker"], storage)
        if marker is None:
            marker = run_wave(rcfg, i, buckets)
        else:
            resumed += 1
        markers.append(marker)
    t_waves = time.time()
    new_files = [f for m in markers for f in m["files"]]
    files = old_files + new_files
    if not files:
        raise JobError(f"refresh of {root}: no samples at all (no parent snapshot and an empty crawl)")
    columns = _data_columns(files[0], root, storage)
    steps = [TakedownStep(takedowns, columns),
             RecheckStep(cfg.refresh.recheck_fraction, len(old_files), f"v={version:04d}", cfg.download,
                         cfg.refresh.recheck_dead_reasons)] + steps_of(cfg)
    phase2 = run_steps(steps, files, rdir, storage)
    old_kept = count_kept(rdir, old_files, storage) if old_files else 0
    final = phase2["final"]
    outcomes = final["outcomes"]
    taken = {k.rsplit("/", 1)[1][len("takedown_"):]: v for k, v in outcomes.items() if "/refresh/takedown_" in k}
    recheck = phase2["steps"]["refresh.recheck"]
    parent_kept = int((parent or {}).get("counts", {}).get("kept", 0))
    change = {
        "crawl_fingerprint": crawl_fp, "refresh_dir": rdir, "parent": parent_v,
        "crawl": {"input_rows": plan["input_rows"], "samples": delta["crawl_samples"], "known": delta["known"],
                  "new": delta["samples"]},
        "added": final["kept"] - old_kept, "parent_kept": parent_kept, "kept": final["kept"],
        "removed": parent_kept - old_kept if parent is not None else 0,
        "rechecked": {k: recheck[k] for k in ("fraction", "rechecked", "dropped", "inconclusive", "outcomes")},
        "taken_down": {"url": taken.get("url", 0), "sha256": taken.get("sha256", 0), "phash": taken.get("phash", 0),
                       "lists": phase2["steps"]["refresh.takedown"]},
    }
    t_p2 = time.time()
    snapshot = publish(files, root, storage, cfg.publish, final=True, sidecar_root=rdir, manifest_extra={
        "name": cfg.name, "models": models_of(cfg), "config": cfg.model_dump(mode="json"),
        "phase2": phase2["steps"], "stage_fingerprint": stage_fingerprint(cfg), "data_files": files,
        "seen": {"kind": "ids", "dir": join(rdir, SEEN_DIR), "num_buckets": len(plan["buckets"])},
        "refresh": change})
    indices = {}
    if snapshot and cfg.index.enabled:
        from operators.index import build_snapshot_indices

        indices = build_snapshot_indices(snapshot, cfg.index, storage)
    removed_versions = apply_retention(root, cfg.refresh.keep_versions, storage, snapshot.get("version", version))
    manifest = {
        "name": cfg.name, "kind": "refresh", "versions": versions(), "config": cfg.model_dump(mode="json"),
        **change, "snapshot": {**_snapshot_summary(snapshot), "indices": indices},
        "waves": [{"wave": m["wave"], "samples": m["samples"], "seconds": m["seconds"], "outcomes": m["outcomes"],
                   "stats": m.get("stats", [])} for m in markers], "waves_resumed": resumed,
        # what the run report reads (jobs/report.py): the version's samples, old and new, as phase 1 left them
        "input_rows": plan["input_rows"], "samples": sum(phase2["initial"].values()),
        "outcomes": phase2["initial"], "data_files": files, "models": models_of(cfg),
        "phase2": phase2["steps"], "final": final, "retention_removed": removed_versions,
        "timings": {"plan_s": round(t_plan - t0, 3), "phase1_s": round(t_waves - t_plan, 3),
                    "phase2_s": round(t_p2 - t_waves, 3), "publish_s": round(time.time() - t_p2, 3),
                    "total_s": round(time.time() - t0, 3)},
        "finished": time.time(),
    }
    write_json_atomic(join(rdir, "_manifest.json"), manifest, storage)
    if cfg.report.enabled:
        write_run_report(rcfg, manifest)  # next to the refresh's manifest
    return manifest


def _snapshot_summary(s: dict) -> dict:
    return {"version": s.get("version"), "path": s.get("path"), "kept": (s.get("counts") or {}).get("kept"),
            "parent": s.get("parent")}


def _data_columns(path: str, root: str, storage) -> list[str]:
    """A data file's columns (a path as phase 1 lists it, on the output's filesystem)."""
    return list(pq.read_schema(path, filesystem=arrow_fs(root, storage)[0]).names)


def summary(m: dict) -> str:
    if m.get("already_published"):
        return f"refresh: already published as snapshot v={m['snapshot']['version']:04d}; nothing to do"
    s, c, r, t = m["snapshot"], m["crawl"], m["rechecked"], m["taken_down"]
    lines = [f"refresh: snapshot v={s['version']:04d} at {s['path']}"
             + (f" (parent v={m['parent']:04d})" if m.get("parent") else " (no parent)"),
             f"crawl: {c['input_rows']} rows -> {c['samples']} samples, {c['new']} new, {c['known']} seen before",
             f"added {m['added']} samples; removed {m['removed']} of the parent's {m['parent_kept']}; "
             f"{m['kept']} kept in all",
             f"re-checked {r['rechecked']} old samples ({r['fraction']:g} of them): {r['dropped']} dropped, "
             f"{r['inconclusive']} inconclusive",
             f"taken down: {t['url']} by URL, {t['sha256']} by sha256, {t['phash']} by pHash",
             f"time: {m['timings']['total_s']:.1f} s"]
    if m.get("report"):
        lines.append(f"report: {m['report']['path']}")
    if m.get("retention_removed"):
        lines.append("retention removed versions " + ", ".join(f"v={v:04d}" for v in m["retention_removed"]))
    for column, ix in (s.get("indices") or {}).items():
        lines.append(f"index {column}: " + (f"skipped ({ix['skipped']})" if "skipped" in ix else
                                            f"{ix['factory']}, {ix['vectors']} vectors, recall@10 {ix['recall']:.3f}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = job_args("python -m jobs.refresh", __doc__.splitlines()[0], argv)
    try:
        cfg = load_refresh_config(args.config, args.overrides)
        manifest = run_refresh(cfg)
    except (ConfigError, FileNotFoundError, LockHeld) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
