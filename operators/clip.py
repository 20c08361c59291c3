"""ClipEmbedder: open_clip image and text embeddings and the image-text cosine ``clip_score``.

Methods: LAION-5B (Schuhmann et al., 2022) keeps pairs whose OpenAI CLIP ViT-B/32 image-text
cosine is at least 0.28 (English; 0.26 for other languages with multilingual CLIP), LAION-400M
(Schuhmann et al., 2021) at least 0.3 with the same model; DataComp (Gadre et al., 2023) keeps
the top 30% by OpenAI ViT-L/14 score (a fraction, no threshold). This operator computes the
scores (every caption of a sample, and the maximum) and applies the absolute threshold; the
global top fraction is a phase-2 step over the whole run. A threshold is only meaningful for
the weights it was calibrated on (cosine scales differ between CLIP models):
``calibration_warning`` says when ``min_score`` is set for other weights.

The model is named by a spec: an open_clip model name plus a pretrained tag, an
``hf-hub:`` id, or a checkpoint at a local path, ``file://`` or ``s3://``. With
``pretrained: null`` the weights are random (tests, dry run), and the run manifest says so.
Loading, decoding (nvJPEG on CUDA, Pillow plus open_clip's preprocessing on CPU) and encoding
are ``ClipModel``'s (operators/models/clip.py).
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import ConfigDict, Field

from operators.base import (DECODE_ERROR, DROPPED, Columns, DropReason, KeptRowsStage, Resources, Scored,
                            StageResources, model_stage_resources)
from operators.models.clip import ClipModel
from operators.storage import StorageConfig

log = logging.getLogger(__name__)

IMAGE_EMBEDDING = "clip_image_embedding"
TEXT_EMBEDDING = "clip_text_embedding"

CLIP_BELOW = DropReason("clip_below_{min_score}", DROPPED,
                        "the best caption's CLIP image-text cosine is below clip.min_score")
NO_CAPTION = DropReason("no_caption", DROPPED, "no caption to score (only when clip.min_score is set)")


class ClipConfig(StageResources):
    """CLIP stage settings (``clip:`` in the job config)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = Field(False, description="run the CLIP stage (image-text cosine of every caption)")
    model: str = Field("ViT-B-32", description=(
        "open_clip model name, or hf-hub:ORG/NAME (LAION's 0.28 filter: ViT-B-32-quickgelu with pretrained "
        "openai; open_clip 3's ViT-B-32 uses GELU, not OpenAI's QuickGELU)"))
    pretrained: str | None = Field("laion2b_s34b_b79k", description=(
        "pretrained tag, checkpoint path / file:// / s3://, or null = random; the default laion2b_s34b_b79k "
        "has no calibrated min_score (LAION's 0.28 is for OpenAI's ViT-B/32)"))
    model_config_path: str | None = Field(None, description="JSON of a custom open_clip architecture to register")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when the actor has a GPU, else CPU")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    decode: Literal["auto", "gpu", "cpu"] = Field("auto", description="auto: nvJPEG on CUDA, Pillow on CPU")
    min_score: float | None = Field(None, ge=-1, le=1, description=(
        "drop below this cosine; calibrated only for OpenAI ViT-B/32 (LAION-5B: 0.28, LAION-400M: 0.3); "
        "other weights log a warning"))
    write_embeddings: bool = Field(True, description="write clip_image_embedding / clip_text_embedding "
                                                        "(float16, fixed size)")
    cache_dir: str | None = Field(None, description="where s3:// checkpoints are copied (default: a temp dir)")
    batch_size: int = Field(256, ge=1, description="rows per actor call")
    micro_batch: int = Field(256, ge=1, description="images decoded while the previous ones are encoded")

    def random_weights(self) -> bool:
        return self.pretrained is None and not self.model.startswith("hf-hub:")


def threshold_reason(min_score: float) -> str:
    return CLIP_BELOW.format(min_score=min_score)


# Published CLIP-score filters: (model, pretrained) as open_clip names them -> {threshold: where}.
# DataComp (Gadre et al., 2023) ranks by OpenAI ViT-L/14 score and keeps a fraction (top 30%),
# which is selection.clip_top_fraction here, not a threshold.
CALIBRATIONS: dict[tuple[str, str], dict[float, str]] = {
    ("ViT-B-32-quickgelu", "openai"): {0.28: "LAION-5B, English (Schuhmann et al., 2022)",
                                       0.3: "LAION-400M (Schuhmann et al., 2021)"},
}


def calibration_warning(cfg: ClipConfig) -> str | None:
    """Why ``clip.min_score`` is not a published calibration for these weights, or None when it is
    (or when no threshold is set). LAION's thresholds hold for OpenAI's ViT-B/32 only."""
    t = cfg.min_score
    if t is None:
        return None
    key = (cfg.model, cfg.pretrained)
    if key == ("ViT-B-32", "openai"):
        return (f"clip.min_score {t:g} with clip.model ViT-B-32 and pretrained openai: open_clip builds ViT-B-32 with "
                "GELU but OpenAI's weights, on which LAION calibrated 0.28, use QuickGELU; set clip.model: "
                "ViT-B-32-quickgelu")
    known = CALIBRATIONS.get(key)
    if known is not None:
        if any(abs(t - v) < 1e-9 for v in known):
            return None
        published = "; ".join(f"{v:g}: {where}" for v, where in known.items())
        return f"clip.min_score {t:g} is not a published threshold for {cfg.model}/{cfg.pretrained} ({published})"
    return (f"clip.min_score {t:g} with {cfg.model}/{cfg.pretrained}: no published threshold is calibrated for these "
            "weights (LAION's 0.28 is for OpenAI ViT-B/32: clip.model ViT-B-32-quickgelu, pretrained openai; cosine "
            "scales differ between CLIP models); DataComp ranks instead and keeps a fraction "
            "(selection.clip_top_fraction)")


class ClipEmbedder(KeptRowsStage):
    """Writes ``clip_image_embedding``, ``clip_text_embedding`` (best caption), ``clip_scores``, ``clip_score``."""

    name: ClassVar[str] = "clip"
    reads = ("status", "image", "captions")
    writes = ("clip_image_embedding", "clip_text_embedding", "clip_scores", "clip_score", "clip_best_caption")
    reasons = (CLIP_BELOW, NO_CAPTION, DECODE_ERROR)

    def __init__(self, config: ClipConfig | dict | None = None, storage: StorageConfig | dict | None = None):
        self.config = config if isinstance(config, ClipConfig) else ClipConfig(**(config or {}))
        self.storage = storage if isinstance(storage, StorageConfig) or storage is None else StorageConfig(**storage)
        self.model: ClipModel | None = None
        warning = calibration_warning(self.config)
        if warning:
            log.warning("%s", warning)

    @classmethod
    def resources(cls, config: ClipConfig) -> Resources:
        return model_stage_resources(config)

    @classmethod
    def columns(cls, config: ClipConfig | None = None) -> Columns:
        c = config or ClipConfig()
        writes: dict = {"clip_scores": pa.list_(pa.float32()), "clip_score": pa.float32(),
                        "clip_best_caption": pa.int16()}
        if c.write_embeddings:  # fixed-size lists of the model's width: known once it is loaded
            writes[IMAGE_EMBEDDING] = None
            writes[TEXT_EMBEDDING] = None
        return Columns(cls.reads, writes)

    @classmethod
    def drop_reasons(cls, config: ClipConfig | None = None) -> tuple[DropReason, ...]:
        if config is None or config.min_score is not None:
            return cls.reasons
        return (DECODE_ERROR,)

    # -- state, once per actor ----------------------------------------------------------------
    def setup(self) -> None:
        if self.model is None:
            self.model = ClipModel(self.config, self.storage)

    def output_type(self, column: str) -> pa.DataType:
        if column in (IMAGE_EMBEDDING, TEXT_EMBEDDING):
            self._ensure_setup()  # the width, so every block has the same schema
            return pa.list_(pa.float16(), self.model.dim)
        return super().output_type(column)

    # -- kept rows -----------------------------------------------------------------------------
    def score(self, rows: pa.Table) -> Scored:
        import torch

        m, t = self.model, self.config.min_score
        n = rows.num_rows
        captions = rows.column("captions").to_pylist()
        img, outcomes = m.encode_images(rows.column("image").to_pylist(), self.name)
        img_out: list = [None] * n
        txt_out: list = [None] * n
        scores_out: list = [None] * n
        best_out: list = [None] * n
        good = [k for k in range(n) if outcomes[k] is None]
        if good:
            texts, owner = [], []
            for g, k in enumerate(good):
                for c in captions[k] or []:
                    texts.append(c)
                    owner.append(g)
            with torch.inference_mode():
                txt = m.encode_texts(texts) if texts else None
            img_np = img.cpu().numpy()
            txt_np = txt.cpu().numpy() if txt is not None else None
            owner_np = np.asarray(owner, dtype=np.int64)
            for g, k in enumerate(good):
                img_out[k] = img_np[g]
                mine = np.nonzero(owner_np == g)[0] if len(owner) else np.empty(0, np.int64)
                if len(mine) == 0:
                    scores_out[k] = []
                    if t is not None:
                        outcomes[k] = (NO_CAPTION.status, NO_CAPTION.name, "no caption to score")
                    continue
                s = txt_np[mine] @ img_np[g]
                best = int(np.argmax(s))
                scores_out[k] = [float(x) for x in s]
                best_out[k] = best
                txt_out[k] = txt_np[mine[best]]
                if t is not None and float(s[best]) < t:
                    outcomes[k] = (CLIP_BELOW.status, threshold_reason(t), f"clip_score {float(s[best]):.4f} < {t}")
        cols: dict = {
            "clip_scores": scores_out,
            "clip_score": [max(s) if s else None for s in scores_out],
            "clip_best_caption": best_out,
        }
        if self.config.write_embeddings:
            emb_type = pa.list_(pa.float16(), m.dim)
            cols[IMAGE_EMBEDDING] = _fixed_f16(img_out, emb_type)
            cols[TEXT_EMBEDDING] = _fixed_f16(txt_out, emb_type)
        return Scored(cols, outcomes)


def _fixed_f16(rows: list, typ: pa.DataType) -> pa.Array:
    """Embeddings as a fixed-size list of float16 (nulls where not computed)."""
    dim = typ.list_size
    flat = np.zeros((len(rows), dim), dtype=np.float16)
    valid = np.zeros(len(rows), dtype=bool)
    for i, v in enumerate(rows):
        if v is not None:
            flat[i] = v
            valid[i] = True
    values = pa.array(flat.reshape(-1), pa.float16())
    if valid.all():
        return pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~valid))


def model_report(cfg: ClipConfig) -> dict:
    """What the run manifest says about the CLIP model (random weights are called so)."""
    return {"model": cfg.model, "pretrained": cfg.pretrained, "random_weights": cfg.random_weights(),
            "min_score": cfg.min_score}
