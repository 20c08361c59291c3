"""Phase 1's source: the plan's sample shards, one read task (and block) per shard file.

``ray.data.read_parquet`` would read the same files, but first it runs a Ray task that opens
and samples them to estimate their in-memory size (``_fetch_parquet_file_info``); on a fresh
job that task waits for a worker process to start and import Ray Data and pyarrow, ~1-1.7 s
on 2 cores before the first download. The plan wrote these files and knows what they are:
small Parquet shards of at most ``plan.shard_rows`` samples (URLs, captions, metadata), so
nothing needs sampling. The read fuses into the download actor like read_parquet's does.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable

import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


def read_shard(path: str, filesystem) -> Iterable:
    """One shard as one Arrow table (a read task's only block)."""
    yield pq.read_table(path, filesystem=filesystem)


class SampleShards(Datasource):
    """``files``: Parquet paths on ``filesystem`` (a pyarrow filesystem, as read_parquet takes)."""

    def __init__(self, files: list[str], filesystem):
        super().__init__()
        self._files = list(files)
        self._fs = filesystem

    def get_name(self) -> str:
        return "SampleShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown without opening the files; only Ray Data's progress estimates use it

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # One task per shard whatever ``parallelism`` says: a shard is already a bounded unit of
        # work (plan.shard_rows), and the checkpoint filter and the download actor take it whole.
        return [ReadTask(partial(read_shard, path, self._fs),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[path]),
                         per_task_row_limit=per_task_row_limit)
                for path in self._files]
