"""The recaption cache: one small JSON object per (image sha256, prompt inputs) under the settings key."""

from __future__ import annotations

import json
import logging

from operators.storage import StorageConfig, fsspec_fs, is_remote, join, write_bytes_atomic

log = logging.getLogger(__name__)


class RecaptionCache:
    """One JSON object per (image sha256, prompt inputs) under ``root/<settings key>/<sha[:2]>/``.

    Reads and writes go in concurrent batches (fsspec ``cat`` / ``pipe``; s3fs runs them on
    its event loop). One object per image is what object stores scale to; at billions of
    images it costs one PUT per newly recaptioned image, small beside the GPU time of the
    caption itself (README, "Recaption cache").
    """

    def __init__(self, root: str, settings_key: str, storage: StorageConfig | None = None):
        self.root = join(root, settings_key)
        self.fs, self.base = fsspec_fs(self.root, storage)
        self.remote = is_remote(root)

    def path(self, sha256: str, inputs: str) -> str:
        return f"{self.base}/{sha256[:2]}/{sha256}.{inputs}.json"

    def get_many(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        if not keys:
            return {}
        paths = {self.path(*k): k for k in keys}
        try:
            found = self.fs.cat(list(paths), on_error="omit")
        except FileNotFoundError:
            found = {}
        out = {}
        for p, data in found.items():
            if p not in paths:
                continue
            try:
                out[paths[p]] = json.loads(data)
            except (ValueError, TypeError):
                log.warning("recaption cache: unreadable entry %s ignored", p)
        return out

    def put_many(self, entries: dict[tuple[str, str], dict]) -> None:
        if not entries:
            return
        blobs = {self.path(*k): json.dumps(v, ensure_ascii=False).encode() for k, v in entries.items()}
        if self.remote:
            self.fs.pipe(blobs)  # one PUT each: atomic
            return
        for p, data in blobs.items():  # local: write then rename, so a reader never sees half a file
            write_bytes_atomic(p, data)
