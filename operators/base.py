"""Shared shape of every imgcurate operator.

An operator is a callable class used with ``Dataset.map_batches`` on ``pyarrow.Table``
batches (STYLE.md habits 1-5): ``__init__`` takes a small typed config and validates it,
heavy state is built lazily once per actor, ``__call__`` returns the same rows it got
(marking, never deleting). Rows whose ``status`` is not ``kept`` pass through untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

# Row status values and the columns that carry them (DESIGN.md, "Contracts").
KEPT = "kept"
DROPPED = "dropped"
FAILED = "failed"
STATUS_COLUMNS = ("status", "drop_stage", "drop_reason", "error_message")


@dataclass(frozen=True)
class Resources:
    """What one operator instance needs; overridable from config, never probed."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 256
    # Actor pool size (min, max). None means a stateless task (no actor pool).
    pool: tuple[int, int] | None = None

    def merged(self, **overrides) -> "Resources":
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "pool" in clean and clean["pool"] is not None:
            clean["pool"] = tuple(clean["pool"])
        return dataclasses.replace(self, **clean)


class StageResources(BaseModel):
    """The actor resources every model stage's config declares (never probed from the machine)."""

    num_gpus: float = Field(1.0, ge=0, description="per actor; 0 runs on CPU")
    num_cpus: float = Field(1.0, gt=0)
    pool_min: int = Field(1, ge=1)
    pool_max: int = Field(1, ge=1)


def model_stage_resources(config: StageResources, needs_gpu: bool = True) -> Resources:
    """Resources of a model stage from its config: no GPU when it runs on the CPU."""
    gpus = config.num_gpus if needs_gpu and config.device != "cpu" else 0.0
    return Resources(num_cpus=config.num_cpus, num_gpus=gpus, batch_size=config.batch_size,
                     pool=(config.pool_min, config.pool_max))


class Operator:
    """Base class: declares columns and resources; subclasses implement ``process``."""

    name: ClassVar[str] = "operator"
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    default_resources: ClassVar[Resources] = Resources()

    def __call__(self, batch: pa.Table) -> pa.Table:
        missing = [c for c in self.reads if c not in batch.column_names]
        if missing:
            raise KeyError(f"{self.name}: input lacks columns {missing}")
        out = self.process(batch)
        if out.num_rows != batch.num_rows:
            raise AssertionError(f"{self.name} changed the row count {batch.num_rows} -> {out.num_rows}")
        return out

    def process(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError


def alive_mask(batch: pa.Table) -> list[bool]:
    """Which rows are still kept (the others pass through without compute)."""
    return [s == KEPT for s in batch.column("status").to_pylist()]


def set_columns(batch: pa.Table, columns: dict[str, pa.Array | Sequence]) -> pa.Table:
    """Replace or append columns by name, keeping the others in place."""
    for name, values in columns.items():
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
        idx = batch.schema.get_field_index(name)
        if idx >= 0:
            batch = batch.set_column(idx, name, arr)
        else:
            batch = batch.append_column(name, arr)
    return batch


def mark(
    batch: pa.Table,
    stage: str,
    outcomes: Iterable[tuple[str, str | None, str | None] | None],
) -> pa.Table:
    """Apply per-row outcomes ``(status, reason, message)``; ``None`` leaves a row as it is.

    Only rows that are still kept can change: an earlier drop is never overwritten.
    """
    status = batch.column("status").to_pylist()
    stage_col = batch.column("drop_stage").to_pylist()
    reason_col = batch.column("drop_reason").to_pylist()
    msg_col = batch.column("error_message").to_pylist()
    for i, outcome in enumerate(outcomes):
        if outcome is None or status[i] != KEPT:
            continue
        new_status, reason, message = outcome
        if new_status == KEPT:
            continue
        status[i], stage_col[i], reason_col[i], msg_col[i] = new_status, stage, reason, message
    return set_columns(
        batch,
        {
            "status": pa.array(status, pa.string()),
            "drop_stage": pa.array(stage_col, pa.string()),
            "drop_reason": pa.array(reason_col, pa.string()),
            "error_message": pa.array(msg_col, pa.string()),
        },
    )


def count_outcomes(table: pa.Table) -> dict[str, int]:
    """Counts per ``status/stage/reason`` key, e.g. ``dropped/download/http_404``."""
    if table.num_rows == 0:
        return {}
    grouped = table.select(["status", "drop_stage", "drop_reason"]).group_by(
        ["status", "drop_stage", "drop_reason"], use_threads=False
    ).aggregate([([], "count_all")])
    out: dict[str, int] = {}
    for row in grouped.to_pylist():
        key = row["status"] if row["status"] == KEPT else f"{row['status']}/{row['drop_stage']}/{row['drop_reason']}"
        out[key] = out.get(key, 0) + int(row["count_all"])
    return out


def null_where_not_kept(batch: pa.Table, column: str) -> pa.Array:
    """The column's values for kept rows, null for the others (image bytes of dropped rows)."""
    keep = pc.equal(batch.column("status"), KEPT)
    return pc.if_else(keep, batch.column(column), pa.scalar(None, batch.schema.field(column).type))
