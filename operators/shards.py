"""Phase 1's source: the plan's sample shards, one read task (and block) per group of shard files.

``ray.data.read_parquet`` would read the same files, but first it runs a Ray task that opens
and samples them to estimate their in-memory size (``_fetch_parquet_file_info``); on a fresh
job that task waits for a worker process to start and import Ray Data and pyarrow, ~1-1.7 s
on 2 cores before the first download. The plan wrote these files and knows what they are:
small Parquet shards of at most ``plan.shard_rows`` samples (URLs, captions, metadata), so
nothing needs sampling. The read fuses into the download actor like read_parquet's does.

A group packs several small shards into one block (one download call), so that a call holds
enough rows to keep the actor's requests open: a plan of many buckets over few URLs has shards
of a few rows each (``jobs.plan.pack_shards``).
"""

from __future__ import annotations

from functools import partial
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


def read_shards(paths: list[str], filesystem) -> Iterable:
    """A group of shards as one Arrow table (a read task's only block)."""
    tables = [pq.read_table(p, filesystem=filesystem) for p in paths]
    yield tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")


class SampleShards(Datasource):
    """``groups``: lists of Parquet paths on ``filesystem`` (a pyarrow filesystem, as read_parquet
    takes), one read task each; a plain path is a group of one."""

    def __init__(self, groups: list[list[str] | str], filesystem):
        super().__init__()
        self._groups = [[g] if isinstance(g, str) else list(g) for g in groups]
        self._fs = filesystem

    def get_name(self) -> str:
        return "SampleShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown without opening the files; only Ray Data's progress estimates use it

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # One task per group whatever ``parallelism`` says: a group is already a bounded unit of
        # work (about plan.shard_rows), and the checkpoint filter and the download actor take it whole.
        return [ReadTask(partial(read_shards, paths, self._fs),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=paths),
                         per_task_row_limit=per_task_row_limit)
                for paths in self._groups]
