"""The job config: one pydantic schema composed of each operator's own small config.

Loaded from YAML, overridden with ``--set a.b=c``. An unknown key or a bad value is a
``ConfigError`` that names the key and the value, raised before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from jobs.stages import PHASE2, STAGES, config_errors, config_warnings
from operators.refresh import RefreshConfig
from operators.report.config import ReportConfig
from operators.sources import SourceConfig
from operators.storage import StorageConfig

log = logging.getLogger(__name__)


def _config_dir() -> Path:
    """configs/ of the source tree (editable install, container WORKDIR), else of the cwd."""
    here = Path(__file__).resolve().parent.parent / "configs"
    return here if here.is_dir() else Path.cwd() / "configs"


CONFIG_DIR = _config_dir()


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the value."""


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="output root, local path or s3://bucket/prefix")
    overwrite: bool = Field(False, description="delete an existing output of a different config first")
    write_concurrency: int | None = Field(
        None, ge=1, description="Parquet write tasks at once in a wave; null: one per 4 download actors")
    write_num_cpus: float = Field(
        0.125, gt=0, description="CPUs a write task asks for: small, so that writes start while the download "
                                 "actors hold the cluster (a write costs ~0.3 ms of CPU per row)")
    lock_stale_after_s: float = Field(900.0, gt=0, description=(
        "the output's lock (_LOCK.json, one run at a time) is taken over when its heartbeat is older than this"))
    lock_heartbeat_s: float = Field(60.0, gt=0, description="how often the running job refreshes its lock")


class PlanConfig(BaseModel):
    """Phase 0: the shuffle that merges rows by URL into hash-prefix buckets."""

    model_config = ConfigDict(extra="forbid")

    num_buckets: int = Field(256, ge=1, le=1_048_576, description="hash-prefix buckets (~1M samples each at scale)")
    wave_max_samples: int = Field(10_000_000, ge=1, description="phase 1 runs in waves of at most this many samples")
    shard_rows: int = Field(4096, ge=1, description="samples per sample shard (one phase-1 read task)")
    scatter_flush_rows: int = Field(200_000, ge=1, description="rows a scatter task buffers per bucket before "
                                                                 "writing them")
    local_max_bytes: int = Field(8 * 1024 * 1024, ge=0,
                                 description="input files totalling at most this many bytes are planned in the "
                                             "driver process (the same code, no Ray tasks); 0: always Ray tasks")


class RayConfig(BaseModel):
    """How the job connects to Ray; only jobs/ touch process-wide state (STYLE.md habit 7)."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="None: RAY_ADDRESS or a new local Ray; 'auto': a running cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray started by the job")
    node_ip_address: str | None = Field(None, description="IP a local Ray binds to (127.0.0.1 for dry runs)")
    object_store_memory_mb: int | None = Field(None, ge=64, description="object store of a local Ray started "
                                                                           "by the job")
    progress_bars: bool = Field(True, description="Ray Data progress bars")
    target_max_block_mb: float = Field(64.0, gt=0, description="Ray Data block size: also the unit of writes/resume")
    checkpoint: bool = Field(True, description="row-level resume with Ray Data checkpointing")


class _JobBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("imgcurate", description="run name")
    input: SourceConfig
    output: OutputConfig = Field(..., description="where the run writes (required)")
    storage: StorageConfig = StorageConfig()
    plan: PlanConfig = PlanConfig()
    ray: RayConfig = RayConfig()
    refresh: RefreshConfig = Field(RefreshConfig(), description="imgcurate refresh: new samples only, re-checks, "
                                                                "takedowns, retention")
    report: ReportConfig = Field(ReportConfig(), description="the HTML run report written next to the manifest "
                                                             "(imgcurate report)")

    def fingerprint(self, *sections: str) -> str:
        """A hash of the named sections (default: every section but ``RUN_SECTIONS`` and
        ``PHASE2_SECTIONS``): an output's phase 1 is resumed only by the same config. Phase 2 reads
        phase 1's files and rewrites only its own sidecars and a new snapshot, so its settings
        (dedup, selections, coreset, publish) may change between runs of one output: the manifest
        and each snapshot record the ones they were made with. Keys that say how much runs at once and where
        (``RESOURCE_KEYS``, ``LOCATION_KEYS``) are left out: a resume may scale the actor pools or
        change batch sizes without changing what is written. A new stage's section is covered
        without anyone listing it."""
        data = _without_keys(self.model_dump(mode="json"))
        picked = {s: data[s] for s in sections} if sections else {
            k: v for k, v in data.items() if k not in RUN_SECTIONS | PHASE2_SECTIONS}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# The job config: the run sections above, then one section per stage of jobs/stages.py, in order.
JobConfig = create_model(
    "JobConfig", __base__=_JobBase, __module__=__name__,
    **{s.section: (s.config, s.config()) for s in STAGES})
JobConfig.__doc__ = "The whole job: run sections (where and how) and one section per stage (what)."

# Sections that only say where and how to run: not part of the fingerprint.
RUN_SECTIONS = frozenset({"name", "output", "storage", "ray", "refresh", "report"})
# Phase 2's sections: rerun over an existing phase-1 output with other settings (``imgcurate phase2``).
PHASE2_SECTIONS = frozenset(s.section for s in STAGES if s.runs_in == PHASE2)
# Keys (in any section) that say where a stage keeps local copies or caches, not what it writes.
LOCATION_KEYS = frozenset({"cache_dir", "cache_path"})

# Config keys (in any section) that change how the work is scheduled, not its output.
RESOURCE_KEYS = frozenset({"num_cpus", "num_gpus", "pool_min", "pool_max", "batch_size", "micro_batch",
                           "batches_in_flight", "yield_rows", "scatter_flush_rows", "local_max_bytes"})


def _without_keys(node):
    if isinstance(node, dict):
        return {k: _without_keys(v) for k, v in node.items() if k not in RESOURCE_KEYS and k not in LOCATION_KEYS}
    if isinstance(node, list):
        return [_without_keys(v) for v in node]
    return node


def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars or flow collections (``[a, b]``, ``{k: v}``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set has an empty key in {assignment!r}")
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:  # absent, or a YAML section left empty (`ray:`)
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"--set {key}: {p!r} is not a section")
        node = node[p]
    node[parts[-1]] = _parse_value(value)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r} (value {e.get('input')!r})")
        elif e["type"] == "missing":
            lines.append(f"missing required key {key!r}")
        else:
            lines.append(f"bad value for {key!r}: {e.get('input')!r} ({e['msg']})")
    return "invalid config:\n  " + "\n  ".join(lines)


def read_config_file(path: str | Path) -> dict:
    """The mapping a YAML config file holds; a missing file, bad YAML or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> JobConfig:
    """YAML file (or a dict) plus ``key=value`` overrides -> validated ``JobConfig``."""
    if data is None:
        data = read_config_file(path) if path is not None else {}
    data = json.loads(json.dumps(data))  # deep copy
    for o in overrides or []:
        apply_override(data, o)
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    errors = config_errors(cfg)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(f"bad value for {key!r}: {msg}" for key, msg in errors))
    for key, msg in config_warnings(cfg):
        log.warning("%s: %s", key, msg)
    for s in STAGES:
        if s.enabled(cfg):
            for key in s.local_files(cfg):
                _set_key(cfg, key, _local_file(_get_key(cfg, key), key))
    return cfg


def _get_key(cfg: BaseModel, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _set_key(cfg: BaseModel, key: str, value) -> None:
    *parents, leaf = key.split(".")
    setattr(_get_key(cfg, ".".join(parents)) if parents else cfg, leaf, value)


def _local_file(path: str, key: str) -> str:
    """An absolute path (workers may run elsewhere): relative to the cwd, else to the project root."""
    for base in (Path.cwd(), CONFIG_DIR.parent):
        p = (base / path).resolve()
        if p.exists():
            return str(p)
    raise ConfigError(f"bad value for {key!r}: {path!r} (file not found)")
