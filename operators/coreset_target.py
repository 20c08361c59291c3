"""The coreset's target set: embeddings read from Parquet, or images embedded with the CLIP model.

SimCore (Kim et al., "Coreset Sampling from Open-Set for Fine-Grained Self-Supervised Learning",
CVPR 2023) clusters the *target* dataset's features and samples the open set around the centroids;
the target must therefore live in the same embedding space as the open set's
``clip_image_embedding``. ``coreset.target`` names it, detected by path:

- ends with ``.parquet``, or a folder holding ``*.parquet`` files: Parquet with an embedding column
  (``coreset.target_column``, default ``clip_image_embedding``: a phase-1 output can be a target);
- a folder of images (``.jpg .jpeg .png .webp .bmp .gif``): each decodable image is embedded with
  the job's CLIP model (the step is given the CLIP stage's ``ClipConfig``, or an ``embed`` callable);
- ends with ``.txt`` (one URL per line, ``#`` comments) or ``.csv`` / ``.tsv`` / ``.jsonl`` (a ``url``
  column, ``coreset.target_url_column``), gzipped or not: a URL list. Its URLs are normalized and
  deduplicated as phase 1 does, downloaded with the job's ``download`` settings (the same SSRF guard,
  opt-out headers, size cap and retries) and embedded with the CLIP model; what fails to download or
  decode is counted by reason in the step's report, never fatal unless nothing is left.

Local paths and ``s3://`` both work (through ``operators.storage``). The target is loaded by the
phase-2 driver: it is the small side (thousands to a few hundred thousand rows).
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators.storage import StorageConfig, fsspec_fs

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
URL_LIST_EXTENSIONS = (".txt", ".csv", ".tsv", ".jsonl", ".ndjson", ".json")
URL_CHUNK = 512  # URLs downloaded and embedded at a time (bounds the bytes held at once)
EmbedFn = Callable[[list], np.ndarray]  # image bytes -> (n, dim) embeddings, rows of undecodable images NaN


@dataclass
class Target:
    """The target's embeddings (float64, rows L2-normalized) and where they came from."""

    vectors: np.ndarray
    kind: str
    path: str
    skipped: int = 0  # rows without an embedding / images that did not decode / URLs that failed
    reasons: dict | None = None  # a URL list's failures: {reason: count}


def target_kind(path: str) -> str:
    """``parquet``, ``images`` or ``urls`` by the path's extension (a folder: by what it holds)."""
    low = path.lower().rstrip("/")
    if low.endswith(".gz"):
        low = low[:-3]
    if low.endswith(".parquet"):
        return "parquet"
    if low.endswith(URL_LIST_EXTENSIONS):
        return "urls"
    return "folder"  # resolved on listing


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, float32 matrix of the valid rows) of a fixed-size (or variable) list column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    good = pc.filter(arr, pa.array(valid))
    if len(good) == 0:
        return valid, np.zeros((0, _width(arr.type)), np.float32)
    flat = good.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return valid, flat.reshape(len(good), -1)


def _width(typ: pa.DataType) -> int:
    return typ.list_size if pa.types.is_fixed_size_list(typ) else 0


def normalize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows L2-normalized in float64 (and a mask of rows with a non-zero finite norm)."""
    x = np.asarray(x, np.float64)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    ok = np.isfinite(norm) & (norm > 0)
    out = np.zeros_like(x)
    out[ok] = x[ok] / norm[ok, None]
    return out, ok


def _list(path: str, storage: StorageConfig | None) -> tuple[object, list[str]]:
    fs, p = fsspec_fs(path, storage)
    if fs.isfile(p):
        return fs, [p]
    return fs, sorted(f for f in fs.find(p) if not posixpath.basename(f).startswith((".", "_")))


def load_target(path: str, column: str = "clip_image_embedding", storage: StorageConfig | None = None,
                embed: EmbedFn | None = None, download=None, url_column: str = "url") -> Target:
    """The target's normalized embeddings (see the module docstring for what ``path`` may be).
    ``download``: the ``DownloadConfig`` a URL list is fetched with (default: ``DownloadConfig()``)."""
    if target_kind(path) == "urls":
        return _url_target(path, storage, embed, download, url_column)
    fs, names = _list(path, storage)
    parquets = [f for f in names if f.lower().endswith(".parquet")]
    images = [f for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
    if parquets:
        parts = []
        for f in parquets:
            with fs.open(f, "rb") as fh:
                t = pq.read_table(fh, columns=[column])
            parts.append(t.column(column))
        valid, x = embedding_matrix(pa.chunked_array([c for p in parts for c in p.chunks],
                                                     type=parts[0].type))
        vec, ok = normalize(x)
        kind, skipped = "parquet", int((~valid).sum() + (~ok).sum())
        vec = vec[ok]
    elif images:
        if embed is None:
            raise ValueError(f"coreset.target {path!r} is a folder of images: embedding them needs the CLIP "
                             "model (the step is built with the job's clip config)")
        blobs = []
        for f in images:
            with fs.open(f, "rb") as fh:
                blobs.append(fh.read())
        emb = np.asarray(embed(blobs), np.float64)
        vec, ok = normalize(np.nan_to_num(emb, nan=0.0))
        kind, skipped = "images", int((~ok).sum())
        vec = vec[ok]
    else:
        raise ValueError(f"coreset.target {path!r}: no .parquet files or images ({', '.join(IMAGE_EXTENSIONS)}) "
                         "found there")
    if len(vec) == 0:
        raise ValueError(f"coreset.target {path!r}: no usable embeddings")
    log.info("coreset target %s: %d %s rows (%d skipped)", path, len(vec), kind, skipped)
    return Target(vec, kind, path, skipped)


def read_url_list(path: str, storage: StorageConfig | None = None, url_column: str = "url",
                  max_url_length: int = 2048) -> tuple[list[str], Counter]:
    """The normalized, deduplicated URLs of a URL list (first occurrence order) and the rows that
    gave none, by phase 1's plan reasons (``missing_url``, ``invalid_url``, ...)."""
    from operators.sources import SourceConfig, iter_rows, normalize_url

    low = path.lower()[:-3] if path.lower().endswith(".gz") else path.lower()
    raw: list = []
    if low.endswith(".txt"):
        fs, p = fsspec_fs(path, storage)
        with fs.open(p, "rb", compression="gzip" if path.lower().endswith(".gz") else None) as fh:
            for line in io.TextIOWrapper(fh, encoding="utf-8-sig", errors="replace"):
                line = line.strip()
                if line and not line.startswith("#"):
                    raw.append(line)
    else:
        src = SourceConfig(paths=[path], url_column=url_column, max_url_length=max_url_length)
        for t in iter_rows(path, src, storage):
            raw.extend(t.column(url_column).to_pylist() if url_column in t.column_names else [None] * t.num_rows)
    urls: dict[str, None] = {}
    bad: Counter = Counter()
    for r in raw:
        url, reason = normalize_url(r, max_url_length)
        if url is None:
            bad[reason] += 1
        else:
            urls.setdefault(url)
    return list(urls), bad


def _url_target(path, storage, embed, download, url_column) -> Target:
    from operators.base import KEPT
    from operators.download import DownloadConfig, HttpDownloader

    if embed is None:
        raise ValueError(f"coreset.target {path!r} is a URL list: embedding its images needs the CLIP model "
                         "(the step is built with the job's clip config)")
    config = download if download is not None else DownloadConfig()
    if not isinstance(config, DownloadConfig):
        config = DownloadConfig(**config)
    urls, reasons = read_url_list(path, storage, url_column)
    if not urls:
        raise ValueError(f"coreset.target {path!r}: no usable URLs ({dict(reasons) or 'the list is empty'})")
    downloader = HttpDownloader(config)
    parts: list[np.ndarray] = []
    try:
        for s in range(0, len(urls), URL_CHUNK):
            chunk = urls[s:s + URL_CHUNK]
            n = len(chunk)
            none = pa.nulls(n, pa.string())
            got = downloader.process(pa.table({
                "sample_id": pa.array([f"target{s + i}" for i in range(n)], pa.string()),
                "url": pa.array(chunk, pa.string()), "status": pa.array([KEPT] * n, pa.string()),
                "drop_stage": none, "drop_reason": none, "error_message": none}))
            status, failed_by = got.column("status").to_pylist(), got.column("drop_reason").to_pylist()
            reasons.update(w for st, w in zip(status, failed_by) if st != KEPT)
            blobs = [b for st, b in zip(status, got.column("image_bytes").to_pylist()) if st == KEPT]
            if blobs:
                emb = np.asarray(embed(blobs), np.float64)
                vec, ok = normalize(np.nan_to_num(emb, nan=0.0))
                reasons["not_decodable"] += int((~ok).sum())
                parts.append(vec[ok])
    finally:
        downloader.close()
    vec = np.concatenate(parts) if parts else np.zeros((0, 0))
    reasons = {k: v for k, v in sorted(reasons.items()) if v}
    log.info("coreset target %s: %d of %d URLs embedded; failed: %s", path, len(vec), len(urls), reasons)
    if len(vec) == 0:
        raise ValueError(f"coreset.target {path!r}: none of its {len(urls)} URLs gave an image ({reasons})")
    return Target(vec, "urls", path, int(sum(reasons.values())), reasons)


def clip_embedder(clip_config, storage: StorageConfig | None = None, chunk: int = 256) -> EmbedFn:
    """An ``embed`` callable from the CLIP stage's config: the same model (``ClipModel``) the CLIP
    stage embeds the open set with; undecodable images come back as NaN rows."""
    from operators.models.clip import ClipModel

    model = ClipModel(clip_config, storage)

    def embed(blobs: list) -> np.ndarray:
        out = np.full((len(blobs), model.dim), np.nan, np.float32)
        for s in range(0, len(blobs), chunk):
            part = blobs[s:s + chunk]
            emb, outcomes = model.encode_images(part, "coreset")
            good = [k for k, o in enumerate(outcomes) if o is None]
            if good:
                out[[s + k for k in good]] = emb.float().cpu().numpy()
        return out

    return embed
