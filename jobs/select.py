"""Phase 2, global selections over the whole run's phase-1 output (DataComp-style top fraction).

Each step reads only the columns it needs, file by file in Ray tasks, merges small
histograms on the driver (operators/selection.py) and writes, beside every data file, a
sidecar with each sample's final status. Phase-1 files are never rewritten.
"""

from __future__ import annotations

import logging
import posixpath

import numpy as np
import pyarrow.parquet as pq
import ray
from operators.base import count_outcomes
from operators.selection import BINS, exact_top_threshold, high_histogram, low_histogram, scores_of
from operators.selection import TOP_FRACTION_REASON, apply_threshold
from operators.storage import StorageConfig, arrow_fs, join, write_json_atomic

log = logging.getLogger(__name__)
SIDE_COLUMNS = ["sample_id", "status", "drop_stage", "drop_reason", "error_message"]


def _read(path: str, columns: list[str], root: str, storage: StorageConfig | None):
    fs, _ = arrow_fs(root, storage)
    return pq.read_table(path, columns=columns, filesystem=fs)


def _hist_high(path, column, root, storage):
    return high_histogram(scores_of(_read(path, ["status", column], root, storage), column))


def _hist_low(path, column, high, root, storage):
    return low_histogram(scores_of(_read(path, ["status", column], root, storage), column), high)


def _apply(path, column, threshold, out_dir, reason, root, storage):
    table = _read(path, SIDE_COLUMNS + [column], root, storage)
    table = apply_threshold(table, column, threshold, "selection", reason)
    fs, base = arrow_fs(out_dir, storage)
    fs.create_dir(base, recursive=True)
    pq.write_table(table, posixpath.join(base, posixpath.basename(path)), filesystem=fs)
    return count_outcomes(table)


def top_fraction(files: list[str], column: str, fraction: float, out_dir: str, root: str,
                 storage: StorageConfig | None) -> dict:
    """Exact global top-``fraction`` by ``column``; writes sidecars under ``out_dir``."""
    def merged(fn, *args) -> np.ndarray:
        task = ray.remote(num_cpus=1)(fn)
        hist = np.zeros(BINS, np.int64)
        for h in ray.get([task.remote(f, column, *args, root, storage) for f in files]):
            hist += h
        return hist

    cut = exact_top_threshold(fraction, lambda: merged(_hist_high), lambda high: merged(_hist_low, high))
    reason = TOP_FRACTION_REASON.format(column=column, fraction=fraction)
    ap = ray.remote(num_cpus=1)(_apply)
    outcomes: dict[str, int] = {}
    for c in ray.get([ap.remote(f, column, cut.threshold, out_dir, reason, root, storage) for f in files]):
        for k, v in c.items():
            outcomes[k] = outcomes.get(k, 0) + v
    report = {"column": column, "fraction": fraction, "scored": cut.n, "target_kept": cut.k,
              "threshold": cut.threshold, "kept": outcomes.get("kept", 0), "outcomes": dict(sorted(outcomes.items())),
              "sidecars": out_dir}
    write_json_atomic(join(out_dir, "_SELECTION.json"), report, storage)
    log.info("selection: top %.3g by %s over %d scored samples -> threshold %.6g, %d kept",
             fraction, column, cut.n, cut.threshold if cut.threshold is not None else float("nan"), report["kept"])
    return report


def run_selection(cfg, files: list[str]) -> dict:
    """All configured phase-2 selections; returns their reports by name (the job checked before
    launch that each score column is written by an enabled stage)."""
    return {name: top_fraction(files, column, fraction, join(cfg.output.path, "selection", name), cfg.output.path,
                               cfg.storage)
            for name, (column, fraction) in cfg.selection.fractions().items()}
