"""Filesystems for local paths and ``s3://`` (s3fs), as fsspec and as pyarrow filesystems.

Credentials are never part of a config: s3fs takes them from the environment or the
instance role. A config may name an endpoint (MinIO, moto, R2...) and a region.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from functools import lru_cache

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field


class StorageConfig(BaseModel):
    """Object storage settings (``storage:`` in the job config). No secrets here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    region: str | None = Field(None, description="S3 region")
    anon: bool = Field(False, description="unsigned requests (public buckets)")


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def strip_protocol(path: str) -> str:
    if path.startswith("file://"):
        return path[len("file://"):]
    if path.startswith("s3://"):
        return path[len("s3://"):]
    return path


@lru_cache(maxsize=16)
def _fsspec_fs(protocol: str, storage: StorageConfig) -> fsspec.AbstractFileSystem:
    if protocol == "s3":
        client_kwargs = {}
        if storage.endpoint_url:
            client_kwargs["endpoint_url"] = storage.endpoint_url
        if storage.region:
            client_kwargs["region_name"] = storage.region
        return fsspec.filesystem("s3", anon=storage.anon, client_kwargs=client_kwargs, use_listings_cache=False)
    if protocol in ("file", "local"):
        return fsspec.filesystem("file")
    return fsspec.filesystem(protocol)


def fsspec_fs(path: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path without its protocol."""
    storage = storage or StorageConfig()
    protocol = path.split("://", 1)[0] if "://" in path else "file"
    fs = _fsspec_fs(protocol, storage)
    if protocol == "file":
        return fs, posixpath.abspath(strip_protocol(path))
    return fs, strip_protocol(path)


def arrow_fs(path: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``path`` (s3 goes through s3fs, which honours the endpoint)."""
    fs, stripped = fsspec_fs(path, storage)
    if not is_remote(path):
        return pafs.LocalFileSystem(), stripped
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), stripped


def join(base: str, *parts: str) -> str:
    """Join path parts, keeping a protocol prefix."""
    if "://" in base:
        proto, rest = base.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return posixpath.join(base, *parts)


def qualify(paths: list[str], output_path: str) -> list[str]:
    """Paths as phase 1 lists its data files (on the output's filesystem: ``bucket/key`` for an
    ``s3://`` output), each given the output's scheme where it has none."""
    scheme = output_path.split("://", 1)[0] + "://" if "://" in output_path else ""
    return [p if "://" in p or not scheme else scheme + p for p in paths]


def write_bytes_atomic(path: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write bytes so that readers see either the old file or the whole new one, never a part.

    Object storage: one PUT, atomic already. Local: a temporary file of a unique name in the same
    directory (two writers of one path never share it), then an atomic rename; the temporary file
    is removed if the write fails."""
    fs, p = fsspec_fs(path, storage)
    parent = posixpath.dirname(p)
    if is_remote(path):
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(p, data)
        return
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{p}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj, storage: StorageConfig | None = None) -> None:
    """Write JSON so that readers see either nothing or the whole file (``write_bytes_atomic``)."""
    write_bytes_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), storage)


def read_json(path: str, storage: StorageConfig | None = None):
    """The parsed JSON at ``path``, or None if it does not exist."""
    fs, p = fsspec_fs(path, storage)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return json.loads(f.read())


def local_copy(spec: str, storage: StorageConfig | None = None, cache_dir: str | None = None) -> str:
    """A local path for a model or checkpoint spec: ``file://`` and plain paths as they are; an
    object or a prefix (a directory) in object storage copied once into ``cache_dir`` (default: a
    temp dir); anything else without a scheme (an HF id, a pretrained tag) unchanged."""
    if spec.startswith("file://"):
        return spec[len("file://"):]
    if "://" not in spec:
        return spec
    fs, path = fsspec_fs(spec, storage)
    cache = cache_dir or os.path.join(tempfile.gettempdir(), "imgcurate-models")
    local = os.path.join(cache, path.replace("/", "__"))
    if not os.path.exists(local):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{local}.{os.getpid()}.part"
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", tmp, recursive=True)
        else:
            fs.get(path, tmp)
        os.replace(tmp, local)
    return local


def take_rows(pf: pq.ParquetFile, rows: list[int], columns: list[str]) -> pa.Table:
    """``rows`` (file row numbers, any order) of ``columns``, reading only the row groups that hold them."""
    sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    r = np.asarray(rows, dtype=np.int64)
    group_of = np.searchsorted(starts, r, side="right") - 1
    groups = sorted(set(group_of.tolist()))
    if not groups:
        return pf.schema_arrow.empty_table().select(columns)
    data = pf.read_row_groups(groups, columns=columns)
    base = {g: int(np.sum(sizes[groups[:k]])) for k, g in enumerate(groups)}
    local = np.array([base[g] + x - starts[g] for g, x in zip(group_of.tolist(), r.tolist())], np.int64)
    return data.take(pa.array(local, pa.int64()))
