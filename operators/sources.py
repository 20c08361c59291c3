"""Ingest (phase 0, "plan"): URL lists in, merged sample shards out, partitioned by hash prefix.

Inputs are Parquet, CSV, TSV or JSONL files (optionally gzipped), local or ``s3://``, given
as paths or globs. Every input row is normalized (URL, captions, extra columns) and routed
to the bucket of its ``sample_id`` (``scatter``); each bucket is then merged on its own
(``merge_bucket``): rows sharing a normalized URL become one sample whose ``captions`` keep
every caption and ``caption_sources`` say where each came from. No step holds the whole run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import re
import unicodedata
from typing import Iterator, Literal
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.base import FAILED, KEPT, DropReason
from operators.commoncrawl import WatConfig, expand_cc_index, is_cc_index, is_wat, iter_wat
from operators.storage import StorageConfig, fsspec_fs, join

log = logging.getLogger(__name__)

InputFormat = Literal["auto", "parquet", "csv", "tsv", "jsonl", "wat", "cc-index"]
BAD_LINE = "__bad_line__"  # iter_rows' column for a JSONL line that is not a JSON object
SAMPLE_ID_HEX = 32  # 128-bit blake2b of the normalized URL
RESERVED_COLUMNS = ("sample_id", "url", "url_original", "captions", "caption_sources", "n_input_rows",
                    "input_file", "input_row", "status", "drop_stage", "drop_reason", "error_message")
# The columns every sample shard has (the plan writes them; extra input columns come beside them).
PLAN_COLUMNS = RESERVED_COLUMNS
# Why the plan fails an input row (drop_stage ``plan``).
PLAN_REASONS = (
    DropReason("missing_url", FAILED, "the row has no URL (empty, null, or no url column)"),
    DropReason("unsupported_scheme", FAILED, "the URL is not http(s)"),
    DropReason("invalid_url", FAILED, "the URL cannot be parsed or has no host"),
    DropReason("url_too_long", FAILED, "the URL is longer than input.max_url_length"),
    DropReason("bad_line", FAILED, "a JSONL line that is not a JSON object"),
)


class SourceConfig(BaseModel):
    """Where the URL lists are and how to read them (``input:`` in the job config)."""

    model_config = ConfigDict(extra="forbid")

    paths: list[str] = Field(..., min_length=1, description="files or globs, local or s3://")
    format: InputFormat = Field("auto", description="auto: by file extension (.gz allowed; .warc.wat.gz: wat, "
                                                      "wat.paths.gz: cc-index); wat: Common Crawl WAT files; "
                                                      "cc-index: lists of WAT paths")
    url_column: str = Field("url", description="column with the image URL")
    caption_columns: list[str] = Field(default_factory=lambda: ["caption"],
                                       description="columns holding captions (alt-text, title, ...)")
    extra_columns: list[str] | Literal["all"] = Field("all", description="columns carried through, or 'all'")
    max_url_length: int = Field(2048, ge=16, description="longer URLs fail as url_too_long")
    max_caption_chars: int = Field(4096, ge=1, description="longer captions are cut")
    read_batch_rows: int = Field(65536, ge=1, description="rows read from an input file at a time")
    wat: WatConfig = Field(WatConfig(), description="Common Crawl WAT parsing (operators/commoncrawl.py)")

    @field_validator("paths")
    @classmethod
    def _non_empty(cls, v):
        if any(not p.strip() for p in v):
            raise ValueError(f"empty input path in {v}")
        return v


# --- URLs and ids -------------------------------------------------------------------
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_url(raw, max_length: int = 2048) -> tuple[str | None, str | None]:
    """``(normalized_url, None)`` or ``(None, reason)``.

    Lower-cases scheme and host, IDNA-encodes the host, drops default ports and the
    fragment; path and query are kept as given (servers may treat them case-sensitively).
    """
    if raw is None:
        return None, "missing_url"
    if not isinstance(raw, str):
        raw = str(raw)
    url = raw.strip()
    if not url:
        return None, "missing_url"
    if any(ord(ch) < 32 for ch in url):
        return None, "invalid_url"
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            return None, "unsupported_scheme"
        host = parts.hostname
        if not host:
            return None, "invalid_url"
        port = parts.port  # raises ValueError when not a number / out of range
        if any(ch.isspace() for ch in host):
            return None, "invalid_url"
        try:
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError:
            return None, "invalid_url"
        netloc = f"[{host}]" if ":" in host else host
        if port is not None and port != _DEFAULT_PORTS[scheme]:
            netloc += f":{port}"
        userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
        if userinfo:
            netloc = f"{userinfo}@{netloc}"
        out = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    except ValueError:
        return None, "invalid_url"
    if len(out) > max_length:
        return None, "url_too_long"
    return out, None


def sample_id_of(normalized_url: str) -> str:
    return hashlib.blake2b(normalized_url.encode("utf-8"), digest_size=SAMPLE_ID_HEX // 2).hexdigest()


def invalid_sample_id(input_file: str, input_row: int) -> str:
    """Rows without a usable URL do not merge: their id comes from where they were read."""
    key = f"invalid\0{input_file}\0{input_row}"
    return hashlib.blake2b(key.encode("utf-8"), digest_size=SAMPLE_ID_HEX // 2).hexdigest()


def bucket_of(sample_id: str, num_buckets: int) -> int:
    """The hash-prefix bucket of a sample; plan, refresh and dedup agree on it."""
    return int(sample_id[:8], 16) % num_buckets


_WS = re.compile(r"\s+")


def clean_caption(value, max_chars: int) -> str | None:
    """Caption text with control characters removed and whitespace collapsed, or None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        value = str(value)
    value = unicodedata.normalize("NFC", value)
    value = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in value)
    value = _WS.sub(" ", value).strip()
    if not value:
        return None
    return value[:max_chars].rstrip()  # a cut may end on a collapsed blank


# --- reading inputs -----------------------------------------------------------------
def expand_paths(cfg: SourceConfig, storage: StorageConfig | None) -> list[str]:
    """Concrete input files (globs expanded), in a stable order; errors name the pattern."""
    files: list[str] = []
    for pattern in cfg.paths:
        fs, p = fsspec_fs(pattern, storage)
        proto = pattern.split("://", 1)[0] + "://" if "://" in pattern and not pattern.startswith("file://") else ""
        if any(ch in p for ch in "*?["):
            found = sorted(fs.glob(p))
        elif fs.isdir(p):
            # Skip _SUCCESS, .crc and whole _temporary/ or .cache/ trees (any part of the relative path).
            found = sorted(f for f in fs.find(p)
                           if not any(part.startswith(("_", ".")) for part in posixpath.relpath(f, p).split("/")))
        elif fs.exists(p):
            found = [p]
        else:
            raise FileNotFoundError(f"input path not found: {pattern}")
        if not found:
            raise FileNotFoundError(f"input pattern matched no files: {pattern}")
        for f in found:
            if cfg.format == "cc-index" or (cfg.format == "auto" and is_cc_index(f)):
                files.extend(expand_cc_index(proto + f, cfg.wat, storage))  # a snapshot's WAT files
            else:
                files.append(proto + f)
    return files


def detect_format(path: str, fmt: InputFormat) -> str:
    if fmt == "cc-index":  # expand_paths turned the lists into their WAT files
        return "wat"
    if fmt != "auto":
        return fmt
    if is_wat(path):
        return "wat"
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext, kind in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"),
                      (".json", "jsonl"), (".ndjson", "jsonl")):
        if name.endswith(ext):
            return kind
    raise ValueError(f"cannot tell the format of {path!r}: set input.format")


def _to_text(v):
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def iter_rows(path: str, cfg: SourceConfig, storage: StorageConfig | None,
              stats: dict | None = None) -> Iterator[pa.Table]:
    """Stream one input file as tables of raw rows (all the file's columns). ``stats``: a WAT
    file's record counts (operators/commoncrawl.py) go there."""
    fmt = detect_format(path, cfg.format)
    if fmt == "wat":
        caption = cfg.caption_columns[0] if cfg.caption_columns else "caption"
        yield from iter_wat(path, cfg.wat, storage, cfg.url_column, caption, stats)
        return
    fs, p = fsspec_fs(path, storage)
    if fmt == "parquet":
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size=cfg.read_batch_rows):
                yield pa.Table.from_batches([rb])
        return
    compression = "gzip" if p.lower().endswith(".gz") else None
    with fs.open(p, "rb", compression=compression) as raw:
        # utf-8-sig: spreadsheet exports start with a BOM, which would hide the first column name.
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        if fmt in ("csv", "tsv"):
            csv.field_size_limit(1 << 24)
            reader = csv.reader(text, delimiter="," if fmt == "csv" else "\t")
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            buf: list[list] = []
            for rec in reader:
                if len(rec) < len(header):
                    rec = rec + [None] * (len(header) - len(rec))
                buf.append(rec[: len(header)])
                if len(buf) >= cfg.read_batch_rows:
                    yield pa.table({h: pa.array([r[j] for r in buf], pa.string()) for j, h in enumerate(header)})
                    buf = []
            if buf:
                yield pa.table({h: pa.array([r[j] for r in buf], pa.string()) for j, h in enumerate(header)})
            return
        rows: list[dict] = []
        keys: dict[str, None] = {}
        for line in text:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError:
                obj = {BAD_LINE: line[:500]}
            keys.update(dict.fromkeys(obj))
            rows.append(obj)
            if len(rows) >= cfg.read_batch_rows:
                yield pa.table({k: pa.array([_to_text(r.get(k)) for r in rows], pa.string()) for k in keys})
                rows, keys = [], {}
        if rows:
            yield pa.table({k: pa.array([_to_text(r.get(k)) for r in rows], pa.string()) for k in keys})


def normalize_rows(table: pa.Table, cfg: SourceConfig, input_file: str, first_row: int) -> pa.Table:
    """Raw rows -> one row per input row with id, URL verdict, captions and extras."""
    n = table.num_rows
    urls = table.column(cfg.url_column).to_pylist() if cfg.url_column in table.column_names else [None] * n
    # JSONL lines that are not a JSON object (see iter_rows): recorded with their text, not as missing URLs.
    bad = table.column(BAD_LINE).to_pylist() if BAD_LINE in table.column_names else [None] * n
    ids, norm, status, reason, msg = [], [], [], [], []
    for i, raw in enumerate(urls):
        u, why = normalize_url(raw, cfg.max_url_length) if bad[i] is None else (None, "bad_line")
        if u is None:
            ids.append(invalid_sample_id(input_file, first_row + i))
            norm.append(None)
            status.append(FAILED)
            reason.append(why)
            shown = raw if isinstance(raw, str) else repr(raw)
            if bad[i] is not None:
                msg.append(f"input line is not a JSON object: {bad[i][:200]!r}")
            elif cfg.url_column in table.column_names:
                msg.append(f"unusable URL: {shown[:200]!r}")
            else:
                msg.append(f"input has no column {cfg.url_column!r}")
        else:
            ids.append(sample_id_of(u))
            norm.append(u)
            status.append(KEPT)
            reason.append(None)
            msg.append(None)
    caps: list[list[str]] = [[] for _ in range(n)]
    srcs: list[list[str]] = [[] for _ in range(n)]
    for col in cfg.caption_columns:
        if col not in table.column_names:
            continue
        for i, v in enumerate(table.column(col).to_pylist()):
            c = clean_caption(v, cfg.max_caption_chars)
            if c is not None:
                caps[i].append(c)
                srcs[i].append(col)
    out = {
        "sample_id": pa.array(ids, pa.string()),
        "url": pa.array(norm, pa.string()),
        "url_original": pa.array([_to_text(u)[:cfg.max_url_length * 2] if u is not None else None for u in urls],
                                 pa.string()),
        "captions": pa.array(caps, pa.list_(pa.string())),
        "caption_sources": pa.array(srcs, pa.list_(pa.string())),
        "input_file": pa.array([input_file] * n, pa.string()),
        "input_row": pa.array(range(first_row, first_row + n), pa.int64()),
        "status": pa.array(status, pa.string()),
        "drop_reason": pa.array(reason, pa.string()),
        "error_message": pa.array(msg, pa.string()),
    }
    skip = {cfg.url_column, *cfg.caption_columns, BAD_LINE}
    extras = [c for c in table.column_names if c not in skip] if cfg.extra_columns == "all" else [
        c for c in cfg.extra_columns if c in table.column_names]
    for c in extras:
        name = c if c not in RESERVED_COLUMNS else f"extra_{c}"
        col = table.column(c)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        out[name] = col
    return pa.table(out)


def unify_extra_schema(schemas: list[pa.Schema], keep_null: bool = False) -> pa.Schema:
    """One schema for the extra columns of all files; conflicting types become strings.

    A column that is null-typed everywhere becomes a string column, unless ``keep_null``
    (a per-file schema: another file may still give the column its real type).
    """
    fields: dict[str, pa.DataType] = {}
    for schema in schemas:
        for f in schema:
            if f.name in RESERVED_COLUMNS:
                continue
            prev = fields.get(f.name)
            if prev is None or prev == f.type or pa.types.is_null(f.type):
                fields.setdefault(f.name, f.type)
                if prev is not None and pa.types.is_null(prev):
                    fields[f.name] = f.type
            elif pa.types.is_null(prev):
                fields[f.name] = f.type
            else:
                fields[f.name] = pa.string()
    return pa.schema([pa.field(k, v if keep_null or not pa.types.is_null(v) else pa.string())
                      for k, v in fields.items()])


def conform(table: pa.Table, extra_schema: pa.Schema) -> pa.Table:
    """Cast/add extra columns so every shard has the same schema."""
    for f in extra_schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
        elif table.schema.field(f.name).type != f.type:
            col = table.column(f.name)
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                col = pa.array([_to_text(v) for v in col.to_pylist()], pa.string()).cast(f.type)
            table = table.set_column(table.schema.get_field_index(f.name), f.name, col)
    return table


# --- scatter and merge (run as Ray tasks by jobs/plan.py; plain functions, testable alone) --
def scatter_file(file_index: int, path: str, cfg: SourceConfig, storage: StorageConfig | None, scatter_dir: str,
                 num_buckets: int, flush_rows: int = 200_000) -> dict:
    """Read one input file and write its rows into per-bucket Parquet parts. Returns stats."""
    buffers: dict[int, list[pa.Table]] = {}
    buffered = 0
    part = 0
    rows = 0
    schemas: list[pa.Schema] = []
    fs, base = fsspec_fs(scatter_dir, storage)

    def flush():
        nonlocal buffers, buffered, part
        for b, tables in buffers.items():
            t = pa.concat_tables(tables, promote_options="permissive")
            d = posixpath.join(base, f"bucket={b:05d}")
            fs.makedirs(d, exist_ok=True)
            with fs.open(posixpath.join(d, f"file{file_index:06d}-part{part:04d}.parquet"), "wb") as f:
                pq.write_table(t, f)
        buffers, buffered = {}, 0
        part += 1

    records: dict = {}
    for table in iter_rows(path, cfg, storage, records):
        norm = normalize_rows(table, cfg, path, rows)
        rows += table.num_rows
        schemas.append(norm.schema)
        buckets = pa.array([bucket_of(s, num_buckets) for s in norm.column("sample_id").to_pylist()], pa.int32())
        for b in pc.unique(buckets).to_pylist():
            sub = norm.filter(pc.equal(buckets, b))
            buffers.setdefault(b, []).append(sub)
        buffered += norm.num_rows
        if buffered >= flush_rows:
            flush()
    if buffered:
        flush()
    extra = unify_extra_schema(schemas, keep_null=True) if schemas else pa.schema([])
    out = {"file": path, "rows": rows, "extra_schema": extra.serialize().to_pybytes()}
    if records:
        out["records"] = records
    return out


def merge_bucket(bucket: int, scatter_dir: str, out_dir: str, extra_schema: pa.Schema,
                 storage: StorageConfig | None, shard_rows: int = 4096) -> dict:
    """Merge one bucket's rows by sample_id into samples, written as shards of <= shard_rows.

    Small shards bound the work (and memory) of one phase-1 task, as img2dataset's
    10,000-sample shards do.
    """
    fs, base = fsspec_fs(scatter_dir, storage)
    d = posixpath.join(base, f"bucket={bucket:05d}")
    parts = sorted(fs.find(d)) if fs.exists(d) else []
    tables = []
    for p in parts:
        with fs.open(p, "rb") as f:
            tables.append(conform(pq.read_table(f), extra_schema))
    if tables:
        t = pa.concat_tables(tables, promote_options="permissive")
    else:
        t = conform(_empty_rows(), extra_schema)
    samples = merge_rows(t, extra_schema)
    ofs, op = fsspec_fs(out_dir, storage)
    if ofs.exists(op):  # a retried task starts its bucket over
        ofs.rm(op, recursive=True)
    ofs.makedirs(op, exist_ok=True)
    proto = out_dir.split("://", 1)[0] + "://" if "://" in out_dir else ""
    files = []
    for k, start in enumerate(range(0, samples.num_rows, shard_rows)):
        path = posixpath.join(op, f"part-{k:05d}.parquet")
        with ofs.open(path, "wb") as f:
            pq.write_table(samples.slice(start, shard_rows), f)
        files.append(proto + path)
    return {"bucket": bucket, "rows": t.num_rows, "samples": samples.num_rows, "files": files,
            "invalid": int(pc.sum(pc.equal(samples.column("status"), FAILED)).as_py() or 0)}


def _empty_rows() -> pa.Table:
    return pa.table({
        "sample_id": pa.array([], pa.string()), "url": pa.array([], pa.string()),
        "url_original": pa.array([], pa.string()),
        "captions": pa.array([], pa.list_(pa.string())), "caption_sources": pa.array([], pa.list_(pa.string())),
        "input_file": pa.array([], pa.string()), "input_row": pa.array([], pa.int64()),
        "status": pa.array([], pa.string()), "drop_reason": pa.array([], pa.string()),
        "error_message": pa.array([], pa.string()),
    })


def merge_rows(rows: pa.Table, extra_schema: pa.Schema) -> pa.Table:
    """Rows of one bucket -> samples: one per sample_id, captions concatenated in input order.

    The first occurrence (by input file, then row) gives the URL and the extra columns.
    Identical (caption, source) pairs are kept once.
    """
    if rows.num_rows:
        rows = rows.sort_by([("sample_id", "ascending"), ("input_file", "ascending"), ("input_row", "ascending")])
    ids = rows.column("sample_id").to_pylist()
    caps = rows.column("captions").to_pylist()
    srcs = rows.column("caption_sources").to_pylist()
    first_idx: list[int] = []
    out_caps: list[list[str]] = []
    out_srcs: list[list[str]] = []
    counts: list[int] = []
    prev = None
    for i, sid in enumerate(ids):
        if sid != prev:
            first_idx.append(i)
            out_caps.append([])
            out_srcs.append([])
            counts.append(0)
            seen: set[tuple[str, str]] = set()
            prev = sid
        counts[-1] += 1
        for c, s in zip(caps[i] or [], srcs[i] or []):
            if (c, s) not in seen:
                seen.add((c, s))
                out_caps[-1].append(c)
                out_srcs[-1].append(s)
    firsts = rows.take(pa.array(first_idx, pa.int64())) if first_idx else rows
    cols = {
        "sample_id": firsts.column("sample_id"),
        "url": firsts.column("url"),
        "url_original": firsts.column("url_original"),
        "captions": pa.array(out_caps, pa.list_(pa.string())),
        "caption_sources": pa.array(out_srcs, pa.list_(pa.string())),
        "n_input_rows": pa.array(counts, pa.int32()),
        "input_file": firsts.column("input_file"),
        "input_row": firsts.column("input_row"),
        "status": firsts.column("status"),
        "drop_stage": pa.array([("plan" if s != KEPT else None) for s in firsts.column("status").to_pylist()],
                               pa.string()),
        "drop_reason": firsts.column("drop_reason"),
        "error_message": firsts.column("error_message"),
    }
    for f in extra_schema:
        cols[f.name] = firsts.column(f.name)
    return pa.table(cols)


def bucket_dir(samples_dir: str, bucket: int) -> str:
    return join(samples_dir, f"bucket={bucket:05d}")
