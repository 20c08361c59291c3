"""Publish: the kept samples as a versioned, immutable snapshot (Parquet and WebDataset shards).

After phase 2 every sample's final status lives in its data file's sidecar
(``<output>/final/<basename>``, row-aligned; ``captions`` / ``caption_sources`` there, where not
null, replace the data file's: exact dedup merged a twin's alt-texts in). ``publish`` writes the
samples whose final status is ``kept`` to ``<output>/snapshots/v=NNNN/``:

- ``part-NNNNN.parquet``: exactly ``shard_rows`` rows each, the last one shorter (one empty shard
  when nothing is kept, so readers still get the schema);
- with ``webdataset: true``, ``shard-NNNNN.tar`` in the layout open_clip's ``--dataset-type
  webdataset`` reads (``wds.WebDataset(urls).decode().rename(image="jpg;png;jpeg;webp",
  text="txt")``, as in open_clip's ``training/data.py`` and img2dataset's webdataset writer):
  ``{key}.jpg`` (``.png`` / ``.webp`` when the bytes are), ``{key}.txt`` the training caption,
  ``{key}.json`` the row's metadata (every column but the image and the embeddings);
- ``_SNAPSHOT.json`` written last (``write_json_atomic``): version, created, parent, every file
  with its rows and bytes, counts, and the caller's ``manifest_extra``. A reader trusts a version
  only once its ``_SNAPSHOT.json`` exists.

**Order.** Data files sorted by path, and within a file the kept rows sorted by ``sample_id``;
global row ``r`` goes to shard ``r // shard_rows``. The same inputs give byte-identical shards.
The partitioning is the data files themselves, so no shuffle is needed: a first pass (Ray tasks
over groups of files) counts each file's kept rows, the driver turns the per-file counts (one
integer per file, never per sample) into per-shard lists of (file, first rank, last rank), and a
Ray task per shard reads only the row groups it needs and writes its shard.

**Versions.** ``NNNN`` is 1 + the highest *committed* version (a ``v=`` dir with
``_SNAPSHOT.json``), ``parent`` that version (null for the first). A ``v=`` dir without
``_SNAPSHOT.json`` is a publish that crashed before its commit; no reader trusts it. If it is the
dir the new version goes to, it is emptied and reused; uncommitted dirs above it are left alone
(the next publishes reuse them in turn). Committed versions are never written or removed. One
publisher at a time per output (the run holds the output's lock, operators/lock.py).

**The training caption** (``caption`` column and the ``.txt``), per row: the reward model's
``best_caption`` (Compress & Align, operators/reward.py) when the run has a reward column and the
row has one; else CLIP's best (``clip_best_caption``, an index into the data file's captions,
operators/clip.py); else the first non-blank caption; else empty. Both bests were chosen among the
sample's own captions, unless exact dedup's merge carried the merged captions' scores (each
copy's captions were scored on the same image bytes, operators/dedup/exact.py): then the best is
chosen among all the merged captions by those scores. A merge without scores realigns the row's
own ``clip_scores`` / ``reward_scores`` to the merged ``captions`` by caption text (null for the
merged-in ones) and re-indexes ``clip_best_caption``.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.base import KEPT, STATUS_COLUMNS
from operators.phase2 import CAPTION_SCORES, FINAL_DIR, FINAL_MARKER, MERGED_CAPTIONS
from operators.sinks import OCCUPANCY_COLUMNS, PARQUET_OPTIONS, THUMBNAIL
from operators.storage import StorageConfig, arrow_fs, fsspec_fs, join, qualify, take_rows, write_json_atomic

log = logging.getLogger(__name__)

SNAPSHOTS_DIR = "snapshots"
MANIFEST = "_SNAPSHOT.json"
VERSION_DIR = re.compile(r"^v=(\d{4,})$")
# Columns that mean nothing in a snapshot of kept rows: the status (all kept) and the download
# actor's per-chunk occupancy sums.
NOT_PUBLISHED = (*STATUS_COLUMNS, *OCCUPANCY_COLUMNS, THUMBNAIL)  # the thumbnail: a dropped row's, for the report
MERGED = MERGED_CAPTIONS
ALIGNED = CAPTION_SCORES  # one value per caption: realigned to merged captions
REWARD_BEST = "best_caption"  # operators/reward.py
CLIP_BEST = "clip_best_caption"  # operators/clip.py: index into captions
SAFE_KEY = re.compile(r"^[0-9A-Za-z_-]+$")  # webdataset splits a member name at its first dot
ROW_GROUP_ROWS = 1024  # row groups within a shard: readers can stream images without a whole shard
FILES_PER_COUNT_TASK = 16


class PublishConfig(BaseModel):
    """The published snapshot (``publish:`` in the job config)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="write a snapshot of the kept samples after phase 2")
    shard_rows: int = Field(10000, ge=1, description="rows per Parquet shard (the last shard may be shorter)")
    images: bool = Field(True, description="include the image bytes in the Parquet shards")
    webdataset: bool = Field(False, description="also write WebDataset tar shards (open_clip's training input)")
    webdataset_shard_rows: int | None = Field(None, ge=1, description="samples per tar shard; null: shard_rows")
    columns: list[str] | None = Field(None, description="data columns in the Parquet shards (sample_id and the "
                                                        "caption column always); null: all but the status columns")
    caption_column: str = Field("caption", min_length=1, description="the snapshot column holding the training "
                                                                     "caption (the WebDataset .txt)")

    @model_validator(mode="after")
    def _check(self) -> "PublishConfig":
        if self.columns is not None:
            if not self.images and "image" in self.columns:
                raise ValueError("publish.columns names 'image' but publish.images is false")
            bad = [c for c in self.columns if c in NOT_PUBLISHED]
            if bad:
                raise ValueError(f"publish.columns: {bad} are not published (every snapshot row is kept)")
        if self.caption_column in MERGED or self.caption_column == "sample_id":
            raise ValueError(f"publish.caption_column {self.caption_column!r} is a data column")
        return self

    @property
    def tar_rows(self) -> int:
        return self.webdataset_shard_rows or self.shard_rows


@dataclass(frozen=True)
class Source:
    """One data file and where its final status comes from (its sidecar, or itself)."""

    path: str
    sidecar: str | None


# --- versions -----------------------------------------------------------------------------------
def snapshot_dir(output_path: str, version: int) -> str:
    return join(output_path, SNAPSHOTS_DIR, f"v={version:04d}")


def list_versions(output_path: str, storage: StorageConfig | None = None) -> dict[int, bool]:
    """Every ``v=NNNN`` dir under ``<output>/snapshots``: version -> committed."""
    root = join(output_path, SNAPSHOTS_DIR)
    fs, p = fsspec_fs(root, storage)
    if not fs.exists(p):
        return {}
    out: dict[int, bool] = {}
    for entry in fs.ls(p, detail=True):
        m = VERSION_DIR.match(posixpath.basename(entry["name"].rstrip("/")))
        if m and entry["type"] == "directory":
            out[int(m.group(1))] = fs.exists(posixpath.join(entry["name"], MANIFEST))
    return out


def latest_committed(output_path: str, storage: StorageConfig | None = None) -> int | None:
    """The highest committed snapshot version, or None."""
    committed = [v for v, ok in list_versions(output_path, storage).items() if ok]
    return max(committed) if committed else None


def _prepare_version(output_path: str, storage: StorageConfig | None) -> tuple[int, int | None, bool]:
    """(the new version, its parent, whether a crashed publish's dir was emptied for it)."""
    parent = latest_committed(output_path, storage)
    version = 1 if parent is None else parent + 1
    fs, p = fsspec_fs(snapshot_dir(output_path, version), storage)
    reused = False
    if fs.exists(p):  # above the highest committed: uncommitted by definition
        if fs.exists(posixpath.join(p, MANIFEST)):
            raise RuntimeError(f"publish: {p} committed meanwhile (another publisher?)")
        log.warning("publish: %s is a publish that never committed; emptying it for v=%04d", p, version)
        fs.rm(p, recursive=True)
        reused = True
    return version, parent, reused


# --- sources ------------------------------------------------------------------------------------
def _sources(files: list[str], output_path: str, storage: StorageConfig | None,
             final: bool | None = None, sidecar_root: str | None = None) -> tuple[list[Source], str]:
    """The data files in publishing order with their sidecars, and where status comes from:
    ``final`` (phase 2 committed its sidecars) or ``data`` (no phase-2 step ran). ``final``: True
    requires the sidecars, False ignores them, None takes them when phase 2 committed them."""
    files = sorted(dict.fromkeys(qualify(files, output_path)))
    names = [posixpath.basename(f) for f in files]
    if len(set(names)) != len(names):
        raise ValueError("publish: two data files share a basename; their sidecars would collide")
    side_dir = join(sidecar_root or output_path, FINAL_DIR)
    fs, p = fsspec_fs(side_dir, storage)
    if final is False:
        return [Source(f, None) for f in files], "data"
    if fs.exists(posixpath.join(p, FINAL_MARKER)):
        return [Source(f, join(side_dir, n)) for f, n in zip(files, names)], "final"
    if final:
        raise RuntimeError(f"publish: no {join(side_dir, FINAL_MARKER)}: phase 2 did not commit its sidecars")
    if fs.exists(p) and any(not posixpath.basename(e).startswith("_") for e in fs.ls(p, detail=False)):
        raise RuntimeError(f"publish: {side_dir} has sidecars but no {FINAL_MARKER}: phase 2 did not finish")
    return [Source(f, None) for f in files], "data"


def _open_parquet(path: str, storage: StorageConfig | None) -> pq.ParquetFile:
    fs, p = arrow_fs(path, storage)
    return pq.ParquetFile(fs.open_input_file(p))


def _status_table(src: Source, storage: StorageConfig | None, columns: list[str]) -> pa.Table:
    """``sample_id``, ``status`` (+ merged captions, from a sidecar) of every row of a data file."""
    if src.sidecar is None:
        return _open_parquet(src.path, storage).read(columns=["sample_id", "status"])
    return _open_parquet(src.sidecar, storage).read(columns=["sample_id", "status", *columns])


def _count_files(sources: list[Source], storage: StorageConfig | None) -> list[dict]:
    """Per data file: rows, kept rows and its Arrow schema (serialized)."""
    out = []
    for src in sources:
        pf = _open_parquet(src.path, storage)
        status = _status_table(src, storage, [])
        if status.num_rows != pf.metadata.num_rows:
            raise RuntimeError(f"publish: sidecar {src.sidecar} has {status.num_rows} rows, "
                               f"{src.path} {pf.metadata.num_rows}")
        kept = int(pc.sum(pc.equal(status.column("status"), KEPT)).as_py() or 0)
        out.append({"rows": status.num_rows, "kept": kept, "schema": pf.schema_arrow.serialize().to_pybytes()})
    return out


# --- the rows of a shard ------------------------------------------------------------------------
def _kept_rows(src: Source, first: int, last: int, columns: list[str], storage: StorageConfig | None) -> pa.Table:
    """Kept rows of ranks ``[first, last)`` of one data file (kept rows sorted by sample_id), with
    ``columns`` (those the file has), the sidecar's merged captions beside them as ``_merged_*``."""
    if src.sidecar is not None:  # the per-caption scores a merge carried, where the sidecar has them
        side_names = set(_open_parquet(src.sidecar, storage).schema_arrow.names)
        merged_cols = [*MERGED, *(c for c in ALIGNED if c in side_names)]
    else:
        merged_cols = []
    status = _status_table(src, storage, merged_cols)
    kept = np.flatnonzero(pc.equal(status.column("status"), KEPT).to_numpy(zero_copy_only=False))
    ids = status.column("sample_id").take(pa.array(kept)).to_numpy(zero_copy_only=False)
    rows = kept[np.argsort(ids, kind="stable")[first:last]]
    pf = _open_parquet(src.path, storage)
    have = set(pf.schema_arrow.names)
    wanted = [c for c in dict.fromkeys(["sample_id", *columns]) if c in have]
    table = take_rows(pf, rows.tolist(), wanted)
    side = status.take(pa.array(rows, pa.int64()))
    if not table.column("sample_id").equals(side.column("sample_id")):
        raise RuntimeError(f"publish: sidecar {src.sidecar} is not row-aligned with {src.path}")
    for c in merged_cols:
        table = table.append_column(f"_merged_{c}", side.column(c))
    return table


def _realign(values: list | None, old: list | None, new: list) -> list | None:
    """Per-caption ``values`` (aligned with ``old`` captions) moved to the ``new`` captions by text."""
    if values is None or old is None or len(values) != len(old):
        return None
    at = {}
    for j, c in enumerate(old):
        at.setdefault(c, j)
    return [values[at[c]] if c in at else None for c in new]


def _argmax(values: list | None) -> int | None:
    """Index of the largest non-null value (the first of equals), None when there is none."""
    best = None
    for j, v in enumerate(values or []):
        if v is not None and (best is None or v > values[best]):
            best = j
    return best


def _first_caption(captions: list | None) -> str | None:
    for c in captions or []:
        if c is not None and c.strip():
            return c
    return None


def finish_rows(table: pa.Table, caption_column: str) -> pa.Table:
    """Merged captions applied (per-caption columns realigned), the training caption added.

    ``table``: data-file rows, with ``_merged_captions`` / ``_merged_caption_sources`` (the
    sidecar's, null where no merge) when the run has sidecars."""
    n = table.num_rows
    names = table.column_names
    col = {c: table.column(c).to_pylist() for c in ("captions", REWARD_BEST, CLIP_BEST, *ALIGNED) if c in names}
    old = col.get("captions", [None] * n)
    merged = table.column("_merged_captions").to_pylist() if "_merged_captions" in names else [None] * n
    merged_scores = {c: table.column(f"_merged_{c}").to_pylist() for c in ALIGNED if f"_merged_{c}" in names}
    best: list = [None] * n
    new_caps = list(old)
    for k in range(n):
        own = old[k] or []
        if col.get(REWARD_BEST, [None] * n)[k] is not None:
            best[k] = col[REWARD_BEST][k]
        elif CLIP_BEST in col and col[CLIP_BEST][k] is not None and 0 <= col[CLIP_BEST][k] < len(own) \
                and own[col[CLIP_BEST][k]] is not None:
            best[k] = own[col[CLIP_BEST][k]]
        if merged[k] is None:
            continue
        new_caps[k] = merged[k]
        for c in ALIGNED:
            if c in col:
                carried = merged_scores[c][k] if c in merged_scores else None
                col[c][k] = carried if carried is not None else _realign(col[c][k], own, merged[k])
        # A merge that carried its captions' scores (the same image bytes, so the same scores):
        # the best is chosen among all of them.
        if merged_scores.get("reward_scores") and _argmax(merged_scores["reward_scores"][k]) is not None:
            best[k] = merged[k][_argmax(merged_scores["reward_scores"][k])]
        if CLIP_BEST in col and merged_scores.get("clip_scores") and \
                _argmax(merged_scores["clip_scores"][k]) is not None:
            col[CLIP_BEST][k] = _argmax(merged_scores["clip_scores"][k])
            if REWARD_BEST not in col or best[k] is None:
                best[k] = merged[k][col[CLIP_BEST][k]]
        elif CLIP_BEST in col and col[CLIP_BEST][k] is not None:
            idx = col[CLIP_BEST][k]
            text = own[idx] if 0 <= idx < len(own) else None
            col[CLIP_BEST][k] = merged[k].index(text) if text in merged[k] else None
    for k in range(n):
        if best[k] is None:
            best[k] = _first_caption(new_caps[k]) or ""
    out = {}
    if "captions" in names:
        out["captions"] = pa.array(new_caps, table.schema.field("captions").type)
    if "_merged_caption_sources" in names and "caption_sources" in names:
        typ = table.schema.field("caption_sources").type
        out["caption_sources"] = pc.if_else(pc.is_valid(table.column("_merged_captions")),
                                            table.column("_merged_caption_sources").cast(typ),
                                            table.column("caption_sources"))
    for c in (CLIP_BEST, *ALIGNED):
        if c in col:
            out[c] = pa.array(col[c], table.schema.field(c).type)
    for c, arr in out.items():
        table = table.set_column(table.schema.get_field_index(c), c, arr)
    table = table.drop_columns([c for c in names if c.startswith("_merged_")])
    return table.append_column(caption_column, pa.array(best, pa.string()))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in order (missing ones null), cast to its types."""
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


# --- writers ------------------------------------------------------------------------------------
def image_extension(data: bytes) -> str:
    """The WebDataset extension for encoded image bytes (open_clip reads jpg, png, jpeg, webp)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def is_embedding(field: pa.Field) -> bool:
    return pa.types.is_fixed_size_list(field.type) or field.name.endswith("_embedding")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner and mtime: a rerun writes the same bytes
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_tar(table: pa.Table, fileobj, caption_column: str, first_index: int) -> dict:
    """One WebDataset shard of ``table``'s rows; returns its rows and images."""
    meta_cols = [f.name for f in table.schema if f.name != "image" and not is_embedding(f)
                 and not pa.types.is_binary(f.type) and not pa.types.is_large_binary(f.type)]
    meta = table.select(meta_cols).to_pylist()
    images = table.column("image").to_pylist() if "image" in table.column_names else [None] * table.num_rows
    written = 0
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for k, (row, img) in enumerate(zip(meta, images)):
            sid = row["sample_id"]
            key = sid if SAFE_KEY.match(sid or "") else f"i{first_index + k:012d}"
            if img is not None:
                _add_member(tar, f"{key}.{image_extension(img)}", img)
                written += 1
            _add_member(tar, f"{key}.txt", (row[caption_column] or "").encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps(row, sort_keys=True, default=str).encode("utf-8"))
    return {"rows": table.num_rows, "images": written}


def _write_shard(spec: dict, schema_bytes: bytes, read_columns: list[str], caption_column: str,
                 storage: StorageConfig | None) -> list[dict]:
    """Read a shard's rows from its segments and write its Parquet and/or tar files."""
    schema = pa.ipc.read_schema(pa.py_buffer(schema_bytes))
    parts = [finish_rows(_kept_rows(src, a, b, read_columns, storage), caption_column)
             for src, a, b in spec["segments"]]
    full = pa.concat_tables([conform(p, schema) for p in parts]) if parts else schema.empty_table()
    entries = []
    if spec.get("parquet"):
        name, path = spec["parquet"]
        fs, p = arrow_fs(path, storage)
        table = full.select(spec["parquet_columns"])
        opts = dict(PARQUET_OPTIONS)
        opts["use_dictionary"] = [c for c in opts["use_dictionary"] if c in table.column_names]
        opts["write_statistics"] = [c for c in opts["write_statistics"] if c in table.column_names]
        pq.write_table(table, p, filesystem=fs, row_group_size=ROW_GROUP_ROWS, **opts)
        entries.append({"path": name, "kind": "parquet", "rows": table.num_rows,
                        "bytes": int(fs.get_file_info(p).size)})
    if spec.get("webdataset"):
        name, path = spec["webdataset"]
        fs, p = fsspec_fs(path, storage)
        with fs.open(p, "wb") as f:
            done = write_tar(full, f, caption_column, spec["first"])
        entries.append({"path": name, "kind": "webdataset", "rows": done["rows"], "images": done["images"],
                        "bytes": int(fs.size(p))})
    return entries


# --- planning -----------------------------------------------------------------------------------
def shard_segments(kept: list[int], shard_rows: int) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """Cut the files' kept counts (in order) into shards of ``shard_rows``: per shard its first
    global row and its (file, first rank, last rank) segments. Empty input: one empty shard."""
    shards: list[tuple[int, list[tuple[int, int, int]]]] = []
    cur: list[tuple[int, int, int]] = []
    room, start, total = shard_rows, 0, 0
    for i, n in enumerate(kept):
        a = 0
        while a < n:
            take = min(room, n - a)
            cur.append((i, a, a + take))
            a += take
            room -= take
            total += take
            if room == 0:
                shards.append((start, cur))
                cur, room, start = [], shard_rows, total
    if cur or not shards:
        shards.append((start, cur))
    return shards


def _run_bounded(fn, args: list[tuple], max_in_flight: int) -> list:
    """``fn.remote(*a)`` for each ``a``, at most ``max_in_flight`` at a time; results in order."""
    import ray

    results: list = [None] * len(args)
    pending: dict = {}
    nxt = 0
    while nxt < len(args) or pending:
        while nxt < len(args) and len(pending) < max_in_flight:
            pending[fn.remote(*args[nxt])] = nxt
            nxt += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            results[pending.pop(ref)] = ray.get(ref)
    return results


def _output_schema(schemas: list[pa.Schema], cfg: PublishConfig) -> tuple[pa.Schema, list[str]]:
    """The snapshot's full row schema (for the tars too) and the Parquet shards' columns."""
    unique = list({s.serialize().to_pybytes(): s for s in schemas}.values())
    data = pa.unify_schemas(unique, promote_options="permissive") if unique else pa.schema([("sample_id", pa.string())])
    if cfg.caption_column in data.names:
        raise ValueError(f"publish.caption_column {cfg.caption_column!r} is already a data column; choose another")
    fields = [f for f in data if f.name not in NOT_PUBLISHED]
    names = [f.name for f in fields]
    if cfg.columns is not None:
        missing = [c for c in cfg.columns if c not in names]
        if missing:
            raise ValueError(f"publish.columns: {missing} are not in the data files (have {names})")
    full = pa.schema([*fields, pa.field(cfg.caption_column, pa.string())])
    if cfg.columns is None:
        parquet = [f.name for f in full if cfg.images or f.name != "image"]
    else:
        chosen = ["sample_id", *cfg.columns, *(["image"] if cfg.images and "image" in names else []),
                  cfg.caption_column]
        parquet = list(dict.fromkeys(chosen))
    return full, parquet


def _files_of(source) -> tuple[list[str], str | None, StorageConfig | None]:
    if hasattr(source, "files") and hasattr(source, "output_path"):  # a jobs.phase2.Phase2Context
        return list(source.files), source.output_path, getattr(source, "storage", None)
    return list(source), None, None


RESERVED_KEYS = ("version", "created", "parent", "path", "files", "counts", "columns", "schema", "order",
                 "status_from", "publish", "reused_uncommitted", "seconds")


def publish(source, output_path: str | None = None, storage: StorageConfig | None = None,
            config: PublishConfig | dict | None = None, manifest_extra: dict | None = None,
            final: bool | None = None, sidecar_root: str | None = None) -> dict:
    """Write the kept samples of ``source`` (a list of data files, or a phase-2 context) as the next
    snapshot version under ``<output_path>/snapshots/``; returns its ``_SNAPSHOT.json`` (``{}`` when
    ``config.enabled`` is false). ``output_path`` / ``storage`` default to the context's.

    ``final``: where each sample's status comes from. True: the phase-2 sidecars (``final/``, an
    error unless ``final/_FINAL.json`` exists); False: the data files (no phase-2 step ran; sidecars
    left by an earlier run are ignored); None: the sidecars if phase 2 committed them, else the data
    files (an error if ``final/`` holds sidecars without ``_FINAL.json``). ``sidecar_root``: where
    ``final/`` is, when not under ``output_path`` (a refresh's sidecars live in its own run dir)."""
    import ray

    cfg = config if isinstance(config, PublishConfig) else PublishConfig(**(config or {}))
    files, ctx_out, ctx_storage = _files_of(source)
    output_path = output_path or ctx_out
    storage = storage if storage is not None else ctx_storage
    if output_path is None:
        raise ValueError("publish: no output_path")
    extra = dict(manifest_extra or {})
    clash = [k for k in extra if k in RESERVED_KEYS]
    if clash:
        raise ValueError(f"publish: manifest_extra keys {clash} are the snapshot's own")
    if not cfg.enabled:
        return {}
    t0 = time.time()
    sources, status_from = _sources(files, output_path, storage, final, sidecar_root)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    count = ray.remote(num_cpus=1)(_count_files)
    groups = [sources[k:k + FILES_PER_COUNT_TASK] for k in range(0, len(sources), FILES_PER_COUNT_TASK)]
    per_file = [r for part in _run_bounded(count, [(g, storage) for g in groups], 2 * cpus) for r in part]
    schemas = [pa.ipc.read_schema(pa.py_buffer(r["schema"])) for r in per_file]
    full, parquet_columns = _output_schema(schemas, cfg)
    kept = [r["kept"] for r in per_file]
    # what the shards need: the Parquet columns, what the caption is made of, and for the tars
    # every column (their .json carries the metadata)
    needed = {*parquet_columns, *MERGED, REWARD_BEST, CLIP_BEST}
    read_columns = [f.name for f in full if f.name != cfg.caption_column and (cfg.webdataset or f.name in needed)]

    version, parent, reused = _prepare_version(output_path, storage)
    out_dir = snapshot_dir(output_path, version)
    fs, p = fsspec_fs(out_dir, storage)
    fs.makedirs(p, exist_ok=True)

    def plan(rows: int, kind: str) -> list[dict]:
        specs = []
        for k, (first, segs) in enumerate(shard_segments(kept, rows)):
            name = f"part-{k:05d}.parquet" if kind == "parquet" else f"shard-{k:05d}.tar"
            specs.append({"segments": [(sources[i], a, b) for i, a, b in segs], "first": first,
                          kind: (name, join(out_dir, name)),
                          "parquet_columns": parquet_columns})
        return specs

    specs = plan(cfg.shard_rows, "parquet")
    if cfg.webdataset:
        tars = plan(cfg.tar_rows, "webdataset")
        if cfg.tar_rows == cfg.shard_rows:  # one read of each shard's rows writes both files
            for s, t in zip(specs, tars):
                s["webdataset"] = t["webdataset"]
        else:
            specs += tars
    write = ray.remote(num_cpus=1)(_write_shard)
    schema_ref = ray.put(full.serialize().to_pybytes())
    entries = [e for part in _run_bounded(write, [(s, schema_ref, read_columns, cfg.caption_column, storage)
                                                  for s in specs], 2 * cpus) for e in part]
    entries.sort(key=lambda e: (e["kind"] != "parquet", e["path"]))
    tar_entries = [e for e in entries if e["kind"] == "webdataset"]
    manifest = {
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(),
        "parent": parent,
        "path": out_dir,
        "files": entries,
        "counts": {"data_files": len(sources), "samples": sum(r["rows"] for r in per_file), "kept": sum(kept),
                   "parquet_shards": len(entries) - len(tar_entries), "webdataset_shards": len(tar_entries),
                   **({"webdataset_images": sum(e["images"] for e in tar_entries)} if cfg.webdataset else {})},
        "columns": parquet_columns,
        "schema": {f.name: str(f.type) for f in full},
        "order": "data files sorted by path; within a file, kept rows sorted by sample_id",
        "status_from": status_from,
        "publish": cfg.model_dump(),
        "reused_uncommitted": reused,
        "seconds": round(time.time() - t0, 3),
        **extra,
    }
    write_json_atomic(join(out_dir, MANIFEST), manifest, storage)
    log.info("publish: v=%04d, %d kept samples in %d shards", version, sum(kept), len(entries))
    return manifest
