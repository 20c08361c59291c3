"""RewardScorer: a learned image-caption reward for every candidate caption of a sample.

Compress & Align (Zhang et al., 2023, "Compress & Align: Curating Image-Text Data with Human
Knowledge") collects human rankings of several captions per image, trains a reward model on
them as pairwise comparisons, scores every (image, caption) pair of a corpus, keeps the best
caption of each image and then only the top fraction of images by reward (30% or less keeps
the downstream quality of the whole corpus). The reward model follows ImageReward (Xu et al.,
2023): a frozen-or-lightly-tuned vision-language backbone plus a small MLP head giving one
scalar, trained with the Bradley-Terry pairwise loss ``-log sigmoid(r_preferred - r_other)``;
rewards are reported standardized by the mean and std of the training rewards, as ImageReward
does, so a threshold means the same across checkpoints.

Backbones (operators/models/reward.py, with the head and its checkpoints):
- ``open_clip`` (default): the image and text towers of a CLIP model (the same specs as the
  CLIP stage: tag, ``hf-hub:``, path, ``file://``, ``s3://``); the head sees
  ``[img, txt, img * txt]`` of the L2-normalized embeddings (the last term sums to the CLIP score).
- ``blip``: a transformers ``BlipForImageTextRetrieval`` saved at a local path; the head sees
  the [CLS] state of BLIP's image-grounded text encoder, exactly ImageReward's feature.

The head checkpoint (``torch.save`` of ``{"head", "backbone_state", "meta"}``, written by
``jobs/train_reward.py``) is named by a spec (path, ``file://``, ``s3://``). With
``head_checkpoint: null`` the head has seeded random weights (tests, dry run) and
``model_report`` says so. Rows that are not kept pass through without compute.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import ConfigDict, Field, model_validator

from operators.base import (DECODE_ERROR, DROPPED, Columns, DropReason, KeptRowsStage, Resources, Scored,
                            StageResources, model_stage_resources)
from operators.clip import ClipConfig
from operators.clip import model_report as clip_model_report
from operators.models.reward import (build_head, check_meta, head_hidden_of, load_backbone, load_reward_checkpoint,
                                     load_tuned_backbone_state, pair_scores)
from operators.storage import StorageConfig, is_remote

log = logging.getLogger(__name__)

REWARD_BELOW = DropReason("reward_below_{min_reward}", DROPPED,
                          "the best caption's standardized reward is below reward.min_reward")
NO_CAPTION = DropReason("no_caption", DROPPED, "no caption to score (only when reward.min_reward is set)")


# --- config ---------------------------------------------------------------------------------
class RewardConfig(StageResources):
    """Reward stage settings (``reward:`` in the job config)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = Field(False, description="run the reward stage (Compress & Align): reward_scores per "
                                             "caption, reward, best_caption, best_caption_source")
    backbone_type: Literal["open_clip", "blip"] = Field(
        "open_clip", description="open_clip towers, or blip: a local transformers BlipForImageTextRetrieval dir")
    backbone: ClipConfig | None = Field(None, description="open_clip spec of the backbone; null = the CLIP stage's")
    blip_path: str | None = Field(None, description="local dir of a transformers BlipForImageTextRetrieval (blip)")
    head_checkpoint: str | None = Field(None, description="trained head at a path, file:// or s3://; null = random")
    head_hidden: list[int] = Field([512, 64], description="hidden widths of a random head (a checkpoint has its own)")
    min_reward: float | None = Field(None, description="drop below this standardized reward; null = score only")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when the actor has a GPU, else CPU")
    batch_size: int = Field(256, ge=1, description="rows per actor call")
    micro_batch: int = Field(256, ge=1, description="images (and 4x captions) encoded at once")

    @model_validator(mode="after")
    def _backbone_named(self):
        if self.backbone_type == "blip" and not self.blip_path:
            raise ValueError("reward.backbone_type is 'blip' but reward.blip_path is not set")
        if self.blip_path and is_remote(self.blip_path):
            raise ValueError(f"reward.blip_path must be a local directory, got {self.blip_path!r}")
        if any(h < 1 for h in self.head_hidden):
            raise ValueError(f"reward.head_hidden widths must be >= 1, got {self.head_hidden}")
        return self


def threshold_reason(t: float) -> str:
    return REWARD_BELOW.format(min_reward=t)


# --- operator ---------------------------------------------------------------------------------
class RewardScorer(KeptRowsStage):
    """Writes ``reward_scores`` (aligned with ``captions``), ``reward``, ``best_caption``, ``best_caption_source``.

    Reads ``caption_sources`` too when present (``best_caption_source`` is null otherwise).
    Blank captions get a null score and are never the best; a sample with no caption to score
    keeps a null reward, and is dropped as ``no_caption`` only when ``min_reward`` is set.
    """

    name: ClassVar[str] = "reward"
    reads = ("status", "drop_stage", "drop_reason", "error_message", "image", "captions")
    writes = ("reward_scores", "reward", "best_caption", "best_caption_source")
    types = {"reward_scores": pa.list_(pa.float32()), "reward": pa.float32(), "best_caption": pa.string(),
             "best_caption_source": pa.string()}
    reasons = (REWARD_BELOW, NO_CAPTION, DECODE_ERROR)

    def __init__(self, config: RewardConfig | dict | None = None, storage: StorageConfig | dict | None = None,
                 clip: ClipConfig | dict | None = None):
        self.config = config if isinstance(config, RewardConfig) else RewardConfig(**(config or {}))
        self.storage = storage if isinstance(storage, StorageConfig) or storage is None else StorageConfig(**storage)
        self.clip = clip if isinstance(clip, ClipConfig) or clip is None else ClipConfig(**clip)
        c = self.config
        if c.backbone_type == "open_clip" and c.backbone is None and self.clip is None:
            raise ValueError("reward.backbone is null (use the CLIP stage's model) but no clip config was given")
        self._head = None

    @classmethod
    def resources(cls, config: RewardConfig) -> Resources:
        return model_stage_resources(config)

    @classmethod
    def columns(cls, config: RewardConfig | None = None) -> Columns:
        return Columns(cls.reads, dict(cls.types), optional=("caption_sources",))

    @classmethod
    def drop_reasons(cls, config: RewardConfig | None = None) -> tuple[DropReason, ...]:
        if config is None or config.min_reward is not None:
            return cls.reasons
        return (DECODE_ERROR,)

    def backbone_config(self) -> ClipConfig | None:
        return self.config.backbone or self.clip

    # -- state, once per actor ----------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        self._backbone = load_backbone(c.backbone_type, self.backbone_config(), c.blip_path, self.storage, c.device,
                                       c.micro_batch)
        self.device = self._backbone.device
        self._mean, self._std = 0.0, 1.0
        if c.head_checkpoint is None:
            head = build_head(self._backbone.feature_dim, list(c.head_hidden))
        else:
            ckpt = load_reward_checkpoint(c.head_checkpoint, self.storage)
            meta = ckpt["meta"]
            check_meta(meta, self._backbone, c.head_checkpoint)
            load_tuned_backbone_state(self._backbone, ckpt.get("backbone_state"), c.head_checkpoint)
            head = build_head(self._backbone.feature_dim, head_hidden_of(ckpt["head"]))
            head.load_state_dict(ckpt["head"])
            self._mean, self._std = float(meta.get("reward_mean", 0.0)), float(meta.get("reward_std", 1.0)) or 1.0
        self._head = head.to(self.device).eval()

    # -- kept rows -----------------------------------------------------------------------------
    def score(self, rows: pa.Table) -> Scored:
        import torch

        n = rows.num_rows
        t = self.config.min_reward
        scores_out: list = [None] * n
        reward_out: list = [None] * n
        best_out: list = [None] * n
        source_out: list = [None] * n
        captions = rows.column("captions").to_pylist()
        sources = (rows.column("caption_sources").to_pylist() if "caption_sources" in rows.column_names
                   else [None] * n)
        with torch.inference_mode():
            states, outcomes = self._backbone.encode_blobs(rows.column("image").to_pylist(), stage=self.name)
            good = [k for k in range(n) if outcomes[k] is None]
            texts, owner, where = [], [], []
            for g, k in enumerate(good):
                caps = captions[k] or []
                scores_out[k] = [None] * len(caps)
                for j, cap in enumerate(caps):
                    if cap is not None and cap.strip():
                        texts.append(cap)
                        owner.append(g)
                        where.append((k, j))
            if texts:
                feats = self._backbone.features(states, texts, torch.as_tensor(owner, device=states.device))
                r = pair_scores(self._head, feats, self._mean, self._std).float().cpu().numpy()
                for (k, j), v in zip(where, r):
                    scores_out[k][j] = float(v)
        for k in good:
            vals = [(v, j) for j, v in enumerate(scores_out[k]) if v is not None and math.isfinite(v)]
            if not vals:
                if t is not None:
                    outcomes[k] = (NO_CAPTION.status, NO_CAPTION.name, "no caption to score")
                continue
            v, j = max(vals)  # ties: the later caption (recaptions come last) wins
            reward_out[k] = v
            best_out[k] = captions[k][j]
            src = sources[k]
            source_out[k] = src[j] if src is not None and len(src) == len(captions[k]) else None
            if t is not None and v < t:
                outcomes[k] = (REWARD_BELOW.status, threshold_reason(t), f"reward {v:.4f} < {t:g}")
        return Scored({"reward_scores": scores_out, "reward": reward_out, "best_caption": best_out,
                       "best_caption_source": source_out}, outcomes)


# --- reporting --------------------------------------------------------------------------------
def model_report(cfg: RewardConfig, clip: ClipConfig | None = None) -> dict:
    """What the run manifest says about the reward model; random weights are called so."""
    if cfg.backbone_type == "blip":
        backbone = {"model": "blip-itm", "pretrained": cfg.blip_path, "random_weights": False}
    else:
        spec = cfg.backbone or clip
        backbone = clip_model_report(spec) if spec is not None else {"model": None, "pretrained": None,
                                                                      "random_weights": None}
    head_random = cfg.head_checkpoint is None
    return {"model": f"reward-mlp on {cfg.backbone_type}:{backbone['model']}", "pretrained": cfg.head_checkpoint,
            "random_weights": bool(head_random or backbone.get("random_weights")),
            "head_random_weights": head_random, "backbone": backbone["model"],
            "backbone_pretrained": backbone["pretrained"], "backbone_random_weights": backbone.get("random_weights"),
            "min_reward": cfg.min_reward}

