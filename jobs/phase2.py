"""Phase 2: the global steps over the whole run's phase-1 output, chained into one final status.

The steps run in the order of ``ORDER`` (those configured), each over the samples the previous
ones kept:

1. ``dedup.exact``: same sha256, one image (the kept sample gets its twins' captions);
2. ``dedup.perceptual``: pHash within ``max_hamming``;
3. ``dedup.semantic``: SemDeDup on the CLIP image embeddings;
4. ``selection.clip_top_fraction`` then 5. ``selection.reward_top_fraction``: exact top fractions
   of what is still kept (a reward top 30% after dedup is 30% of the deduplicated run);
6. ``coreset``: SimCore against a target set.

Dedup first, so that copies neither take places in a top fraction nor in the coreset; the coreset
last, over what every filter kept. Each step is an ``operators.phase2.Phase2Step``: it reads the
alive rows through ``Phase2Context.alive`` and returns decision rows, which are routed to the data
file they concern (Ray Data ``groupby("_file")``) and applied to that file's sidecar under
``<output>/final/`` (row-aligned with the data file: ``sample_id``, the status columns,
``duplicate_of``, and ``captions`` / ``caption_sources`` where a merge changed them). The first
step that drops a sample names the stage and the reason; later steps cannot change it.
``final/_FINAL.json`` (written last) lists the steps in order with their reports and the final
counts. Phase-1 files are never rewritten, and a rerun of phase 2 starts from the data files again.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from operators.base import KEPT, STATUS_COLUMNS, count_outcomes, set_columns
from operators.phase2 import (DECISION_SCHEMA, DUPLICATE_OF, FILE_COLUMN, FINAL_DIR, FINAL_MARKER, MERGED_COLUMNS,
                              Phase2Step, StepResult)
from operators.storage import StorageConfig, arrow_fs, fsspec_fs, join, write_json_atomic

log = logging.getLogger(__name__)
WORK_DIR = "_phase2"
SIDE_COLUMNS = ["sample_id", *STATUS_COLUMNS]
SIDECAR_SCHEMA = pa.schema([("sample_id", pa.string()), ("status", pa.string()), ("drop_stage", pa.string()),
                            ("drop_reason", pa.string()), ("error_message", pa.string()),
                            (DUPLICATE_OF, pa.string()),
                            *[DECISION_SCHEMA.field(c) for c in MERGED_COLUMNS]])
MERGED = MERGED_COLUMNS
# A sample's score is the best of its captions' (phase 1's clip_score / reward): after a merge, of
# the merged captions'.
BEST_OF = {"clip_score": "clip_scores", "reward": "reward_scores"}


def steps_of(cfg) -> list[Phase2Step]:
    """The configured steps of ``cfg`` in ``ORDER``."""
    steps: list[Phase2Step] = []
    for name, build in ORDER:
        step = build(cfg)
        if step is not None:
            steps.append(step)
    return steps


def _selection_step(column_key: str) -> Callable:
    def build(cfg):
        from operators.selection import TopFractionStep

        picked = cfg.selection.fractions().get(column_key)
        return None if picked is None else TopFractionStep(column_key, *picked)
    return build


def _dedup_step(kind: str) -> Callable:
    def build(cfg):
        dedup = getattr(cfg, "dedup", None)
        return None if dedup is None else next((s for s in dedup.steps() if s.name == f"dedup.{kind}"), None)
    return build


def _coreset_step(cfg):
    from operators.coreset import CoresetStep

    c = getattr(cfg, "coreset", None)
    if c is None or not c.enabled:
        return None
    return CoresetStep(c, clip_config=getattr(cfg, "clip", None), download_config=getattr(cfg, "download", None))


# (name, builder from the job config -> step or None), in the order the steps run.
ORDER: tuple[tuple[str, Callable], ...] = (
    ("dedup.exact", _dedup_step("exact")),
    ("dedup.perceptual", _dedup_step("perceptual")),
    ("dedup.semantic", _dedup_step("semantic")),
    ("selection.clip_top_fraction", _selection_step("clip_top_fraction")),
    ("selection.reward_top_fraction", _selection_step("reward_top_fraction")),
    ("coreset", _coreset_step),
)


class Phase2Context:
    """What a step sees: the run's data files, their sidecars, a work dir, the storage."""

    def __init__(self, files: list[str], output_path: str, storage: StorageConfig | None = None,
                 parallelism: int | None = None):
        names = [posixpath.basename(f) for f in files]
        if len(set(names)) != len(names):
            raise ValueError("phase 2: two data files share a basename; their sidecars would collide")
        self.files = list(files)
        self.output_path = output_path
        self.storage = storage
        self.sidecar_dir = join(output_path, FINAL_DIR)
        cpus = int(ray.cluster_resources().get("CPU", 1)) if parallelism is None else parallelism
        self.parallelism = max(1, min(len(files), 2 * max(cpus, 1)))

    @property
    def num_files(self) -> int:
        return len(self.files)

    def data_columns(self) -> list[str]:
        """The columns of the run's data files (from the first file's schema)."""
        if not self.files:
            return []
        fs, _ = arrow_fs(self.output_path, self.storage)
        return list(pq.read_schema(self.files[0], filesystem=fs).names)

    def sidecar(self, i: int) -> str:
        return join(self.sidecar_dir, posixpath.basename(self.files[i]))

    def work_dir(self, step: str) -> str:
        """Where a step keeps its intermediate files (under the output, rewritten by a rerun)."""
        return join(self.output_path, WORK_DIR, step)

    def alive(self, columns: list[str] | tuple[str, ...] = (), then=None) -> "ray.data.Dataset":
        """The samples still kept: ``_file``, ``sample_id``, ``status`` and ``columns`` (captions
        and caption_sources as merged by earlier steps), one read task per data file. ``then``
        (a function of the table) runs inside the read, on every file's rows, even none: a step
        that keys its rows for a shuffle passes its keying here, so no block (say, of a file with
        no sample left) reaches the shuffle without the key column."""
        wanted = [c for c in dict.fromkeys(columns) if c not in ("sample_id", "status", FILE_COLUMN)]
        files, sidecars, root, storage = self.files, [self.sidecar(i) for i in range(self.num_files)], \
            self.output_path, self.storage

        def read(batch: pa.Table) -> pa.Table:
            out = [_alive_rows(int(i), files[int(i)], sidecars[int(i)], wanted, root, storage)
                   for i in batch.column("i").to_pylist()]
            if then is not None:
                out = [then(t) for t in out]
            return pa.concat_tables(out) if out else pa.table({})

        ds = ray.data.from_items([{"i": i} for i in range(self.num_files)], override_num_blocks=max(1, self.num_files))
        return ds.map_batches(read, batch_format="pyarrow", batch_size=1)


def _read(path: str, columns: list[str] | None, root: str, storage: StorageConfig | None) -> pa.Table:
    """A data file (a path as phase 1 listed it, on the output's filesystem)."""
    fs, _ = arrow_fs(root, storage)
    return pq.read_table(path, columns=columns, filesystem=fs)


def _read_sidecar(path: str, storage: StorageConfig | None, columns: list[str] | None = None) -> pa.Table:
    fs, p = arrow_fs(path, storage)
    return pq.read_table(p, columns=columns, filesystem=fs)


def _write_sidecar(table: pa.Table, path: str, storage: StorageConfig | None) -> None:
    fs, p = arrow_fs(path, storage)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    pq.write_table(table, p, filesystem=fs)


def _alive_rows(i: int, path: str, sidecar: str, columns: list[str], root: str, storage) -> pa.Table:
    side = _read_sidecar(sidecar, storage)
    data = _read(path, ["sample_id", *columns], root, storage)
    if not data.column("sample_id").equals(side.column("sample_id")):
        raise RuntimeError(f"phase 2: sidecar {sidecar} is not row-aligned with {path}")
    cols: dict = {FILE_COLUMN: pa.array(np.full(data.num_rows, i, np.int32)), "sample_id": data.column("sample_id"),
                  "status": side.column("status")}
    for c in columns:
        if c in MERGED:  # a merge by an earlier step wins over the data file's
            typ = side.schema.field(c).type
            cols[c] = pc.if_else(pc.is_valid(side.column(c)), side.column(c), data.column(c).cast(typ))
        elif c in BEST_OF and side.column(BEST_OF[c]).null_count < side.num_rows:
            # a merge gave the sample more scored captions: its score is the best of them
            best = [max((x for x in v if x is not None), default=None) if v else None
                    for v in side.column(BEST_OF[c]).to_pylist()]
            cols[c] = pc.if_else(pc.is_valid(side.column(BEST_OF[c])), pa.array(best, pa.float32()),
                                 data.column(c).cast(pa.float32()))
        else:
            cols[c] = data.column(c)
    return pa.table(cols).filter(pc.equal(side.column("status"), KEPT))


def _init_sidecar(i: int, path: str, sidecar: str, root: str, storage) -> dict:
    data = _read(path, SIDE_COLUMNS, root, storage)
    n = data.num_rows
    table = pa.table({**{c: data.column(c) for c in SIDE_COLUMNS},
                      DUPLICATE_OF: pa.nulls(n, pa.string()),
                      **{c: pa.nulls(n, SIDECAR_SCHEMA.field(c).type) for c in MERGED}}, schema=SIDECAR_SCHEMA)
    _write_sidecar(table, sidecar, storage)
    return count_outcomes(table)


def _apply_to_sidecar(group: pa.Table, sidecars: list[str], stage: str, storage) -> pa.Table:
    """One data file's decisions applied to its sidecar; returns (file, dropped, merged)."""
    i = int(group.column(FILE_COLUMN)[0].as_py())
    side = _read_sidecar(sidecars[i], storage)
    pos = {sid: k for k, sid in enumerate(side.column("sample_id").to_pylist())}
    status = side.column("status").to_pylist()
    cols = {c: side.column(c).to_pylist() for c in ("drop_stage", "drop_reason", "error_message", DUPLICATE_OF,
                                                     *MERGED)}
    dropped = merged = 0
    reasons: dict[str, int] = {}
    for d in group.to_pylist():
        k = pos.get(d["sample_id"])
        if k is None:
            raise RuntimeError(f"phase 2 {stage}: a decision names {d['sample_id']!r}, not in {sidecars[i]}")
        if status[k] != KEPT:
            continue  # an earlier step dropped it first
        if d["status"] == KEPT:
            for c in MERGED:
                cols[c][k] = d[c]
            merged += 1
            continue
        status[k] = d["status"]
        cols["drop_stage"][k], cols["drop_reason"][k] = stage, d["drop_reason"]
        cols["error_message"][k], cols[DUPLICATE_OF][k] = d["error_message"], d[DUPLICATE_OF]
        dropped += 1
        reasons[d["drop_reason"]] = reasons.get(d["drop_reason"], 0) + 1
    side = set_columns(side, {"status": pa.array(status, pa.string()),
                              **{c: pa.array(v, SIDECAR_SCHEMA.field(c).type) for c, v in cols.items()}})
    _write_sidecar(side, sidecars[i], storage)
    return pa.table({FILE_COLUMN: [i], "dropped": [dropped], "merged": [merged], "reasons": [json.dumps(reasons)]})


def apply_decisions(ctx: Phase2Context, step: Phase2Step, decisions) -> dict:
    """Route a step's decisions to their files' sidecars; returns how many it dropped (in all and
    by reason) and merged."""
    sidecars, storage, stage = [ctx.sidecar(i) for i in range(ctx.num_files)], ctx.storage, step.stage
    counts = decisions.groupby(FILE_COLUMN, num_partitions=ctx.parallelism).map_groups(
        lambda g: _apply_to_sidecar(g, sidecars, stage, storage), batch_format="pyarrow").take_all()
    reasons: dict[str, int] = {}
    for r in counts:
        for reason, n in json.loads(r["reasons"]).items():
            reasons[reason] = reasons.get(reason, 0) + n
    return {"dropped": sum(r["dropped"] for r in counts), "merged": sum(r["merged"] for r in counts),
            "reasons": dict(sorted(reasons.items()))}


def run_phase2(cfg, files: list[str], steps: list[Phase2Step] | None = None) -> dict:
    """Every configured phase-2 step in order over the data files; writes the sidecars and
    ``final/_FINAL.json``. Returns ``{"steps": {name: report}, "final": {...}}``, or ``{}`` when no
    step is configured (the data files' status is then final)."""
    steps = steps_of(cfg) if steps is None else steps
    if not steps:
        return {}
    return run_steps(steps, files, cfg.output.path, cfg.storage)


def run_steps(steps: list[Phase2Step], files: list[str], output_path: str,
              storage: StorageConfig | None = None) -> dict:
    ctx = Phase2Context(files, output_path, storage)
    # The commit marker goes first: sidecars being rewritten are never trusted (the snapshot
    # publisher requires the marker), and a crashed rerun leaves none.
    fs, marker = fsspec_fs(join(ctx.sidecar_dir, FINAL_MARKER), storage)
    if fs.exists(marker):
        fs.rm(marker)
    init = ray.remote(num_cpus=1)(_init_sidecar)
    outcomes: dict[str, int] = {}
    for part in ray.get([init.remote(i, f, ctx.sidecar(i), output_path, storage) for i, f in enumerate(files)]):
        for k, v in part.items():
            outcomes[k] = outcomes.get(k, 0) + v
    kept = outcomes.get(KEPT, 0)
    reports: dict[str, dict] = {}
    for order, step in enumerate(steps, 1):
        t0 = time.time()
        result: StepResult = step.run(ctx)
        applied = apply_decisions(ctx, step, result.decisions) if result.decisions is not None else \
            {"dropped": 0, "merged": 0, "reasons": {}}
        wfs, wdir = fsspec_fs(ctx.work_dir(step.name), storage)
        if wfs.exists(wdir):  # the step's intermediates, read by its decisions: done with now
            wfs.rm(wdir, recursive=True)
        report = {"order": order, "stage": step.stage, **result.report, "entering": kept,
                  "dropped": applied["dropped"], "kept": kept - applied["dropped"], "reasons": applied["reasons"]}
        if applied["merged"]:
            report["merged"] = applied["merged"]
        report["seconds"] = round(time.time() - t0, 3)
        kept = report["kept"]
        reports[step.name] = report
        log.info("phase 2 step %d %s: %d -> %d kept", order, step.name, report["entering"], kept)
    final_outcomes: dict[str, int] = {}
    count = ray.remote(num_cpus=1)(lambda p: count_outcomes(_read_sidecar(p, storage, SIDE_COLUMNS)))
    for part in ray.get([count.remote(ctx.sidecar(i)) for i in range(ctx.num_files)]):
        for k, v in part.items():
            final_outcomes[k] = final_outcomes.get(k, 0) + v
    final = {"kept": final_outcomes.get(KEPT, 0), "outcomes": dict(sorted(final_outcomes.items())),
             "sidecars": ctx.sidecar_dir, "order": [s.name for s in steps]}
    # ``initial``: every sample's status as phase 1 left it (what the steps started from), for the run report.
    result = {"steps": reports, "final": final, "initial": dict(sorted(outcomes.items()))}
    write_json_atomic(join(ctx.sidecar_dir, FINAL_MARKER), result, storage)
    return result
