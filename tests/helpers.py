"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa


def batch_of(urls, status=None) -> pa.Table:
    n = len(urls)
    return pa.table({
        "sample_id": pa.array([f"id{i}" for i in range(n)], pa.string()),
        "url": pa.array(urls, pa.string()),
        "status": pa.array(status or ["kept"] * n, pa.string()),
        "drop_stage": pa.array([None] * n, pa.string()),
        "drop_reason": pa.array([None] * n, pa.string()),
        "error_message": pa.array([None] * n, pa.string()),
    })


def jpeg(seed: int, size=(48, 64)) -> bytes:
    """A seeded random JPEG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(size[0], size[1], 3) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def image_batch(images, captions=None, status=None, sources=None, dropped_by=("download", "http_404")) -> pa.Table:
    """Rows as they reach a model stage: status columns (rows not kept were dropped by
    ``dropped_by`` = (stage, reason)), ``image`` bytes, and ``captions`` / ``caption_sources`` when given."""
    n = len(images)
    status = status or ["kept"] * n
    stage, reason = dropped_by
    cols = {
        "sample_id": [f"s{i}" for i in range(n)],
        "status": status,
        "drop_stage": pa.array([None if s == "kept" else stage for s in status], pa.string()),
        "drop_reason": pa.array([None if s == "kept" else reason for s in status], pa.string()),
        "error_message": pa.array([None] * n, pa.string()),
        "image": pa.array(images, pa.binary()),
    }
    if captions is not None:
        cols["captions"] = pa.array(captions, pa.list_(pa.string()))
    if sources is not None:
        cols["caption_sources"] = pa.array(sources, pa.list_(pa.string()))
    return pa.table(cols)
