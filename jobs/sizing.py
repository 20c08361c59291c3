"""Fit a wave's pipeline to the cluster it runs on, before the wave starts.

Ray Data runs every operator of a streaming pipeline at once: the download actors, the model
actors, Ray Data's checkpoint filter when a wave resumes (an actor of 1 CPU, fixed by Ray), the
read tasks when the read does not fuse into the download actor, and the write tasks. If they do
not all fit, an operator waits for CPUs that free only at the end of the wave (a write that
cannot start until every download is done, so nothing is written or checkpointed until then) or
never (a resumed wave whose read task waits for the CPUs the download actors hold). So before
each wave the job sizes the actor pools from the resources of the cluster it runs on
(``ray.cluster_resources()``, never the driver's machine) so that all of them run together, or
refuses with an error that names the keys to change. :func:`fit_pipeline` is pure: it takes the
cluster's totals and is unit-tested without Ray.

The check is on cluster totals; an actor cannot span nodes, so on a cluster of many small nodes
a per-actor request larger than a node's CPUs still cannot be placed (Ray reports it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from jobs.config import ConfigError

log = logging.getLogger(__name__)

# Ray Data's CheckpointFilter is an actor-pool map operator with Ray Data's default of 1 CPU per
# actor (ray/data/_internal/planner/checkpoint/plan_read_op.py); the job keeps its pool at one.
CHECKPOINT_FILTER_CPUS = 1.0
# A read task that does not fuse into the download actor (a resumed wave, or download.batch_size
# set) only opens one small Parquet shard: a small share of a CPU, so it never waits behind actors.
UNFUSED_READ_CPUS = 0.125
# Download actors per concurrent write task and per concurrent unfused read task by default. One
# writer keeps up with several actors (a write costs ~0.3 ms of CPU per row against ~1.5-2 ms of
# download and image work), and every extra task costs a worker process.
ACTORS_PER_WRITER = 4
ACTORS_PER_READER = 8
_EPS = 1e-9


class ResourceError(ConfigError):
    """The pipeline's operators cannot all run at once on this cluster; the message names the keys."""


@dataclass(frozen=True)
class StageNeed:
    """One actor-pool stage as configured: per-actor resources and the pool size asked for."""

    name: str
    cpus: float
    gpus: float
    pool_min: int
    pool_max: int | None  # None: as many as the cluster fits
    cpu_keys: tuple[str, ...]  # config keys that set its CPUs and pool (named in errors)
    gpu_keys: tuple[str, ...] = ()


@dataclass
class PipelinePlan:
    """How a wave runs on this cluster: every field is what Ray Data is asked for."""

    cluster_cpus: float
    cluster_gpus: float
    resuming: bool
    pools: dict[str, tuple[int, int]] = field(default_factory=dict)  # stage -> (min, max) actors
    stage_cpus: dict[str, float] = field(default_factory=dict)
    stage_gpus: dict[str, float] = field(default_factory=dict)
    read_fused: bool = True
    read_cpus: float | None = None  # None when fused (the download actor reads)
    read_concurrency: int | None = None
    write_cpus: float = 0.0
    write_concurrency: int = 1

    def cpus_at_once(self) -> float:
        """CPUs of every operator running at its largest size at once."""
        total = sum(self.stage_cpus[s] * p[1] for s, p in self.pools.items())
        total += self.write_cpus * self.write_concurrency
        if not self.read_fused:
            total += (self.read_cpus or 0.0) * (self.read_concurrency or 1)
        return total + (CHECKPOINT_FILTER_CPUS if self.resuming else 0.0)

    def describe(self) -> str:
        parts = [f"{s} {p[0]}-{p[1]} x {self.stage_cpus[s]:g} CPU" + (f" {self.stage_gpus[s]:g} GPU"
                                                                         if self.stage_gpus[s] else "")
                 for s, p in self.pools.items()]
        parts.append("read fused into download" if self.read_fused
                     else f"read {self.read_concurrency} x {self.read_cpus:g} CPU")
        parts.append(f"write {self.write_concurrency} x {self.write_cpus:g} CPU")
        if self.resuming:
            parts.append(f"checkpoint filter 1 x {CHECKPOINT_FILTER_CPUS:g} CPU")
        return (f"{', '.join(parts)}: {self.cpus_at_once():g} of {self.cluster_cpus:g} CPUs"
                + (f", {sum(self.stage_gpus[s] * p[1] for s, p in self.pools.items()):g} of "
                   f"{self.cluster_gpus:g} GPUs" if self.cluster_gpus or any(self.stage_gpus.values()) else ""))

    def to_json(self) -> dict:
        return {"cluster_cpus": self.cluster_cpus, "cluster_gpus": self.cluster_gpus, "resuming": self.resuming,
                "pools": {s: list(p) for s, p in self.pools.items()}, "read_fused": self.read_fused,
                "write_concurrency": self.write_concurrency, "cpus_at_once": round(self.cpus_at_once(), 4)}


def fit_pipeline(download: StageNeed, models: list[StageNeed], cluster_cpus: float, cluster_gpus: float,
                 resuming: bool, read_fused: bool, write_cpus: float, write_concurrency: int | None) -> PipelinePlan:
    """Size the pools so that every operator runs at once, or raise :class:`ResourceError`.

    Model stages get their ``pool_min`` first, then grow towards ``pool_max`` (GPUs are usually
    what limits them); the download pool, of a fixed size, takes the CPUs left, up to ``pool_max``
    (None: all), after the write tasks (and unfused reads) it needs. A configured ``pool_min`` the cluster
    cannot hold together with the rest is lowered, with a warning; fewer than one actor of any
    stage is an error.
    """
    plan = PipelinePlan(cluster_cpus, cluster_gpus, resuming, read_fused=read_fused, write_cpus=write_cpus)
    fixed = CHECKPOINT_FILTER_CPUS if resuming else 0.0
    all_keys = [k for m in models for k in m.cpu_keys] + list(download.cpu_keys) + [
        "output.write_num_cpus", "output.write_concurrency", "ray.num_cpus (a local Ray) or the cluster's size"]

    def tasks(n_download: int) -> float:
        """CPUs of the write tasks (and unfused read tasks) that go with ``n_download`` actors."""
        plan.write_concurrency = write_concurrency or max(1, math.ceil(n_download / ACTORS_PER_WRITER))
        total = plan.write_concurrency * write_cpus
        if not read_fused:
            plan.read_cpus = UNFUSED_READ_CPUS
            plan.read_concurrency = max(1, math.ceil(n_download / ACTORS_PER_READER))
            total += plan.read_concurrency * UNFUSED_READ_CPUS
        return total

    def refuse(what: str, keys: list[str]) -> ResourceError:
        need = (f"{what}; the cluster has {cluster_cpus:g} CPUs and {cluster_gpus:g} GPUs"
                + (f", of which Ray Data's checkpoint filter takes {CHECKPOINT_FILTER_CPUS:g} CPU to resume "
                   "this wave" if resuming else ""))
        return ResourceError(f"the pipeline cannot run all its operators at once: {need}. "
                             f"Change {', '.join(dict.fromkeys(keys))}")

    gpus_min = sum(m.gpus * m.pool_min for m in models)
    if gpus_min > cluster_gpus + _EPS:
        raise refuse(f"the model stages need {gpus_min:g} GPUs at their pool_min",
                     [k for m in models if m.gpus for k in m.gpu_keys])
    cpus_min = fixed + sum(m.cpus * m.pool_min for m in models)
    if cpus_min + download.cpus + tasks(1) > cluster_cpus + _EPS:
        raise refuse(f"one download actor ({download.cpus:g} CPU), {plan.write_concurrency} write task(s) "
                     f"({write_cpus:g} CPU each)" + ("" if read_fused else " and a read task") +
                     f" and the model stages at their pool_min ({cpus_min - fixed:g} CPUs) need "
                     f"{cpus_min + download.cpus + tasks(1):g} CPUs", all_keys)
    # Model stages grow towards pool_max while one download actor and its tasks still fit.
    spare_cpus = cluster_cpus - cpus_min - download.cpus - tasks(1)
    spare_gpus = cluster_gpus - gpus_min
    for m in models:
        n = m.pool_min
        while n < (m.pool_max or m.pool_min) and m.cpus <= spare_cpus + _EPS and m.gpus <= spare_gpus + _EPS:
            n, spare_cpus, spare_gpus = n + 1, spare_cpus - m.cpus, spare_gpus - m.gpus
        plan.pools[m.name], plan.stage_cpus[m.name], plan.stage_gpus[m.name] = (min(m.pool_min, n), n), m.cpus, m.gpus
    models_cpus = sum(m.cpus * plan.pools[m.name][1] for m in models)
    left = cluster_cpus - fixed - models_cpus
    n = max(1, int((left - tasks(1)) / download.cpus + _EPS))
    if download.pool_max is not None:
        n = min(n, download.pool_max)
    while n > 1 and n * download.cpus + tasks(n) > left + _EPS:
        n -= 1
    tasks(n)  # the write/read concurrency that goes with the final pool
    if n < download.pool_min:
        log.warning("download.pool_min %d lowered to %d: %d download actors of %g CPU fit beside the other "
                    "operators on %g CPUs%s", download.pool_min, n, n, download.cpus, cluster_cpus,
                    " (with Ray Data's checkpoint filter of a resumed wave)" if resuming else "")
    # A fixed-size pool: Ray Data's actor autoscaler does not grow a pool whose actors take a few
    # concurrent calls each (its utilization threshold cannot be reached), so a pool started at
    # pool_min would stay there; the sized n is what fits, and the download tier should use it.
    plan.pools = {"download": (n, n), **plan.pools}
    plan.stage_cpus["download"], plan.stage_gpus["download"] = download.cpus, 0.0
    return plan
