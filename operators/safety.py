"""SafetyScorer: LAION-5B's safety and quality scores, and an optional RIGID AI-image score.

LAION-5B (Schuhmann et al., 2022) publishes, per sample, an NSFW probability ``punsafe`` and a
watermark probability ``pwatermark``, and LAION-Aesthetics an ``aesthetic`` score:

- NSFW: LAION-AI/CLIP-based-NSFW-Detector, an MLP on the L2-normalized CLIP image embedding.
- Aesthetic predictor v2: christophschuhmann/improved-aesthetic-predictor, an MLP on the
  L2-normalized CLIP image embedding.
- Watermark: LAION-AI/LAION-5B-WatermarkDetection (``inference.py``): a timm EfficientNet-B3
  with LAION's 2-class MLP head on the squash-resized image.
- RIGID (He, Chen and Ho, 2024, "RIGID: A Training-free and Model-Agnostic Framework for
  Robust AI-Generated Image Detection"; IBM/RIGID): the cosine between an encoder's embeddings
  of an image and of the image plus Gaussian noise (scale 0.05 in normalized pixel space);
  real images are more robust, so lower similarity means more likely AI-generated. The paper
  uses DINOv2; the method is model-agnostic and this operator uses an open_clip image encoder.

The three LAION models (architectures, module names that load the released weights) are in
operators/models/laion.py; the RIGID encoder is a ``ClipModel`` (operators/models/clip.py).

The embedding heads are nearly free, so they run first and their drops are marked before the
watermark CNN and RIGID (two encoder passes) run on what is still kept. Rows dropped earlier
pass through untouched. A head whose ``checkpoint`` is null gets seeded random weights
(tests, dry run), and ``model_report`` says so.
"""

from __future__ import annotations

import hashlib
import logging
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.base import (DECODE_ERROR, DROPPED, Columns, DropReason, KeptRowsStage, Resources, Scored,
                            StageResources, model_stage_resources)
from operators.clip import ClipConfig
from operators.clip import model_report as clip_model_report
from operators.models.clip import ClipModel
from operators.models.common import decode_all, resolve_device
from operators.models.laion import (build_aesthetic_head, build_nsfw_head, build_watermark_model, load_state,
                                    watermark_inputs)
from operators.storage import StorageConfig

log = logging.getLogger(__name__)

EMBEDDING = "clip_image_embedding"
# Per head: its config key and the column it writes.
HEAD_COLUMNS = (("nsfw", "punsafe"), ("aesthetic", "aesthetic"), ("watermark", "pwatermark"),
                ("rigid", "rigid_similarity"))

NSFW_ABOVE = DropReason("nsfw_above_{max_punsafe}", DROPPED,
                        "LAION NSFW detector's punsafe is above safety.nsfw.max_punsafe")
AESTHETIC_BELOW = DropReason("aesthetic_below_{min_aesthetic}", DROPPED,
                             "LAION aesthetic v2 score is below safety.aesthetic.min_aesthetic")
WATERMARK_ABOVE = DropReason("watermark_above_{max_pwatermark}", DROPPED,
                             "LAION watermark detector's pwatermark is above safety.watermark.max_pwatermark")
RIGID_BELOW = DropReason("rigid_below_{min_similarity}", DROPPED,
                         "RIGID noise-robustness similarity is below safety.rigid.min_similarity (likely generated)")


# --- config ---------------------------------------------------------------------------------
class HeadSpec(BaseModel):
    """A head on the CLIP image embedding."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    checkpoint: str | None = Field(None, description="state_dict at a path, file:// or s3://; null = random weights")
    embed_dim: int = Field(768, ge=1, description="CLIP image embedding width (768: ViT-L/14, 512: ViT-B/32)")


class NsfwSpec(HeadSpec):
    """LAION CLIP-based NSFW detector; drops when ``punsafe > max_punsafe``."""

    hidden_dims: list[int] = Field([64, 512, 256], min_length=1,
                                   description="LAION ViT-L/14: [64, 512, 256]; ViT-B/32: [32, 32]")
    max_punsafe: float | None = Field(0.5, ge=0, le=1, description="drop above this; null = score only")


class AestheticSpec(HeadSpec):
    """LAION aesthetic predictor v2; drops when ``aesthetic < min_aesthetic``."""

    min_aesthetic: float | None = Field(None, description="drop below this (LAION-Aesthetics: 4.5..6.5); null = score")


class WatermarkSpec(BaseModel):
    """LAION-5B watermark classifier: a timm image model with LAION's 2-class MLP head."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    checkpoint: str | None = Field(None, description="state_dict at a path, file:// or s3://; null = random weights")
    timm_model: str = Field("efficientnet_b3", description="LAION: efficientnet_b3a (timm maps it to efficientnet_b3)")
    head_dims: list[int] = Field([625, 256], description="hidden widths of LAION's classifier head")
    image_size: int = Field(256, ge=8, le=4096, description="squashed to size x size, as LAION (no crop)")
    watermark_class: int = Field(0, ge=0, le=1, description="softmax column of 'watermark' (LAION: 0)")
    max_pwatermark: float | None = Field(0.8, ge=0, le=1, description="drop above this; null = score only")


class RigidSpec(BaseModel):
    """RIGID: cosine between embeddings of an image and of a noise-perturbed copy."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    encoder: ClipConfig | None = Field(None, description="open_clip encoder spec; null = the CLIP stage's model")
    noise_scale: float = Field(0.05, ge=0, description="std of the Gaussian noise in normalized pixel space")
    seed: int = Field(0, description="noise seed, mixed with each sample_id (same score on reruns)")
    min_similarity: float | None = Field(None, ge=-1, le=1, description="drop below this; null = score only")


class SafetyConfig(StageResources):
    """Safety stage settings (``safety:`` in the job config); each head is optional."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = Field(False, description="run the safety stage (the heads configured below)")
    nsfw: NsfwSpec | None = None
    aesthetic: AestheticSpec | None = None
    watermark: WatermarkSpec | None = None
    rigid: RigidSpec | None = None
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: a GPU only when the watermark or RIGID model is on (MLP heads run on CPU)")
    cache_dir: str | None = Field(None, description="where s3:// checkpoints are copied (default: a temp dir)")
    batch_size: int = Field(256, ge=1, description="rows per actor call")
    num_gpus: float = Field(1.0, ge=0, description="per actor, when a GPU is used; 0 runs on CPU")

    @model_validator(mode="after")
    def _has_a_head(self):
        if self.enabled and not self.heads():
            raise ValueError("safety.enabled is true but no head is configured (nsfw, aesthetic, watermark, rigid)")
        return self

    def heads(self) -> list[str]:
        return [h for h in ("nsfw", "aesthetic", "watermark", "rigid") if getattr(self, h) is not None]

    def uses_images(self) -> bool:
        return self.watermark is not None or self.rigid is not None


def nsfw_reason(t: float) -> str:
    return NSFW_ABOVE.format(max_punsafe=t)


def watermark_reason(t: float) -> str:
    return WATERMARK_ABOVE.format(max_pwatermark=t)


def aesthetic_reason(t: float) -> str:
    return AESTHETIC_BELOW.format(min_aesthetic=t)


def rigid_reason(t: float) -> str:
    return RIGID_BELOW.format(min_similarity=t)


# --- operator -------------------------------------------------------------------------------
class SafetyScorer(KeptRowsStage):
    """Writes ``punsafe``, ``aesthetic``, ``pwatermark`` and ``rigid_similarity`` (those configured)."""

    name: ClassVar[str] = "safety"
    reads = ("status", "drop_stage", "drop_reason", "error_message")
    writes = tuple(col for _, col in HEAD_COLUMNS)  # every head's; ``columns`` says which with a config
    reasons = (NSFW_ABOVE, AESTHETIC_BELOW, WATERMARK_ABOVE, RIGID_BELOW, DECODE_ERROR)

    def __init__(self, config: SafetyConfig | dict | None = None, storage: StorageConfig | dict | None = None,
                 clip: ClipConfig | dict | None = None):
        self.config = config if isinstance(config, SafetyConfig) else SafetyConfig(**(config or {}))
        self.storage = storage if isinstance(storage, StorageConfig) or storage is None else StorageConfig(**storage)
        self.clip = clip if isinstance(clip, ClipConfig) or clip is None else ClipConfig(**clip)
        c = self.config
        if c.rigid is not None and c.rigid.encoder is None and self.clip is None:
            raise ValueError("safety.rigid.encoder is null (use the CLIP stage's model) but no clip config was given")
        self._ready = False

    @classmethod
    def resources(cls, config: SafetyConfig) -> Resources:
        # Embedding heads alone are tiny MLPs: with device auto they need no GPU.
        return model_stage_resources(config, needs_gpu=config.device != "auto" or config.uses_images())

    @classmethod
    def columns(cls, config: SafetyConfig | None = None) -> Columns:
        c = config or SafetyConfig()
        reads = list(cls.reads)
        if c.nsfw is not None or c.aesthetic is not None:
            reads.append(EMBEDDING)
        if c.uses_images():
            reads.append("image")
        if c.rigid is not None:
            reads.append("sample_id")
        return Columns(tuple(reads), {col: pa.float32() for head, col in HEAD_COLUMNS if getattr(c, head) is not None})

    @classmethod
    def drop_reasons(cls, config: SafetyConfig | None = None) -> tuple[DropReason, ...]:
        if config is None:
            return cls.reasons
        c = config
        out = []
        if c.nsfw is not None and c.nsfw.max_punsafe is not None:
            out.append(NSFW_ABOVE)
        if c.aesthetic is not None and c.aesthetic.min_aesthetic is not None:
            out.append(AESTHETIC_BELOW)
        if c.watermark is not None and c.watermark.max_pwatermark is not None:
            out.append(WATERMARK_ABOVE)
        if c.rigid is not None and c.rigid.min_similarity is not None:
            out.append(RIGID_BELOW)
        if c.uses_images():
            out.append(DECODE_ERROR)
        return tuple(out)

    def rigid_encoder_config(self) -> ClipConfig | None:
        r = self.config.rigid
        return None if r is None else (r.encoder or self.clip)

    # -- state, once per actor ----------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        self.device = resolve_device(c.device, use_gpu=self.resources(c).num_gpus > 0)
        self._nsfw = self._aesthetic = self._watermark = self._rigid = None
        args = (self.storage, c.cache_dir)
        if c.nsfw is not None:
            self._nsfw = load_state(build_nsfw_head(c.nsfw), c.nsfw.checkpoint, "nsfw", *args).to(self.device)
        if c.aesthetic is not None:
            self._aesthetic = load_state(build_aesthetic_head(c.aesthetic), c.aesthetic.checkpoint, "aesthetic",
                                         *args).to(self.device)
        if c.watermark is not None:
            self._watermark = load_state(build_watermark_model(c.watermark), c.watermark.checkpoint, "watermark",
                                         *args).to(self.device)
        if c.rigid is not None:
            self._rigid = ClipModel(self.rigid_encoder_config(), self.storage, self.device)
        self._ready = True

    # -- batch ---------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        if c.nsfw is not None or c.aesthetic is not None:  # from the type: also on a batch with nothing kept
            self._check_embed_dims(batch.schema.field(EMBEDDING).type)
        return super().process(batch)

    def score(self, rows: pa.Table) -> Scored:
        c = self.config
        n = rows.num_rows
        outcomes: list = [None] * n
        cols: dict[str, list] = {col: [None] * n for col in self.declared().writes}
        if c.nsfw is not None or c.aesthetic is not None:
            self._score_embeddings(rows, cols, outcomes)
        if c.uses_images():
            todo = [k for k in range(n) if outcomes[k] is None]
            if todo:
                self._score_images(rows, todo, cols, outcomes)
        return Scored(cols, outcomes)

    def _check_embed_dims(self, typ: pa.DataType, width: int | None = None) -> None:
        if width is None:
            if not pa.types.is_fixed_size_list(typ):
                return  # variable-size lists: checked on the rows themselves
            width = typ.list_size
        for head in ("nsfw", "aesthetic"):
            spec = getattr(self.config, head)
            if spec is not None and spec.embed_dim != width:
                raise ValueError(f"safety.{head}.embed_dim is {spec.embed_dim} but {EMBEDDING} has width {width}: "
                                 f"set safety.{head}.embed_dim to the CLIP model's embedding width ({width})")

    def _score_embeddings(self, rows: pa.Table, cols: dict, outcomes: list) -> None:
        import torch

        c = self.config
        column = rows.column(EMBEDDING)
        idx = [k for k, v in enumerate(pc.is_valid(column).to_pylist()) if v]
        if not idx:
            return
        embs = column.take(pa.array(idx, pa.int64())).combine_chunks()
        flat = embs.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        if flat.size % len(idx) or (not pa.types.is_fixed_size_list(embs.type)
                                    and len(set(pc.list_value_length(embs).to_pylist())) != 1):
            raise ValueError(f"{EMBEDDING}: rows of different widths in one batch")
        width = flat.size // len(idx)
        self._check_embed_dims(embs.type, width)
        with torch.inference_mode():
            x = torch.from_numpy(flat.reshape(len(idx), width)).to(self.device)
            x = torch.nn.functional.normalize(x, dim=-1)  # LAION's heads take L2-normalized embeddings
            punsafe = self._nsfw(x).float().cpu().numpy() if self._nsfw is not None else None
            aesthetic = self._aesthetic(x).float().cpu().numpy() if self._aesthetic is not None else None
        for j, k in enumerate(idx):
            if punsafe is not None:
                p = float(punsafe[j])
                cols["punsafe"][k] = p
                t = c.nsfw.max_punsafe
                if t is not None and p > t:
                    outcomes[k] = (NSFW_ABOVE.status, nsfw_reason(t), f"punsafe {p:.4f} > {t:g}")
            if aesthetic is not None:
                a = float(aesthetic[j])
                cols["aesthetic"][k] = a
                t = c.aesthetic.min_aesthetic
                if outcomes[k] is None and t is not None and a < t:
                    outcomes[k] = (AESTHETIC_BELOW.status, aesthetic_reason(t), f"aesthetic {a:.4f} < {t:g}")

    def _score_images(self, rows: pa.Table, idx: list[int], cols: dict, outcomes: list) -> None:
        blobs = rows.column("image").take(pa.array(idx, pa.int64())).to_pylist()
        decoded, failures = decode_all(blobs, self.name)
        images: dict[int, object] = {}
        for k, im, failure in zip(idx, decoded, failures):
            if failure is not None:
                outcomes[k] = failure
            else:
                images[k] = im
        if self._watermark is not None and images:
            self._score_watermark(images, cols, outcomes)
        todo = {k: im for k, im in images.items() if outcomes[k] is None}
        if self._rigid is not None and todo:
            self._score_rigid(todo, rows.column("sample_id").to_pylist(), cols, outcomes)

    def _score_watermark(self, images: dict, cols: dict, outcomes: list) -> None:
        import torch

        spec = self.config.watermark
        with torch.inference_mode():
            x = torch.from_numpy(watermark_inputs(list(images.values()), spec.image_size)).to(self.device)
            probs = torch.softmax(self._watermark(x).float(), dim=1)[:, spec.watermark_class].cpu().numpy()
        t = spec.max_pwatermark
        for j, k in enumerate(images):
            p = float(probs[j])
            cols["pwatermark"][k] = p
            if t is not None and p > t:
                outcomes[k] = (WATERMARK_ABOVE.status, watermark_reason(t), f"pwatermark {p:.4f} > {t:g}")

    def _score_rigid(self, images: dict, ids: list, cols: dict, outcomes: list) -> None:
        import torch

        spec = self.config.rigid
        encoder = self._rigid
        order = list(images)
        clean = encoder.preprocess_pil([images[k] for k in order])
        noise = torch.stack([torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(
            _noise_seed(spec.seed, ids[k]))) for k in order])
        noisy = clean + spec.noise_scale * noise
        with torch.inference_mode():
            emb = encoder.encode_pixels(torch.cat([clean, noisy]), normalize=False)
            a, b = emb[:len(order)], emb[len(order):]
            sim = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1).cpu().numpy()
        t = spec.min_similarity
        for j, k in enumerate(order):
            v = float(sim[j])
            cols["rigid_similarity"][k] = v
            if t is not None and v < t:
                outcomes[k] = (RIGID_BELOW.status, rigid_reason(t), f"rigid_similarity {v:.4f} < {t:g}")


def _noise_seed(seed: int, sample_id) -> int:
    """A per-sample noise seed from the stable sample_id (reruns and resumes give the same score)."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF



# --- reporting ------------------------------------------------------------------------------
def model_report(cfg: SafetyConfig, clip: ClipConfig | None = None) -> dict:
    """Per head, what the run manifest says: model, checkpoint, random_weights, threshold."""
    out: dict = {}
    if cfg.nsfw is not None:
        h = cfg.nsfw
        out["nsfw"] = {"model": f"laion-nsfw-mlp({h.embed_dim}->{'->'.join(map(str, h.hidden_dims))}->1)",
                       "pretrained": h.checkpoint, "random_weights": h.checkpoint is None,
                       "max_punsafe": h.max_punsafe}
    if cfg.aesthetic is not None:
        h = cfg.aesthetic
        out["aesthetic"] = {"model": f"laion-aesthetic-v2-mlp({h.embed_dim})", "pretrained": h.checkpoint,
                            "random_weights": h.checkpoint is None, "min_aesthetic": h.min_aesthetic}
    if cfg.watermark is not None:
        h = cfg.watermark
        out["watermark"] = {"model": f"timm:{h.timm_model}+laion-head", "pretrained": h.checkpoint,
                            "random_weights": h.checkpoint is None, "max_pwatermark": h.max_pwatermark}
    if cfg.rigid is not None:
        enc = cfg.rigid.encoder or clip
        rep = clip_model_report(enc) if enc is not None else {"model": None, "pretrained": None,
                                                              "random_weights": None}
        out["rigid"] = {"model": rep["model"], "pretrained": rep["pretrained"], "random_weights": rep["random_weights"],
                        "encoder": "safety.rigid.encoder" if cfg.rigid.encoder is not None else "clip",
                        "noise_scale": cfg.rigid.noise_scale, "min_similarity": cfg.rigid.min_similarity}
    return out
