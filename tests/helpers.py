"""Small helpers shared by tests (not fixtures)."""

from __future__ import annotations

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
