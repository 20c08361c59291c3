"""Sink: every sample written once to Parquet, with status, reason and metadata.

``SinkPrep`` runs as the last map before Ray Data's Parquet write: image bytes stay only
on kept samples (a few dropped ones keep a small ``thumbnail`` for the run report) and the
columns come in a fixed order. ``count_written`` tallies a written wave (streaming over files,
flat memory) for the wave marker and run manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from operators.base import (KEPT, STATUS_COLUMNS, Columns, Operator, count_outcomes, null_where_not_kept, outcome_key,
                            set_columns)
from operators.report.collect import THUMBNAIL, sample_ranks, thumbnail_jpeg
from operators.storage import StorageConfig, arrow_fs

# Parquet options for the sink: image bytes are incompressible and unique, so no dictionary
# and no statistics on them (computing both costs more than the rest of the write); zstd
# skips incompressible pages quickly and shrinks the metadata columns.
DICTIONARY_COLUMNS = ["status", "drop_stage", "drop_reason", "content_type", "image_format", "caption_sources"]
STATISTICS_COLUMNS = ["sample_id", "status", "drop_stage", "drop_reason", "clip_score", "reward", "width", "height"]
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": DICTIONARY_COLUMNS, "write_statistics": STATISTICS_COLUMNS}

# Per-chunk sums of the download actor's open requests (operators/download.py, OpenRequests).
OCCUPANCY_COLUMNS = ("download_open_request_s", "download_active_s")

LEADING_COLUMNS = ("sample_id", "status", "drop_stage", "drop_reason", "error_message", "url", "captions",
                   "caption_sources")


# Longer side of the thumbnail a dropped row keeps (the report shrinks it again to report.thumbnail_px).
THUMBNAIL_PX = 128


@dataclass(frozen=True)
class SinkConfig:
    """``thumbnails_per_reason``: per block and outcome, the dropped rows that still had an image and
    the smallest report ranks (``seed``) keep a thumbnail (report.dropped_thumbnails_per_block)."""

    thumbnails_per_reason: int = 0
    seed: int = 0


class SinkPrep(Operator):
    """Null image bytes of samples that are not kept (a few keep a thumbnail); order columns for readers."""

    name: ClassVar[str] = "sink"
    reads = ("sample_id", *STATUS_COLUMNS)

    def __init__(self, config: SinkConfig | None = None):
        self.config = config or SinkConfig()

    @classmethod
    def columns(cls, config: SinkConfig | None = None) -> Columns:
        writes = {THUMBNAIL: pa.binary()} if config is not None and config.thumbnails_per_reason > 0 else {}
        return Columns(tuple(cls.reads), writes)

    def process(self, batch: pa.Table) -> pa.Table:
        if self.config.thumbnails_per_reason > 0:
            batch = set_columns(batch, {THUMBNAIL: dropped_thumbnails(batch, self.config.thumbnails_per_reason,
                                                                      self.config.seed)})
        if "image" in batch.column_names:
            batch = set_columns(batch, {"image": null_where_not_kept(batch, "image")})
        lead = [c for c in LEADING_COLUMNS if c in batch.column_names]
        rest = [c for c in batch.column_names if c not in lead]
        return batch.select(lead + rest)


def dropped_thumbnails(batch: pa.Table, k: int, seed: int) -> pa.Array:
    """A small JPEG for the ``k`` rows of smallest report rank per drop outcome among the rows that
    are dropped but still hold an image (dropped after decoding: CLIP, safety, reward...). The run
    report's sample of an outcome is the run's smallest ranks, which are each among their own
    block's smallest, so with ``k`` >= report.dropped_per_grid every row it shows has a picture."""
    out: list[bytes | None] = [None] * batch.num_rows
    if "image" in batch.column_names and batch.num_rows:
        has = pc.and_(pc.not_equal(batch.column("status"), KEPT), pc.is_valid(batch.column("image")))
        idx = np.flatnonzero(pc.fill_null(has, False).to_numpy(zero_copy_only=False))
        if idx.size:
            take = pa.array(idx, pa.int64())
            ranks = sample_ranks(batch.column("sample_id").take(take).to_pylist(), seed)
            keys = [outcome_key(*r) for r in zip(*(batch.column(c).take(take).to_pylist()
                                                   for c in ("status", "drop_stage", "drop_reason")))]
            by_key: dict[str, list[tuple[int, int]]] = {}
            for i, key, rank in zip(idx.tolist(), keys, ranks.tolist()):
                by_key.setdefault(key, []).append((rank, i))
            images = batch.column("image")
            for rows in by_key.values():
                for _, i in sorted(rows)[:k]:
                    out[i] = thumbnail_jpeg(images[i].as_py(), THUMBNAIL_PX, 75)
    return pa.array(out, pa.binary())


def sink_prep(batch: pa.Table, config: SinkConfig | None = None) -> pa.Table:
    """Function form of :class:`SinkPrep` for ``map_batches`` as a (fusable) task."""
    return SinkPrep(config)(batch)


def count_written(path: str, storage: StorageConfig | None = None) -> dict:
    """Counts per outcome, rows and distinct-id check of the Parquet files under ``path``."""
    fs, p = arrow_fs(path, storage)
    try:
        dataset = pads.dataset(p, filesystem=fs, format="parquet")
    except (FileNotFoundError, OSError):
        return {"rows": 0, "outcomes": {}, "files": []}
    totals: dict[str, int] = {}
    rows = 0
    names = set(dataset.schema.names)
    extra = [c for c in ("recaption", "recaption_cached", "best_caption_source") if c in names]
    recap = {"recaptioned": 0, "cached": 0, "ranked": 0, "won": 0} if "recaption" in names else None
    occupancy = [c for c in OCCUPANCY_COLUMNS if c in names]
    busy = dict.fromkeys(occupancy, 0.0)
    for rb in dataset.to_batches(columns=["status", "drop_stage", "drop_reason", *extra, *occupancy],
                                 batch_size=1 << 20):
        t = pa.Table.from_batches([rb])
        rows += t.num_rows
        for k, v in count_outcomes(t).items():
            totals[k] = totals.get(k, 0) + v
        if recap is not None:
            for k, v in recaption_counts(t).items():
                recap[k] += v
        for c in occupancy:
            busy[c] += float(pc.sum(t.column(c)).as_py() or 0.0)
    out = {"rows": rows, "outcomes": totals, "files": sorted(dataset.files)}
    if occupancy:
        out["download_busy"] = {"open_request_s": busy["download_open_request_s"],
                                "active_s": busy["download_active_s"]}
    if recap is not None:
        out["recaption"] = recap
    return out


def recaption_counts(t: pa.Table) -> dict[str, int]:
    """Recaptioned rows, from the cache, and how often the reward model ranked the recaption first."""
    has = pc.is_valid(t.column("recaption"))
    out = {"recaptioned": int(pc.sum(has).as_py() or 0),
           "cached": int(pc.sum(pc.and_(has, pc.fill_null(t.column("recaption_cached"), False))).as_py() or 0)
           if "recaption_cached" in t.column_names else 0}
    if "best_caption_source" in t.column_names:
        ranked = pc.and_(has, pc.is_valid(t.column("best_caption_source")))
        won = pc.and_(ranked, pc.fill_null(pc.starts_with(t.column("best_caption_source"), "recaption:"), False))
        out["ranked"] = int(pc.sum(ranked).as_py() or 0)
        out["won"] = int(pc.sum(won).as_py() or 0)
    return out
