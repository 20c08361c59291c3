"""Phase 2: the global selections over the whole run's phase-1 output, chained into one final status.

The configured selections (``SelectionConfig.fractions()``, in that order: the CLIP top fraction,
then the reward top fraction) apply one after the other, each over what the previous ones kept:
the reward top 30% is 30% of the samples that survived the CLIP cut, not of the whole run. The
first step that drops a sample names the stage (``selection``) and the reason
(``<column>_not_top_<fraction>``); later steps leave it alone. One set of sidecar files, under
``<output>/final/`` beside the data files' basenames, holds every sample's final status, and
``final/_FINAL.json`` (written last) the steps in order with their thresholds and counts.

Each step is fitted with two histogram passes (operators/selection.py), one Ray task per data
file; a task reads only ``status`` and the score columns of the steps so far and re-applies the
earlier steps' thresholds to its rows in memory, so no intermediate file and no per-sample state on
the driver. A last pass writes the sidecars. Phase-1 files are never rewritten.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from operators.base import count_outcomes
from operators.selection import (BINS, TOP_FRACTION_REASON, SelectionConfig, apply_threshold, exact_top_threshold,
                                 high_histogram, low_histogram, scores_of)
from operators.storage import StorageConfig, arrow_fs, join, write_json_atomic

log = logging.getLogger(__name__)
SIDE_COLUMNS = ["sample_id", "status", "drop_stage", "drop_reason", "error_message"]
FINAL_DIR = "final"
STAGE = "selection"


@dataclass
class TopFraction:
    """One selection step: keep the top ``fraction`` by ``column`` of what is still kept."""

    name: str
    column: str
    fraction: float
    threshold: float | None = None  # set once fitted
    report: dict = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return TOP_FRACTION_REASON.format(column=self.column, fraction=self.fraction)

    def apply(self, table: pa.Table) -> pa.Table:
        return apply_threshold(table, self.column, self.threshold, STAGE, self.reason)


def steps_of(selection: SelectionConfig) -> list[TopFraction]:
    """The configured selections in the order they apply."""
    return [TopFraction(name, column, fraction) for name, (column, fraction) in selection.fractions().items()]


def _read(path: str, columns: list[str], root: str, storage: StorageConfig | None) -> pa.Table:
    fs, _ = arrow_fs(root, storage)
    return pq.read_table(path, columns=columns, filesystem=fs)


def _surviving(path: str, done: list[TopFraction], step: TopFraction, root: str, storage) -> np.ndarray:
    """The scores by ``step.column`` of this file's rows still kept after the fitted steps ``done``."""
    columns = list(dict.fromkeys(SIDE_COLUMNS[1:] + [s.column for s in done] + [step.column]))
    table = _read(path, columns, root, storage)
    for s in done:
        table = s.apply(table)
    return scores_of(table, step.column)


def _hist_high(path, done, step, root, storage):
    return high_histogram(_surviving(path, done, step, root, storage))


def _hist_low(path, done, step, high, root, storage):
    return low_histogram(_surviving(path, done, step, root, storage), high)


def _write_final(path: str, steps: list[TopFraction], out_dir: str, root: str, storage) -> dict:
    """The final status of this file's samples after every step, and how many were kept before the
    first step and after each."""
    columns = list(dict.fromkeys(SIDE_COLUMNS + [s.column for s in steps]))
    table = _read(path, columns, root, storage)
    kept_after = [count_outcomes(table).get("kept", 0)]  # entering the first step, then after each
    for s in steps:
        table = s.apply(table)
        kept_after.append(count_outcomes(table).get("kept", 0))
    table = table.select(SIDE_COLUMNS)
    fs, base = arrow_fs(out_dir, storage)
    fs.create_dir(base, recursive=True)
    pq.write_table(table, posixpath.join(base, posixpath.basename(path)), filesystem=fs)
    return {"outcomes": count_outcomes(table), "kept_after": kept_after}


def run_selection(selection: SelectionConfig, files: list[str], output_path: str,
                  storage: StorageConfig | None = None) -> dict:
    """Fit every configured step in order over the files, write the final-status sidecars, and
    return ``{"steps": {name: report}, "final": {...}}`` (empty when no step is configured)."""
    steps = steps_of(selection)
    if not steps:
        return {}
    high_task = ray.remote(num_cpus=1)(_hist_high)
    low_task = ray.remote(num_cpus=1)(_hist_low)

    def merged(refs) -> np.ndarray:
        hist = np.zeros(BINS, np.int64)
        for h in ray.get(refs):
            hist += h
        return hist

    for i, step in enumerate(steps):
        done = steps[:i]
        cut = exact_top_threshold(
            step.fraction,
            lambda: merged([high_task.remote(f, done, step, output_path, storage) for f in files]),
            lambda high: merged([low_task.remote(f, done, step, high, output_path, storage) for f in files]))
        step.threshold = cut.threshold
        step.report = {"order": i + 1, "column": step.column, "fraction": step.fraction, "scored": cut.n,
                       "target_kept": cut.k, "threshold": cut.threshold}
    out_dir = join(output_path, FINAL_DIR)
    final_task = ray.remote(num_cpus=1)(_write_final)
    outcomes: dict[str, int] = {}
    kept_after = [0] * (len(steps) + 1)
    for part in ray.get([final_task.remote(f, steps, out_dir, output_path, storage) for f in files]):
        for k, v in part["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + v
        kept_after = [a + b for a, b in zip(kept_after, part["kept_after"])]
    for i, step in enumerate(steps):
        step.report["entering"], step.report["kept"] = kept_after[i], kept_after[i + 1]
        kept = kept_after[i + 1]
        log.info("selection %d: top %.3g by %s over %d scored samples -> threshold %.6g, %d still kept",
                 step.report["order"], step.fraction, step.column, step.report["scored"],
                 step.threshold if step.threshold is not None else float("nan"), kept)
    final = {"kept": outcomes.get("kept", 0), "outcomes": dict(sorted(outcomes.items())), "sidecars": out_dir,
             "order": [s.name for s in steps]}
    result = {"steps": {s.name: s.report for s in steps}, "final": final}
    write_json_atomic(join(out_dir, "_FINAL.json"), result, storage)
    return result
