"""The stage list: one entry per stage, in pipeline order. Everything else is derived from it.

An explicit list, not an import-time registry: reading this file tells what the job runs and
in which order. From it come the job config's stage sections (jobs/config.py), the
cross-section checks and local-path resolution of ``load_config``, the check that every column
a stage reads is written by an earlier stage or by the plan (``check_chain``), the phase-1
pipeline (jobs/curate.py ``build_pipeline``), the manifest's model list (``models_of``), the
config fingerprint (every section but the run sections, jobs/config.py), ``imgcurate validate``'s
description of the chain (``describe``) and README's drop-reason table (``reason_table``).

Adding a stage: write its operator (a config class and a ``KeptRowsStage`` subclass that
declares ``columns`` and ``reasons``) under ``operators/``, then add one ``Stage`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel

from operators.base import Columns, DropReason, Operator, Resources
from operators.clip import ClipConfig, ClipEmbedder, calibration_warning
from operators.coreset import NOT_IN_CORESET, CoresetConfig
from operators.index import IndexConfig
from operators.clip import model_report as clip_report
from operators.dedup import REASONS as DEDUP_REASONS
from operators.dedup import DedupConfig
from operators.download import DownloadConfig, HttpDownloader
from operators.images import ImageConfig, ImageProcessor
from operators.recaption import RecaptionConfig, Recaptioner
from operators.recaption import model_report as recaption_report
from operators.reward import RewardConfig, RewardScorer
from operators.reward import model_report as reward_report
from operators.safety import SafetyConfig, SafetyScorer
from operators.safety import model_report as safety_report
from operators.selection import TOP_FRACTION_REASON, SelectionConfig
from operators.snapshot import PublishConfig
from operators.sources import PLAN_COLUMNS, PLAN_REASONS
from operators.storage import join

if TYPE_CHECKING:
    from jobs.config import JobConfig

# Where it runs: in the download actor (download and images share it), in an actor pool of its
# own (the model stages), or in phase 2 over the whole run's output.
DOWNLOAD_ACTOR, ACTOR_POOL, PHASE2 = "download actor", "actor pool", "phase 2"


def _no_kwargs(cfg: "JobConfig") -> dict:
    return {}


def _nothing(cfg: "JobConfig") -> list:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage of the job.

    ``section``: its config section (a ``config`` instance), also the ``drop_stage`` prefix of its
    drops; ``operator``: the class that runs it (None for phase-2 steps run by jobs/phase2.py, which
    declare ``reads``/``reasons`` here); ``kwargs``: extra constructor arguments from the job
    config; ``report``: what the manifest says about its models; ``requires``: cross-section
    errors (``(key, message)``) beyond the column chain; ``warnings``: cross-section doubts that do
    not stop a run (``(key, message)``, e.g. a CLIP threshold on weights it was not calibrated for);
    ``context``: other sections the operator's ``columns`` and ``resources`` depend on, as keywords
    (safety reads the CLIP stage's embeddings only when it runs the same model); ``local_files``:
    config keys holding local paths to make absolute (workers may run elsewhere)."""

    section: str
    config: type[BaseModel]
    operator: type[Operator] | None
    runs_in: str
    kwargs: Callable[["JobConfig"], dict] = _no_kwargs
    report: Callable[["JobConfig"], dict] | None = None
    requires: Callable[["JobConfig"], list[tuple[str, str]]] = _nothing
    warnings: Callable[["JobConfig"], list[tuple[str, str]]] = _nothing
    context: Callable[["JobConfig"], dict] = _no_kwargs
    local_files: Callable[["JobConfig"], list[str]] = _nothing
    reads: Callable[["JobConfig"], tuple[str, ...]] | None = None
    reasons: tuple[DropReason, ...] = ()
    writer_hint: str = ""  # how to make it write its columns, named when a later stage lacks one
    always: bool = False  # runs whatever the config (no ``enabled`` key)

    def stage_config(self, cfg: "JobConfig") -> BaseModel:
        return getattr(cfg, self.section)

    def enabled(self, cfg: "JobConfig") -> bool:
        if self.always:
            return True
        if self.runs_in == PHASE2:
            return bool(self.reads and self.reads(cfg))
        return bool(getattr(self.stage_config(cfg), "enabled", False))

    def columns(self, cfg: "JobConfig") -> Columns:
        if self.operator is None:
            return Columns(self.reads(cfg) if self.reads else (), {})
        return self.operator.columns(self.stage_config(cfg), **self.context(cfg))

    def drop_reasons(self, cfg: "JobConfig | None" = None) -> tuple[DropReason, ...]:
        if self.operator is None:
            return self.reasons
        return self.operator.drop_reasons(None if cfg is None else self.stage_config(cfg))

    def drop_stage(self) -> str:
        """The ``drop_stage`` its drops carry (the operator's name)."""
        return self.operator.name if self.operator is not None else self.section

    def resources(self, cfg: "JobConfig") -> Resources | None:
        op = self.operator
        if op is None or not hasattr(op, "resources"):
            return None
        return op.resources(self.stage_config(cfg), **self.context(cfg))


def recaption_cache_root(cfg: "JobConfig") -> str:
    """Where recaptions are cached: ``recaption.cache_path``, else inside the output (a resume
    reuses it; point a recurring refresh at one shared path to reuse it across runs)."""
    return cfg.recaption.cache_path or join(cfg.output.path, "_cache", "recaption")


def _clip_files(cfg) -> list[str]:
    return ["clip.model_config_path"] if cfg.clip.model_config_path else []


def _clip_warnings(cfg) -> list[tuple[str, str]]:
    warning = calibration_warning(cfg.clip)
    return [("clip.min_score", warning)] if warning else []


def _with_clip(cfg) -> dict:
    return {"clip": cfg.clip}


def _safety_requires(cfg) -> list[tuple[str, str]]:
    r = cfg.safety.rigid
    if r and r.backbone == "open_clip" and r.encoder is None and not cfg.clip.enabled:
        return [("safety.rigid.encoder", "null needs clip.enabled (or give an encoder)")]
    return []


def _safety_files(cfg) -> list[str]:
    s = cfg.safety
    keys = ["safety.embedder.model_config_path"] if s.embedding_heads() and s.embedder.model_config_path else []
    r = s.rigid
    if r and r.backbone == "open_clip" and r.encoder and r.encoder.model_config_path:
        keys.append("safety.rigid.encoder.model_config_path")
    return keys


def _reward_requires(cfg) -> list[tuple[str, str]]:
    r = cfg.reward
    if r.backbone_type == "open_clip" and r.backbone is None and not cfg.clip.enabled:
        return [("reward.backbone", "null needs clip.enabled (or give a backbone)")]
    return []


def _reward_files(cfg) -> list[str]:
    r = cfg.reward
    keys = ["reward.backbone.model_config_path"] if r.backbone and r.backbone.model_config_path else []
    return keys + (["reward.blip_path"] if r.blip_path else [])


def _recaption_files(cfg) -> list[str]:
    rc = cfg.recaption
    parts = [("recaption", rc)]
    if rc.textualize.enabled:  # Image Textualization's detector and rewriter
        parts += [("recaption.textualize.detector", rc.textualize.detector),
                  ("recaption.textualize.rewriter", rc.textualize.rewriter)]
    keys = []
    for prefix, part in parts:
        if part.model_config_path:
            keys.append(f"{prefix}.model_config_path")
        if part.model and part.model.startswith((".", "/")):  # a local dir, not an HF id, file:// or s3://
            keys.append(f"{prefix}.model")
    return keys


def _safety_models(cfg) -> dict:
    return {f"safety.{k}": v for k, v in safety_report(cfg.safety, cfg.clip).items()}


def _dedup_reads(cfg) -> tuple[str, ...]:
    return cfg.dedup.reads()


def _coreset_reads(cfg) -> tuple[str, ...]:
    return ("clip_image_embedding",) if cfg.coreset.enabled else ()


def _coreset_requires(cfg) -> list[tuple[str, str]]:
    if cfg.coreset.enabled and cfg.coreset.target is None:
        return [("coreset.target", "the coreset needs a target set (a URL list, an image folder or Parquet)")]
    return []


def _selection_reads(cfg) -> tuple[str, ...]:
    return tuple(column for column, _ in cfg.selection.fractions().values())


STAGES: tuple[Stage, ...] = (
    Stage("download", DownloadConfig, HttpDownloader, DOWNLOAD_ACTOR, always=True),
    Stage("images", ImageConfig, ImageProcessor, DOWNLOAD_ACTOR, always=True),
    Stage("clip", ClipConfig, ClipEmbedder, ACTOR_POOL, report=lambda cfg: {"clip": clip_report(cfg.clip)},
          warnings=_clip_warnings, local_files=_clip_files,
          writer_hint="clip.enabled: true (embeddings also need clip.write_embeddings)"),
    # The safety stage reuses the CLIP stage's embeddings only when that runs safety.embedder's model.
    Stage("safety", SafetyConfig, SafetyScorer, ACTOR_POOL, kwargs=_with_clip, context=_with_clip,
          report=_safety_models, requires=_safety_requires, local_files=_safety_files,
          writer_hint="safety.enabled: true with the head configured"),
    # Recaptioning runs after the filters (only kept samples cost generation) and before the reward
    # model, which ranks the recaption against the alt-texts.
    Stage("recaption", RecaptionConfig, Recaptioner, ACTOR_POOL,
          kwargs=lambda cfg: {"cache_root": recaption_cache_root(cfg)},
          report=lambda cfg: {"recaption": recaption_report(cfg.recaption)}, local_files=_recaption_files,
          writer_hint="recaption.enabled: true"),
    Stage("reward", RewardConfig, RewardScorer, ACTOR_POOL, kwargs=lambda cfg: {"clip": cfg.clip},
          report=lambda cfg: {"reward": reward_report(cfg.reward, cfg.clip)}, requires=_reward_requires,
          local_files=_reward_files, writer_hint="reward.enabled: true"),
    # Phase 2, in the order jobs/phase2.py runs the steps: dedup first (copies take no places in a
    # top fraction), then the selections.
    Stage("dedup", DedupConfig, None, PHASE2, reads=_dedup_reads, reasons=DEDUP_REASONS,
          writer_hint="the images stage (always on)"),
    Stage("selection", SelectionConfig, None, PHASE2, reads=_selection_reads, reasons=(TOP_FRACTION_REASON,)),
    Stage("coreset", CoresetConfig, None, PHASE2, reads=_coreset_reads, reasons=(NOT_IN_CORESET,),
          requires=_coreset_requires),
    # The published snapshot of what phase 2 kept (operators/snapshot.py): no drops, reads what is there.
    Stage("publish", PublishConfig, None, PHASE2),
    # kNN indices over the new snapshot's embeddings (operators/index.py).
    Stage("index", IndexConfig, None, PHASE2),
)

# The plan (phase 0) is not a stage of the list: it makes the rows every stage starts from.
PLAN_STAGE = "plan"


def stage(section: str) -> Stage:
    return next(s for s in STAGES if s.section == section)


def enabled_stages(cfg: "JobConfig") -> list[Stage]:
    return [s for s in STAGES if s.enabled(cfg)]


def model_stages(cfg: "JobConfig") -> list[tuple[Stage, BaseModel, dict]]:
    """The enabled actor-pool stages in pipeline order: (stage, its config, constructor kwargs)."""
    return [(s, s.stage_config(cfg), s.kwargs(cfg)) for s in enabled_stages(cfg) if s.runs_in == ACTOR_POOL]


def models_of(cfg: "JobConfig") -> dict:
    """What the manifest says about each model of the enabled stages; random weights are called so."""
    out: dict = {}
    for s in enabled_stages(cfg):
        if s.report is not None:
            out.update(s.report(cfg))
    return out


def config_errors(cfg: "JobConfig") -> list[tuple[str, str]]:
    """Every cross-section problem of a validated config: the stages' own requirements, then the
    column chain. Each is (key, message)."""
    errors = [e for s in enabled_stages(cfg) for e in s.requires(cfg)]
    return errors + chain_errors(cfg)


def config_warnings(cfg: "JobConfig") -> list[tuple[str, str]]:
    """The enabled stages' doubts about a valid config ((key, message)); the job logs them, validate prints them."""
    return [w for s in enabled_stages(cfg) for w in s.warnings(cfg)]


def chain_errors(cfg: "JobConfig") -> list[tuple[str, str]]:
    """Every column an enabled stage reads must be written by the plan or an earlier enabled stage."""
    have = set(PLAN_COLUMNS)
    errors = []
    for i, s in enumerate(STAGES):
        if not s.enabled(cfg):
            continue
        cols = s.columns(cfg)
        for c in cols.reads:
            if c in have:
                continue
            writers = [w for w in STAGES[:i] if w.operator is not None and _could_write(w, c)]
            hint = "; ".join(f"{w.section} writes it with {w.writer_hint}" for w in writers) or "nothing writes it"
            errors.append((s.section, f"the {s.section} stage reads {c!r}, which no earlier stage writes ({hint})"))
        have |= set(cols.writes)
    return errors


def _could_write(s: Stage, column: str) -> bool:
    """Whether the stage writes ``column`` with its defaults or its class declaration (for an error's hint)."""
    if column in s.operator.writes:
        return True
    try:
        return column in s.operator.columns(s.config()).writes
    except Exception:  # noqa: BLE001 - a config that needs more than defaults: no hint from it
        return False


def describe(cfg: "JobConfig", plan=None) -> str:
    """The chain as a table: stage, where it runs, reads, writes, resources, model."""
    models = models_of(cfg)
    rows = [(PLAN_STAGE, "plan tasks", "input files", ", ".join(PLAN_COLUMNS), "")]
    for s in enabled_stages(cfg):
        cols = s.columns(cfg)
        res = s.resources(cfg)
        where = s.runs_in
        if res is not None:
            pool = res.pool if s.runs_in == ACTOR_POOL else None
            if plan is not None and s.section in plan.pools:
                pool = plan.pools[s.section]
            where += f" ({res.num_cpus:g} CPU, {res.num_gpus:g} GPU" + (f", pool {pool[0]}-{pool[1]}" if pool else "") + ")"
        mine = {k: v for k, v in models.items() if k == s.section or k.startswith(s.section + ".")}
        model = "; ".join(f"{k}={m.get('model')}" + (" (RANDOM WEIGHTS)" if m.get("random_weights") else
                                                       f" ({m.get('pretrained')})") for k, m in mine.items())
        reads = ", ".join(cols.reads) + (f" [optional: {', '.join(cols.optional)}]" if cols.optional else "")
        rows.append((s.section, where, reads, ", ".join(cols.writes), model))
    warnings: dict[str, list[str]] = {}
    for key, msg in config_warnings(cfg):
        warnings.setdefault(key.split(".")[0], []).append(f"{key}: {msg}")
    out = []
    for name, where, reads, writes, model in rows:
        out.append(f"{name}  [{where}]")
        out.append(f"    reads:  {reads or '-'}")
        out.append(f"    writes: {writes or '-'}")
        if model:
            out.append(f"    model:  {model}")
        out.extend(f"    WARNING: {w}" for w in warnings.get(name, []))
    return "\n".join(out)


def reason_table() -> str:
    """README's drop-reason table, from the stages' declarations (tests/test_docs.py keeps README current)."""
    lines = ["| stage | status | reason | meaning |", "|---|---|---|---|"]
    from operators.refresh import REFRESH_REASONS, REFRESH_STAGE

    entries = [(PLAN_STAGE, r) for r in PLAN_REASONS] + [(s.drop_stage(), r) for s in STAGES for r in s.drop_reasons()]
    entries += [(REFRESH_STAGE, r) for r in REFRESH_REASONS]
    for stage_name, r in entries:
        shown = r.name.replace("{", "<").replace("}", ">")
        lines.append(f"| {stage_name} | {r.status} | `{shown}` | {r.meaning} |")
    return "\n".join(lines)
