"""The contract of a phase-2 step: a global step over the whole run's phase-1 output.

Phase 2 (jobs/phase2.py) runs its steps in a fixed order (``jobs.phase2.ORDER``), each over
the samples the previous steps kept. A step never sees the data files directly: it asks the
context for the **alive rows** (``ctx.alive(columns)``: a Ray Dataset of the samples still kept,
with ``_file``, the index of the data file the row lives in, ``sample_id`` and the columns asked
for; ``captions`` / ``caption_sources`` as merged by earlier steps), computes what it must over the
whole run (distributed: Ray Data's hash shuffles, ``groupby(...).map_groups``, Ray tasks; no
process holds a per-sample structure of the run), and returns its **decisions**: a Ray Dataset of
rows in ``DECISION_SCHEMA``, one per sample it changes:

- a drop: ``status`` ``dropped``, ``drop_reason`` one of the step's declared reasons,
  ``error_message`` a short human reason, ``duplicate_of`` the kept twin's ``sample_id`` (dedup);
- a caption merge: ``status`` ``kept`` with ``captions`` / ``caption_sources`` (and the per-caption
  ``clip_scores`` / ``reward_scores`` where known) replacing the sample's (exact dedup gives the
  kept sample its duplicates' alt-texts).

The framework routes the decisions to the data files they concern (``groupby("_file")``) and
updates that file's sidecar (``<output>/final/<basename>``), which is row-aligned with the data
file; the first step that drops a sample names it, later ones cannot change it.

Writing a step: subclass ``Phase2Step``, set ``name`` (its report key, e.g. ``dedup.exact``),
``stage`` (the ``drop_stage`` of its drops) and ``reasons``; implement ``reads()`` (data columns it
needs, for the job's column-chain check) and ``run(ctx) -> StepResult``. Build decision rows with
``drops()`` / ``merges()`` so the schema is right.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

import pyarrow as pa

from operators.base import DROPPED, KEPT, DropReason

if TYPE_CHECKING:  # the framework's context (jobs/phase2.py); operators never import jobs
    from ray.data import Dataset

FILE_COLUMN = "_file"
FINAL_DIR = "final"  # the sidecars, under the output (row-aligned with the data files)
FINAL_MARKER = "_FINAL.json"  # written last in FINAL_DIR: phase 2 committed its sidecars
DUPLICATE_OF = "duplicate_of"
DECISION_SCHEMA = pa.schema([
    (FILE_COLUMN, pa.int32()),
    ("sample_id", pa.string()),
    ("status", pa.string()),
    ("drop_reason", pa.string()),
    ("error_message", pa.string()),
    (DUPLICATE_OF, pa.string()),
    ("captions", pa.list_(pa.string())),
    ("caption_sources", pa.list_(pa.string())),
    ("clip_scores", pa.list_(pa.float32())),
    ("reward_scores", pa.list_(pa.float32())),
])
# Per-caption columns a merge replaces (aligned with ``captions``): the scores of a caption on an
# image do not depend on which copy of the image it was scored on, so a merged caption keeps its score.
MERGED_CAPTIONS = ("captions", "caption_sources")
CAPTION_SCORES = ("clip_scores", "reward_scores")
MERGED_COLUMNS = (*MERGED_CAPTIONS, *CAPTION_SCORES)


@dataclass
class StepResult:
    """What a step returns: its report (thresholds, counts, parameters: JSON-able) and its
    decisions (None: it changes nothing)."""

    report: dict = field(default_factory=dict)
    decisions: "Dataset | None" = None


class Phase2Step:
    """A global step of phase 2 (see the module docstring)."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    reasons: ClassVar[tuple[DropReason, ...]] = ()

    def reads(self) -> tuple[str, ...]:
        """Data columns the step reads (beyond sample_id and the status columns)."""
        return ()

    def run(self, ctx) -> StepResult:  # ctx: jobs.phase2.Phase2Context
        raise NotImplementedError


def drops(files: Sequence[int], sample_ids: Sequence[str], reason: str, messages: Sequence[str | None] | str | None,
          duplicate_of: Sequence[str | None] | None = None) -> pa.Table:
    """Decision rows dropping ``sample_ids`` (living in data files ``files``) for ``reason``."""
    n = len(sample_ids)
    msgs = [messages] * n if messages is None or isinstance(messages, str) else list(messages)
    return pa.table({
        FILE_COLUMN: pa.array(files, pa.int32()),
        "sample_id": pa.array(sample_ids, pa.string()),
        "status": pa.array([DROPPED] * n, pa.string()),
        "drop_reason": pa.array([reason] * n, pa.string()),
        "error_message": pa.array(msgs, pa.string()),
        DUPLICATE_OF: pa.array(duplicate_of if duplicate_of is not None else [None] * n, pa.string()),
        **{c: pa.nulls(n, DECISION_SCHEMA.field(c).type) for c in MERGED_COLUMNS},
    }, schema=DECISION_SCHEMA)


def merges(files: Sequence[int], sample_ids: Sequence[str], captions: Sequence[list],
           caption_sources: Sequence[list], scores: dict[str, Sequence[list | None]] | None = None) -> pa.Table:
    """Decision rows replacing kept samples' captions (and their sources and ``scores`` by column,
    ``clip_scores`` / ``reward_scores``, aligned with them)."""
    n = len(sample_ids)
    scores = scores or {}
    return pa.table({
        FILE_COLUMN: pa.array(files, pa.int32()),
        "sample_id": pa.array(sample_ids, pa.string()),
        "status": pa.array([KEPT] * n, pa.string()),
        "drop_reason": pa.array([None] * n, pa.string()),
        "error_message": pa.array([None] * n, pa.string()),
        DUPLICATE_OF: pa.array([None] * n, pa.string()),
        "captions": pa.array(list(captions), pa.list_(pa.string())),
        "caption_sources": pa.array(list(caption_sources), pa.list_(pa.string())),
        **{c: pa.array(list(scores[c]) if c in scores else [None] * n, pa.list_(pa.float32()))
           for c in CAPTION_SCORES},
    }, schema=DECISION_SCHEMA)


def empty_decisions() -> pa.Table:
    return DECISION_SCHEMA.empty_table()
