"""One bounded pass over a run's output for the report: histograms, seeded samples, embeddings.

Every data file is read once, and only its small columns (status, reasons, URL, captions, the
score columns); a file's sidecar (``final/``) gives each row its final status after phase 2.
What comes back from a file is bounded whatever its size:

- **histograms** of every score column, split into finally kept and dropped rows, over the
  order-preserving high 16 bits of the float32 (``operators.selection.high_histogram``: about
  three significant digits, mergeable by addition, no range to know in advance);
- **samples per outcome** (``kept`` or ``status/stage/reason``, as the manifest counts them): each
  row has a seeded rank (a keyed hash of its ``sample_id``) and a group's sample is the ``k`` rows
  of smallest rank over the whole run, so it is a uniform random sample that does not depend on
  how the run was split into files. A file only proposes rows whose rank is below ``4 k / N``
  (``N``: the group's size in the manifest), so a run of billions sends back a few rows per group;
- a **sample of image embeddings** for the explorer, chosen the same way (the column is read only
  from files that hold a candidate).

Thumbnails are made afterwards for the rows shown only (``thumbnails``): the ``image`` column of a
kept row, or the small ``thumbnail`` the sink keeps for a seeded few rows dropped after decoding
(operators/sinks.py), read one row group at a time from the files that hold them.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.base import KEPT, outcome_key
from operators.phase2 import DUPLICATE_OF
from operators.selection import BINS, high_histogram, keys_to_floats
from operators.storage import StorageConfig, arrow_fs, join, take_rows

log = logging.getLogger(__name__)

THUMBNAIL = "thumbnail"  # the sink's small JPEG of a dropped row (operators/sinks.py)
EMBEDDING = "clip_image_embedding"
# Float columns that are not scores: the download actor's bookkeeping.
NOT_SCORES = ("download_",)
OVERSAMPLE = 4.0  # a file proposes rows with rank < OVERSAMPLE * k / N
CAPTION_CHARS = 240


def sample_ranks(sample_ids: list[str], seed: int) -> np.ndarray:
    """A seeded uint64 rank per sample: a keyed blake2b of its id. The same id has the same rank in
    every file and every run with that seed, so the smallest ranks are one uniform sample."""
    key = seed.to_bytes(8, "little", signed=True)
    return np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8, key=key).digest(), "little")
                     for s in sample_ids], dtype=np.uint64)


def rank_threshold(k: int, n: int) -> int:
    """The rank below which a file proposes rows of a group of ``n`` rows showing ``k``: about
    ``OVERSAMPLE * k`` of them over the run, so the run's ``k`` smallest are among them."""
    if n <= 0 or k <= 0:
        return 0
    frac = min(1.0, OVERSAMPLE * k / n)
    return (1 << 64) - 1 if frac >= 1.0 else int(frac * float(1 << 64))


def score_columns(schema: pa.Schema) -> list[str]:
    """Scalar float columns of the data files that are scores (clip_score, punsafe, reward, ...)."""
    return [f.name for f in schema if pa.types.is_floating(f.type) and not f.name.startswith(NOT_SCORES)]


@dataclass
class ScanSpec:
    """What a file scan keeps. ``groups``: outcome key -> (k, rank threshold); rows of other keys
    (not in the manifest) are proposed with the default ``(default_k, no threshold)``."""

    score_columns: list[str]
    groups: dict[str, tuple[int, int]]
    default_k: int
    embedding_k: int
    embedding_threshold: int
    seed: int
    sidecar_dir: str | None = None
    storage: StorageConfig | None = None


@dataclass
class Summary:
    """A scan's result (one file, or many merged). Bounded: histograms and at most k rows per group."""

    rows: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    hist: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # column -> kept/dropped -> counts
    groups: dict[str, list[dict]] = field(default_factory=dict)
    embeddings: list[dict] = field(default_factory=list)

    def merge(self, other: "Summary", spec: ScanSpec) -> "Summary":
        self.rows += other.rows
        for k, v in other.outcomes.items():
            self.outcomes[k] = self.outcomes.get(k, 0) + v
        for col, parts in other.hist.items():
            mine = self.hist.setdefault(col, {})
            for part, counts in parts.items():
                mine[part] = mine[part] + counts if part in mine else counts.copy()
        for key, rows in other.groups.items():
            k = spec.groups.get(key, (spec.default_k, 0))[0]
            self.groups[key] = _smallest(self.groups.get(key, []) + rows, k)
        self.embeddings = _smallest(self.embeddings + other.embeddings, spec.embedding_k)
        return self


def _smallest(rows: list[dict], k: int) -> list[dict]:
    return sorted(rows, key=lambda r: r["rank"])[:k]


def _open(path: str, storage: StorageConfig | None) -> pq.ParquetFile:
    fs, p = arrow_fs(path, storage)
    return pq.ParquetFile(fs.open_input_file(p))


def sidecar_of(data_file: str, sidecar_dir: str) -> str:
    return join(sidecar_dir, posixpath.basename(data_file))


def scan_file(index: int, path: str, spec: ScanSpec) -> Summary:
    """The summary of one data file (and its sidecar): see the module docstring."""
    pf = _open(path, spec.storage)
    names = set(pf.schema_arrow.names)
    small = [c for c in ("sample_id", "status", "drop_stage", "drop_reason", "error_message", "url", "captions",
                         "caption_sources", THUMBNAIL) if c in names]
    scores = [c for c in spec.score_columns if c in names]
    # The thumbnail column is read for its validity only; it is small and null on most rows.
    data = pf.read(columns=small + scores)
    n = data.num_rows
    phase1_kept = pc.equal(data.column("status"), KEPT)
    if spec.sidecar_dir is not None:
        side = _open(sidecar_of(path, spec.sidecar_dir), spec.storage).read()
        if side.num_rows != n or not side.column("sample_id").equals(data.column("sample_id")):
            raise RuntimeError(f"report: the sidecar of {path} is not row-aligned with it")
        final = {c: side.column(c) for c in ("status", "drop_stage", "drop_reason", "error_message")}
        merged = {c: pc.if_else(pc.is_valid(side.column(c)), side.column(c), data.column(c))
                  for c in ("captions", "caption_sources") if c in side.column_names and c in names}
        duplicate_of = side.column(DUPLICATE_OF) if DUPLICATE_OF in side.column_names else pa.nulls(n, pa.string())
    else:
        final = {c: data.column(c) for c in ("status", "drop_stage", "drop_reason", "error_message")}
        merged, duplicate_of = {}, pa.nulls(n, pa.string())
    out = Summary(rows=n)
    status = final["status"].to_pylist()
    stages, reasons = final["drop_stage"].to_pylist(), final["drop_reason"].to_pylist()
    keys = [outcome_key(s, st, r) for s, st, r in zip(status, stages, reasons)]
    for key in keys:
        out.outcomes[key] = out.outcomes.get(key, 0) + 1
    kept = np.array([s == KEPT for s in status], dtype=bool)
    for col in scores:
        vals = data.column(col)
        valid = pc.is_valid(vals).to_numpy(zero_copy_only=False)
        v = pc.fill_null(vals, 0.0).to_numpy(zero_copy_only=False).astype(np.float32)
        valid &= np.isfinite(v)
        out.hist[col] = {"kept": high_histogram(v[valid & kept]), "dropped": high_histogram(v[valid & ~kept])}
    ranks = sample_ranks(data.column("sample_id").to_pylist(), spec.seed)
    image_source = _image_sources(data, phase1_kept)
    candidates: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        k, threshold = spec.groups.get(key, (spec.default_k, (1 << 64) - 1))
        if k > 0 and ranks[i] <= threshold:
            candidates.setdefault(key, []).append(i)
    columns = {"url": data.column("url") if "url" in names else pa.nulls(n, pa.string()),
               "captions": merged.get("captions", data.column("captions") if "captions" in names else None),
               "caption_sources": merged.get("caption_sources",
                                             data.column("caption_sources") if "caption_sources" in names else None)}

    def row(i: int) -> dict:
        caps = columns["captions"][i].as_py() if columns["captions"] is not None else None
        srcs = columns["caption_sources"][i].as_py() if columns["caption_sources"] is not None else None
        return {"rank": int(ranks[i]), "file": index, "row": i, "sample_id": data.column("sample_id")[i].as_py(),
                "url": columns["url"][i].as_py(), "status": status[i], "stage": stages[i], "reason": reasons[i],
                "message": final["error_message"][i].as_py(), "duplicate_of": duplicate_of[i].as_py(),
                "captions": [c[:CAPTION_CHARS] for c in (caps or []) if c is not None][:8],
                "caption_sources": (srcs or [])[:8],
                "scores": {c: _finite(data.column(c)[i].as_py()) for c in scores},
                "image": image_source[i]}

    for key, idx in candidates.items():
        k = spec.groups.get(key, (spec.default_k, 0))[0]
        out.groups[key] = _smallest([row(i) for i in idx], k)
    if spec.embedding_k > 0 and EMBEDDING in names:
        picked = np.flatnonzero(ranks <= np.uint64(spec.embedding_threshold))
        if picked.size:
            emb = pf.read(columns=[EMBEDDING]).column(EMBEDDING).take(pa.array(picked, pa.int64()))
            rows = []
            for j, i in enumerate(picked.tolist()):
                vec = emb[j].as_py()
                if vec is None:
                    continue
                r = row(i)
                r["embedding"] = np.asarray(vec, dtype=np.float32)
                rows.append(r)
            out.embeddings = _smallest(rows, spec.embedding_k)
    return out


def _finite(x):
    return x if isinstance(x, (int, float)) and np.isfinite(x) else None


def _image_sources(data: pa.Table, phase1_kept: pa.ChunkedArray) -> list[str | None]:
    """Where a row's picture is: ``image`` (kept by phase 1: the sink keeps its bytes), ``thumbnail``
    (dropped after decoding and picked by the sink), or None."""
    kept = phase1_kept.to_numpy(zero_copy_only=False)
    thumb = (pc.is_valid(data.column(THUMBNAIL)).to_numpy(zero_copy_only=False) if THUMBNAIL in data.column_names
             else np.zeros(len(kept), dtype=bool))
    return ["image" if k else (THUMBNAIL if t else None) for k, t in zip(kept.tolist(), thumb.tolist())]


def _scan_many(items: list[tuple[int, str]], spec: ScanSpec) -> Summary:
    total = Summary()
    for i, path in items:
        total.merge(scan_file(i, path, spec), spec)
    return total


def scan(files: list[str], spec: ScanSpec, use_ray: bool | None = None, chunks: int | None = None) -> Summary:
    """Every data file scanned and merged: in Ray tasks when Ray is up (``use_ray`` None), else in
    a few threads of this process."""
    import ray

    items = list(enumerate(files))
    if use_ray is None:
        use_ray = ray.is_initialized()
    if chunks is None:
        cpus = int(ray.cluster_resources().get("CPU", 2)) if use_ray else 2
        # at most 256 summaries reach the driver (each holds its histograms: ~1 MB per score column)
        chunks = max(1, min(len(items), 4 * max(cpus, 1), 256))
    parts = [items[i::chunks] for i in range(chunks)] if items else []
    total = Summary()
    if use_ray:
        task = ray.remote(num_cpus=1)(_scan_many)
        refs = [task.remote(p, spec) for p in parts]
        while refs:  # merged as they arrive: the driver holds one summary at a time beside the total
            done, refs = ray.wait(refs, num_returns=1)
            total.merge(ray.get(done[0]), spec)
    else:
        with ThreadPoolExecutor(max_workers=min(4, max(1, len(parts)))) as pool:
            for s in pool.map(lambda p: _scan_many(p, spec), parts):
                total.merge(s, spec)
    return total


# --- histograms for display ------------------------------------------------------------------------
def bin_values() -> np.ndarray:
    """The float value at the bottom of each of the 65,536 high-16-bit bins (order-preserving keys)."""
    keys = (np.arange(BINS, dtype=np.uint64) << np.uint64(16)).astype(np.uint32)
    with np.errstate(invalid="ignore"):  # the NaN bins
        return keys_to_floats(keys).astype(np.float64)


def display_histogram(parts: dict[str, np.ndarray], bins: int = 60) -> dict | None:
    """Fine bins -> ``bins`` equal-width bins over the observed range, per part (kept/dropped)."""
    total = sum(parts.values())
    nz = np.flatnonzero(total)
    if nz.size == 0:
        return None
    values = bin_values()
    finite = np.isfinite(values[nz])
    nz = nz[finite]
    if nz.size == 0:
        return None
    lo, hi = float(values[nz].min()), float(values[nz].max())
    if hi <= lo:
        hi = lo + max(abs(lo) * 1e-3, 1e-6)
    width = (hi - lo) / bins
    edges = lo + width * np.arange(bins + 1)
    where = np.clip(((values[nz] - lo) / width).astype(np.int64), 0, bins - 1)
    out = {"edges": [round(float(e), 6) for e in edges], "counts": {}}
    for part, counts in parts.items():
        out["counts"][part] = np.bincount(where, weights=counts[nz], minlength=bins).astype(np.int64).tolist()
    out["n"] = {part: int(c.sum()) for part, c in parts.items()}
    return out


# --- thumbnails of the rows shown ---------------------------------------------------------------------
def thumbnail_jpeg(data: bytes, px: int, quality: int = 70) -> bytes | None:
    """A JPEG of at most ``px`` on its longer side (None: not a readable image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px * 2, px * 2))  # JPEG: decode at a fraction of the size
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality, optimize=True)
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - a picture that cannot be shown is shown as missing
        return None


def thumbnails(rows: list[dict], files: list[str], px: int, storage: StorageConfig | None = None,
               quality: int = 70) -> dict[tuple[int, int], str]:
    """``data:`` URIs of the rows' pictures, keyed by (file index, row); rows without one are left out."""
    by_file: dict[int, dict[int, str]] = {}
    for r in rows:
        if r.get("image"):
            by_file.setdefault(r["file"], {})[r["row"]] = r["image"]

    def one(item: tuple[int, dict[int, str]]) -> dict[tuple[int, int], str]:
        i, wanted = item
        pf = _open(files[i], storage)
        out = {}
        for column in sorted(set(wanted.values())):
            picked = sorted(r for r, c in wanted.items() if c == column)
            if column not in pf.schema_arrow.names:
                continue
            values = take_rows(pf, picked, [column]).column(column).to_pylist()
            for r, data in zip(picked, values):
                jpeg = thumbnail_jpeg(data, px, quality) if data else None
                if jpeg:
                    out[(i, r)] = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        return out

    result: dict[tuple[int, int], str] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for part in pool.map(one, sorted(by_file.items())):
            result.update(part)
    return result
