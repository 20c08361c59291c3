"""Shared shape of every imgcurate operator.

An operator is a callable class used with ``Dataset.map_batches`` on ``pyarrow.Table``
batches (STYLE.md habits 1-5): ``__init__`` takes a small typed config and validates it,
heavy state is built lazily once per actor, ``__call__`` returns the same rows it got
(marking, never deleting). Rows whose ``status`` is not ``kept`` pass through untouched.

Each operator declares, as a function of its config, the columns it reads and writes
(``columns``) and the reasons it can drop a row for (``reasons``); ``Operator.__call__``
checks both after every batch, the job checks the chain before launch (jobs/stages.py), and
README's drop-reason table is generated from the declarations. ``KeptRowsStage`` is the base of
the model stages: it hands the subclass only the kept rows and keeps the books.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import numpy as np
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
    num_cpus: float = Field(1.0, gt=0, description="per actor")
    pool_min: int = Field(1, ge=1, description="actors at least")
    pool_max: int = Field(1, ge=1, description="actors at most (the pool grows with the work)")


def model_stage_resources(config: StageResources, needs_gpu: bool = True) -> Resources:
    """Resources of a model stage from its config: no GPU when it runs on the CPU."""
    gpus = config.num_gpus if needs_gpu and config.device != "cpu" else 0.0
    return Resources(num_cpus=config.num_cpus, num_gpus=gpus, batch_size=config.batch_size,
                     pool=(config.pool_min, config.pool_max))


@dataclass(frozen=True)
class DropReason:
    """A reason a stage can give for a drop, declared by the stage (README's table is generated from these).

    ``name`` is the reason itself (``decode_error``) or a template whose fields come from the config
    or the data (``clip_below_{min_score}``, ``http_{code}``); ``status`` is ``dropped`` (a policy
    refused the sample) or ``failed`` (something broke)."""

    name: str
    status: str
    meaning: str

    @property
    def templated(self) -> bool:
        return "{" in self.name

    def format(self, **fields) -> str:
        return self.name.format(**{k: f"{v:g}" if isinstance(v, float) else v for k, v in fields.items()})

    def matches(self, reason: str) -> bool:
        if not self.templated:
            return reason == self.name
        parts = re.split(r"\{[a-z_]+\}", self.name)
        return re.fullmatch(r"[^\s]+?".join(re.escape(p) for p in parts), reason) is not None


# A row whose image bytes do not decode, in any stage that decodes them.
DECODE_ERROR = DropReason("decode_error", FAILED, "the image bytes could not be decoded")


@dataclass(frozen=True)
class Columns:
    """What an operator reads and writes, as a function of its config (``Operator.columns``).

    ``writes`` maps each column to its Arrow type; ``None`` means the type is known only once the
    model is loaded (an embedding's width). ``optional`` columns are read when present."""

    reads: tuple[str, ...] = ()
    writes: dict[str, pa.DataType | None] = dataclasses.field(default_factory=dict)
    optional: tuple[str, ...] = ()


class ContractError(AssertionError):
    """An operator broke its declared contract (columns, rows or drop reasons): a bug, not bad data."""


class Operator:
    """Base class: declares columns, drop reasons and resources; subclasses implement ``process``.

    ``__call__`` checks the contract around every batch: the declared input columns are there, the
    same rows come back in the same order, every declared output column is written, and every drop
    this stage marked carries a declared reason."""

    name: ClassVar[str] = "operator"
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    reasons: ClassVar[tuple[DropReason, ...]] = ()

    @classmethod
    def columns(cls, config=None) -> Columns:
        """The columns read and written with this config (default: the class's ``reads``/``writes``)."""
        return Columns(tuple(cls.reads), {c: None for c in cls.writes})

    @classmethod
    def drop_reasons(cls, config=None) -> tuple[DropReason, ...]:
        return tuple(cls.reasons)

    def declared(self) -> Columns:
        cols = self.__dict__.get("_declared")
        if cols is None:
            cols = self._declared = type(self).columns(getattr(self, "config", None))
        return cols

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.check_input(batch)
        out = self.process(batch)
        self.check_output(out, batch)
        return out

    def check_input(self, batch: pa.Table) -> None:
        missing = [c for c in self.declared().reads if c not in batch.column_names]
        if missing:
            raise KeyError(f"{self.name}: input lacks columns {missing}")

    def check_output(self, out: pa.Table, batch: pa.Table | None = None, exempt: tuple[str, ...] = ()) -> None:
        """The contract after a batch (``batch``: the input, when the output has the same rows;
        ``exempt``: declared columns handed on another way, such as the bodies the download actor
        passes to the image stage as a list)."""
        if batch is not None:
            if out.num_rows != batch.num_rows:
                raise ContractError(f"{self.name} changed the row count {batch.num_rows} -> {out.num_rows}")
            if ("sample_id" in batch.column_names and "sample_id" in out.column_names
                    and not out.column("sample_id").equals(batch.column("sample_id"))):
                raise ContractError(f"{self.name} returned other rows (or reordered them) than it got")
        missing = [c for c in self.declared().writes if c not in out.column_names and c not in exempt]
        if missing:
            raise ContractError(f"{self.name} did not write the columns it declares: {missing}")
        if out.num_rows and "drop_stage" in out.column_names:
            mine = pc.equal(out.column("drop_stage"), self.name)
            reasons = pc.unique(pc.filter(out.column("drop_reason"), mine)).to_pylist()
            declared = self.drop_reasons(getattr(self, "config", None))
            bad = [r for r in reasons if r is None or not any(d.matches(r) for d in declared)]
            if bad:
                raise ContractError(f"{self.name} marked drops with undeclared reasons {bad}; declare them in "
                                    f"{type(self).__name__}.reasons")

    def process(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class Scored:
    """What ``KeptRowsStage.score`` returns for the kept rows it was given, in their order:
    ``columns`` (name to values: a list or an Arrow array) and per-row ``outcomes``
    (``(status, reason, message)`` or ``None`` to leave the row kept)."""

    columns: dict[str, pa.Array | list]
    outcomes: list | None = None


class KeptRowsStage(Operator):
    """A stage that computes only on the rows still kept (datatrove's ``BaseFilter`` shape).

    The subclass writes ``setup`` (heavy state, once per actor, only when a batch has kept rows)
    and ``score(rows)`` over the kept rows alone. The base class selects them, scatters the
    results back (rows that are not kept get nulls in new columns and keep their values in
    columns they already had), and marks drops with this stage's name and the reasons given."""

    def setup(self) -> None:
        """Load models and other heavy state; called once, before the first ``score``."""

    def score(self, rows: pa.Table) -> Scored:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_type(self, column: str) -> pa.DataType:
        """The type of a column declared with type ``None`` (may load the model)."""
        raise ContractError(f"{self.name}: column {column!r} has no declared type")

    def _ensure_setup(self) -> None:
        if not self.__dict__.get("_is_set_up"):
            self.setup()
            self._is_set_up = True

    def process(self, batch: pa.Table) -> pa.Table:
        keep = pc.fill_null(pc.equal(batch.column("status"), KEPT), False)
        idx = pc.indices_nonzero(keep)
        n_kept = len(idx)
        scored = Scored({}, None)
        if n_kept:
            self._ensure_setup()
            scored = self.score(batch.take(idx))
        # Row i of the batch takes value pos[i] of the kept rows' values (null where not kept).
        pos = pa.array(np.cumsum(keep.to_numpy(zero_copy_only=False)) - 1, pa.int64())
        pos = pc.if_else(keep, pos, pa.scalar(None, pa.int64()))
        columns = {}
        for name, typ in self.declared().writes.items():
            values = scored.columns.get(name)
            if values is None and n_kept:
                raise ContractError(f"{self.name}.score did not return the declared column {name!r}")
            if typ is None:
                typ = values.type if isinstance(values, (pa.Array, pa.ChunkedArray)) else self.output_type(name)
            arr = pa.nulls(0, typ) if values is None else (
                values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, typ))
            if len(arr) != n_kept:
                raise ContractError(f"{self.name}.score returned {len(arr)} values of {name!r} for {n_kept} rows")
            full = arr.take(pos)
            if name in batch.column_names:
                full = pc.if_else(keep, full, batch.column(name).cast(full.type))
            columns[name] = full
        out = set_columns(batch, columns)
        if scored.outcomes is None or not any(o is not None for o in scored.outcomes):
            return out
        if len(scored.outcomes) != n_kept:
            raise ContractError(f"{self.name}.score returned {len(scored.outcomes)} outcomes for {n_kept} rows")
        outcomes: list = [None] * batch.num_rows
        for k, i in enumerate(idx.to_pylist()):
            outcomes[i] = scored.outcomes[k]
        return mark(out, self.name, outcomes)


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


def outcome_key(status: str, stage: str | None, reason: str | None) -> str:
    """The key an outcome is counted under: ``kept`` or ``status/stage/reason``."""
    return KEPT if status == KEPT else f"{status}/{stage}/{reason}"


def count_outcomes(table: pa.Table) -> dict[str, int]:
    """Counts per ``status/stage/reason`` key, e.g. ``dropped/download/http_404``."""
    if table.num_rows == 0:
        return {}
    grouped = table.select(["status", "drop_stage", "drop_reason"]).group_by(
        ["status", "drop_stage", "drop_reason"], use_threads=False
    ).aggregate([([], "count_all")])
    out: dict[str, int] = {}
    for row in grouped.to_pylist():
        key = outcome_key(row["status"], row["drop_stage"], row["drop_reason"])
        out[key] = out.get(key, 0) + int(row["count_all"])
    return out


def null_where_not_kept(batch: pa.Table, column: str) -> pa.Array:
    """The column's values for kept rows, null for the others (image bytes of dropped rows)."""
    keep = pc.equal(batch.column("status"), KEPT)
    return pc.if_else(keep, batch.column(column), pa.scalar(None, batch.schema.field(column).type))
