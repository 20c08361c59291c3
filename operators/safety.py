"""SafetyScorer: LAION-5B's safety and quality scores, and an optional RIGID AI-image score.

LAION-5B (Schuhmann et al., 2022) publishes, per sample, an NSFW probability ``punsafe`` and a
watermark probability ``pwatermark``, and LAION-Aesthetics an ``aesthetic`` score:

- NSFW: LAION-AI/CLIP-based-NSFW-Detector, an MLP on the L2-normalized CLIP image embedding,
  released for OpenAI CLIP ViT-L/14 (768-d) and ViT-B/32 (512-d) embeddings.
- Aesthetic predictor v2: christophschuhmann/improved-aesthetic-predictor, an MLP on the
  L2-normalized OpenAI CLIP ViT-L/14 image embedding.
- Watermark: LAION-AI/LAION-5B-WatermarkDetection (``inference.py``): a timm EfficientNet-B3
  with LAION's 2-class MLP head on the squash-resized image.
- RIGID (He, Chen and Ho, 2024, "RIGID: A Training-free and Model-Agnostic Framework for
  Robust AI-Generated Image Detection"; IBM/RIGID): the cosine between an encoder's embeddings
  of an image and of the image plus Gaussian noise (std 0.05 in normalized pixel space); real
  images are more robust, so lower similarity means more likely AI-generated. As published:
  DINOv2 ViT-L/14, 224 px squash, ImageNet mean/std (operators/models/dino.py); an open_clip
  image encoder is an option (the method is model-agnostic).

The NSFW and aesthetic heads were trained on one CLIP model's embeddings, so the stage has its
own embedder spec (``safety.embedder``, default OpenAI ViT-L/14) and each head names the
embedder it was trained on (``embedder``); a mismatch is a config error. The stage reads the
CLIP stage's ``clip_image_embedding`` only when the CLIP stage runs the same model (model,
pretrained, model_config_path); otherwise it embeds the images itself.

The three LAION models are in operators/models/laion.py, the DINOv2 encoder in
operators/models/dino.py, open_clip encoders are ``ClipModel`` (operators/models/clip.py).
The embedding heads are nearly free, so they run first and their drops are marked before the
watermark CNN and RIGID (two encoder passes) run on what is still kept. Rows dropped earlier
pass through untouched. A head whose ``checkpoint`` is null gets seeded random weights
(tests, dry run), and ``model_report`` says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, ClassVar, Literal

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
from operators.models.laion import (RELEASED_AESTHETIC, RELEASED_NSFW, build_aesthetic_head, build_nsfw_head,
                                    build_watermark_model, load_state, squash_inputs)
from operators.storage import StorageConfig

log = logging.getLogger(__name__)

EMBEDDING = "clip_image_embedding"
EMBEDDING_HEADS = ("nsfw", "aesthetic")
# Per head: its config key and the column it writes.
HEAD_COLUMNS = (("nsfw", "punsafe"), ("aesthetic", "aesthetic"), ("watermark", "pwatermark"),
                ("rigid", "rigid_similarity"))
# Image-embedding widths of open_clip models (``embed_dim`` of their configs), to check a head's
# ``embed_dim`` when the config loads; other models are checked once loaded.
MODEL_WIDTHS = {"RN50": 1024, "ViT-B-32": 512, "ViT-B-16": 512, "ViT-L-14": 768, "ViT-L-14-336": 768,
                "ViT-H-14": 1024, "ViT-g-14": 1024, "ViT-bigG-14": 1280}
QUICKGELU = "-quickgelu"

NSFW_ABOVE = DropReason("nsfw_above_{max_punsafe}", DROPPED,
                        "LAION NSFW detector's punsafe is above safety.nsfw.max_punsafe")
AESTHETIC_BELOW = DropReason("aesthetic_below_{min_aesthetic}", DROPPED,
                             "LAION aesthetic v2 score is below safety.aesthetic.min_aesthetic")
WATERMARK_ABOVE = DropReason("watermark_above_{max_pwatermark}", DROPPED,
                             "LAION watermark detector's pwatermark is above safety.watermark.max_pwatermark")
RIGID_BELOW = DropReason("rigid_below_{min_similarity}", DROPPED,
                         "RIGID noise-robustness similarity is below safety.rigid.min_similarity (likely generated)")


def embedder_id(model: str, pretrained: str | None) -> str:
    """``MODEL/PRETRAINED`` as a head's ``embedder`` names it: open_clip's ``-quickgelu`` variants
    are the same weights (``ViT-L-14-quickgelu`` + ``openai`` is ``ViT-L-14/openai``); null
    pretrained is ``random``; a checkpoint is named by its path."""
    base = model[:-len(QUICKGELU)] if model.endswith(QUICKGELU) else model
    return f"{base}/{pretrained if pretrained is not None else 'random'}"


def _norm_path(p: str | None) -> str | None:
    return p if p is None or "://" in p else os.path.normpath(p)


# --- config ---------------------------------------------------------------------------------
class EmbedderSpec(BaseModel):
    """The open_clip model whose image embeddings the NSFW and aesthetic heads read."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("ViT-L-14-quickgelu", description=(
        "open_clip model name (LAION's heads: OpenAI ViT-L/14; open_clip 3 builds OpenAI's weights "
        "faithfully only as the -quickgelu variant: its ViT-L-14 uses GELU)"))
    pretrained: str | None = Field("openai", description="pretrained tag, checkpoint path / file:// / s3://, "
                                                         "or null = random")
    model_config_path: str | None = Field(None, description="JSON of a custom open_clip architecture to register")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    known_as: str | None = Field(None, description=(
        "the MODEL/PRETRAINED these weights are, when pretrained is a copy at a path (e.g. ViT-L-14/openai "
        "mirrored to s3://); null: derived from model and pretrained"))

    def id(self) -> str:
        """What heads' ``embedder`` is compared with."""
        return self.known_as or embedder_id(self.model, self.pretrained)

    def same_model_as(self, clip: ClipConfig) -> bool:
        """The CLIP stage runs this very model (model, pretrained, model_config_path)."""
        return (self.model == clip.model and self.pretrained == clip.pretrained
                and _norm_path(self.model_config_path) == _norm_path(clip.model_config_path))

    def clip_config(self, device: str, cache_dir: str | None) -> ClipConfig:
        return ClipConfig(model=self.model, pretrained=self.pretrained, model_config_path=self.model_config_path,
                          device=device, precision=self.precision, decode="cpu", cache_dir=cache_dir)

    def width(self) -> int | None:
        """The embedding width when the model is a known open_clip one (else known once loaded)."""
        return MODEL_WIDTHS.get(embedder_id(self.model, None).rsplit("/", 1)[0])


class HeadSpec(BaseModel):
    """A head on a CLIP image embedding, trained on one embedder's embeddings."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    checkpoint: str | None = Field(None, description="state_dict at a path, file:// or s3://; null = random weights")
    embedder: str = Field("ViT-L-14/openai", description=(
        "MODEL/PRETRAINED of the CLIP embeddings the head was trained on; must equal safety.embedder's "
        "(LAION's released heads: ViT-L-14/openai; the NSFW head also ViT-B-32/openai)"))
    embed_dim: int | None = Field(None, ge=1, description=(
        "input width; null: the embedder's (768: ViT-L/14, 512: ViT-B/32); checked against it"))

    RELEASED: ClassVar[dict] = {}

    def released_width(self) -> int | None:
        r = self.RELEASED.get(self.embedder)
        return r[0] if isinstance(r, tuple) else r


class NsfwSpec(HeadSpec):
    """LAION CLIP-based NSFW detector; drops when ``punsafe > max_punsafe``."""

    RELEASED: ClassVar[dict] = RELEASED_NSFW

    hidden_dims: list[int] | None = Field(None, min_length=1, description=(
        "hidden widths; null: the released head's for its embedder (ViT-L-14/openai: [64, 512, 256]; "
        "ViT-B-32/openai: [32, 32]), else [64, 512, 256]"))
    max_punsafe: float | None = Field(0.5, ge=0, le=1, description="drop above this; null = score only")

    def layout(self) -> tuple[int, ...]:
        if self.hidden_dims is not None:
            return tuple(self.hidden_dims)
        return RELEASED_NSFW.get(self.embedder, RELEASED_NSFW["ViT-L-14/openai"])[1]


class AestheticSpec(HeadSpec):
    """LAION aesthetic predictor v2; drops when ``aesthetic < min_aesthetic``."""

    RELEASED: ClassVar[dict] = RELEASED_AESTHETIC

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


class DinoSpec(BaseModel):
    """RIGID's backbone: a timm DINOv2 (Oquab et al., 2023) ViT, CLS token after the final norm."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("vit_large_patch14_dinov2", description="timm architecture (RIGID: DINOv2 ViT-L/14)")
    pretrained: str | None = Field("lvd142m", description=(
        "timm pretrained tag (lvd142m: DINOv2's released weights), checkpoint path / file:// / s3:// "
        "(timm or original DINOv2 keys), or null = random"))
    image_size: int = Field(224, ge=14, le=4096, description="squashed to size x size (RIGID: 224, no crop)")
    model_args: dict[str, Any] = Field(default_factory=dict, description=(
        "extra timm.create_model arguments (tests, dry run: depth, embed_dim, num_heads of a tiny model)"))
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")

    def random_weights(self) -> bool:
        return self.pretrained is None


class RigidSpec(BaseModel):
    """RIGID: cosine between embeddings of an image and of a noise-perturbed copy."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    backbone: Literal["dinov2", "open_clip"] = Field("dinov2", description=(
        "dinov2: as published (safety.rigid.dinov2); open_clip: safety.rigid.encoder or the CLIP stage's model"))
    dinov2: DinoSpec = Field(default_factory=DinoSpec, description="the DINOv2 backbone (backbone: dinov2)")
    encoder: ClipConfig | None = Field(None, description=(
        "open_clip encoder spec (backbone: open_clip); null = the CLIP stage's model"))
    noise_scale: float = Field(0.05, ge=0, description="std of the Gaussian noise in normalized pixel space")
    seed: int = Field(0, description="noise seed, mixed with each sample_id (same score on reruns)")
    min_similarity: float | None = Field(None, ge=-1, le=1, description="drop below this; null = score only")

    @model_validator(mode="after")
    def _encoder_for_open_clip(self):
        if self.backbone == "dinov2" and self.encoder is not None:
            raise ValueError("safety.rigid.encoder is set but safety.rigid.backbone is dinov2 (the encoder is "
                             "the open_clip backbone's): set backbone: open_clip, or drop encoder")
        return self


class SafetyConfig(StageResources):
    """Safety stage settings (``safety:`` in the job config); each head is optional."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = Field(False, description="run the safety stage (the heads configured below)")
    embedder: EmbedderSpec = Field(default_factory=EmbedderSpec, description=(
        "the CLIP model the NSFW and aesthetic heads read; the CLIP stage's embeddings are reused when it "
        "runs this very model, else this stage embeds the images itself"))
    nsfw: NsfwSpec | None = Field(None, description="LAION's NSFW detector (null: off)")
    aesthetic: AestheticSpec | None = Field(None, description="LAION's aesthetic predictor v2 (null: off)")
    watermark: WatermarkSpec | None = Field(None, description="LAION's watermark detector (null: off)")
    rigid: RigidSpec | None = Field(None, description="RIGID AI-generated image score (null: off)")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: a GPU only when a model runs on images (watermark, RIGID, or safety.embedder "
                            "when the CLIP stage's embeddings are not reused); the MLP heads alone run on CPU")
    cache_dir: str | None = Field(None, description="where s3:// checkpoints are copied (default: a temp dir)")
    batch_size: int = Field(256, ge=1, description="rows per actor call")
    num_gpus: float = Field(1.0, ge=0, description="per actor, when a GPU is used; 0 runs on CPU")

    @model_validator(mode="after")
    def _check(self):
        if self.enabled and not self.heads():
            raise ValueError("safety.enabled is true but no head is configured (nsfw, aesthetic, watermark, rigid)")
        if not self.embedding_heads():
            return self
        e = self.embedder
        if e.pretrained == "openai" and not e.model.endswith(QUICKGELU) and e.known_as is None:
            raise ValueError(
                f"safety.embedder.model is {e.model!r} with pretrained 'openai': open_clip builds {e.model} with GELU "
                f"but OpenAI's weights (and LAION's heads) use QuickGELU: set safety.embedder.model to "
                f"{e.model + QUICKGELU!r}")
        width = e.width()
        for h in self.embedding_heads():
            spec = getattr(self, h)
            if spec.embedder != e.id():
                raise ValueError(
                    f"safety.{h}.embedder is {spec.embedder!r} (the embeddings the head was trained on) but "
                    f"safety.embedder is {e.id()!r} (model {e.model!r}, pretrained {e.pretrained!r}): point "
                    f"safety.embedder at the head's model, or give a head trained on {e.id()!r}")
            if spec.embed_dim is not None and width is not None and spec.embed_dim != width:
                raise ValueError(f"safety.{h}.embed_dim is {spec.embed_dim} but safety.embedder {e.model!r} "
                                 f"embeds in {width} dimensions: set it to {width} or null")
        return self

    def heads(self) -> list[str]:
        return [h for h in ("nsfw", "aesthetic", "watermark", "rigid") if getattr(self, h) is not None]

    def embedding_heads(self) -> list[str]:
        return [h for h in EMBEDDING_HEADS if getattr(self, h) is not None]

    def reuses_clip(self, clip: ClipConfig | None) -> bool:
        """Whether the embedding heads read the CLIP stage's ``clip_image_embedding`` (it runs safety.embedder's
        model); else the stage embeds the images with safety.embedder. With clip.write_embeddings off the
        chain check refuses the config rather than run the same model twice."""
        return (bool(self.embedding_heads()) and clip is not None and clip.enabled
                and self.embedder.same_model_as(clip))

    def uses_images(self, clip: ClipConfig | None = None) -> bool:
        """Whether a model runs on the images (watermark, RIGID, or the embedder when it is not reused)."""
        own = bool(self.embedding_heads()) and not self.reuses_clip(clip)
        return self.watermark is not None or self.rigid is not None or own


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
        r = self.config.rigid
        if r is not None and r.backbone == "open_clip" and r.encoder is None and self.clip is None:
            raise ValueError("safety.rigid.encoder is null (use the CLIP stage's model) but no clip config was given")
        self.reuse = self.config.reuses_clip(self.clip)
        self._ready = False

    @classmethod
    def resources(cls, config: SafetyConfig, clip: ClipConfig | None = None) -> Resources:
        # The embedding heads alone are tiny MLPs: with device auto they need no GPU when they read
        # the CLIP stage's embeddings. Without ``clip`` the stage embeds the images itself.
        return model_stage_resources(config, needs_gpu=config.device != "auto" or config.uses_images(clip))

    @classmethod
    def columns(cls, config: SafetyConfig | None = None, clip: ClipConfig | None = None) -> Columns:
        """What it reads: the CLIP stage's embeddings when it reuses them (``clip`` runs the
        embedder's model), the images when a model runs on them, sample_id for RIGID's noise."""
        c = config or SafetyConfig()
        reads = list(cls.reads)
        if c.reuses_clip(clip):
            reads.append(EMBEDDING)
        if c.uses_images(clip):
            reads.append("image")
        if c.rigid is not None:
            reads.append("sample_id")
        return Columns(tuple(reads), {col: pa.float32() for head, col in HEAD_COLUMNS if getattr(c, head) is not None})

    def declared(self) -> Columns:
        cols = self.__dict__.get("_declared")
        if cols is None:
            cols = self._declared = self.columns(self.config, self.clip)
        return cols

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
        if c.uses_images():  # without the CLIP config: every reason it could give
            out.append(DECODE_ERROR)
        return tuple(out)

    def rigid_encoder_config(self) -> ClipConfig | None:
        r = self.config.rigid
        return None if r is None or r.backbone != "open_clip" else (r.encoder or self.clip)

    # -- state, once per actor ----------------------------------------------------------------
    def setup(self) -> None:
        c = self.config
        self.device = resolve_device(c.device, use_gpu=self.resources(c, self.clip).num_gpus > 0)
        self._nsfw = self._aesthetic = self._watermark = self._rigid = self._embedder = None
        args = (self.storage, c.cache_dir)
        if c.embedding_heads():
            width = self._embedder_width()
            if c.nsfw is not None:
                self._nsfw = load_state(build_nsfw_head(c.nsfw, width), c.nsfw.checkpoint, "nsfw",
                                        *args).to(self.device)
            if c.aesthetic is not None:
                self._aesthetic = load_state(build_aesthetic_head(c.aesthetic, width), c.aesthetic.checkpoint,
                                             "aesthetic", *args).to(self.device)
        if c.watermark is not None:
            self._watermark = load_state(build_watermark_model(c.watermark), c.watermark.checkpoint, "watermark",
                                         *args).to(self.device)
        if c.rigid is not None:
            if c.rigid.backbone == "dinov2":
                from operators.models.dino import DinoModel

                self._rigid = DinoModel(c.rigid.dinov2, self.storage, self.device, c.cache_dir)
            else:
                self._rigid = ClipModel(self.rigid_encoder_config(), self.storage, self.device)
        self._ready = True

    def _embedder_width(self) -> int | None:
        """The embedder's width: the loaded model's (own embedder), else a known model's or its open_clip
        config's (reused embeddings; the column's width is checked on every batch too)."""
        c = self.config
        if not self.reuse:
            self._embedder = ClipModel(c.embedder.clip_config(self.device, c.cache_dir), self.storage, self.device)
            width = self._embedder.dim
        else:
            width = c.embedder.width() or _open_clip_width(c.embedder)
        if width is not None:
            self._check_embed_dims(None, width, "safety.embedder")
        return width

    # -- batch ---------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        if self.reuse:  # from the type: also on a batch with nothing kept
            self._check_embed_dims(batch.schema.field(EMBEDDING).type)
        return super().process(batch)

    def score(self, rows: pa.Table) -> Scored:
        c = self.config
        n = rows.num_rows
        outcomes: list = [None] * n
        cols: dict[str, list] = {col: [None] * n for col in self.declared().writes}
        if self.reuse:
            self._score_embeddings(rows, cols, outcomes)
        if c.uses_images(self.clip):
            todo = [k for k in range(n) if outcomes[k] is None]
            if todo:
                self._score_images(rows, todo, cols, outcomes)
        return Scored(cols, outcomes)

    def _check_embed_dims(self, typ: pa.DataType | None, width: int | None = None, source: str = EMBEDDING) -> None:
        if width is None:
            if not pa.types.is_fixed_size_list(typ):
                return  # variable-size lists: checked on the rows themselves
            width = typ.list_size
        for head in EMBEDDING_HEADS:
            spec = getattr(self.config, head)
            if spec is not None and spec.embed_dim is not None and spec.embed_dim != width:
                raise ValueError(f"safety.{head}.embed_dim is {spec.embed_dim} but {source} has width {width}: "
                                 f"set safety.{head}.embed_dim to the CLIP model's embedding width ({width}) or null")
            model = getattr(self, f"_{head}", None)
            if model is not None and model.input_width != width:
                raise ValueError(f"safety.{head} takes {model.input_width}-d embeddings but {source} has width "
                                 f"{width}: set safety.{head}.embed_dim")

    def _score_embeddings(self, rows: pa.Table, cols: dict, outcomes: list) -> None:
        """The heads on the CLIP stage's embeddings (rows without one, e.g. a CLIP decode failure, are skipped)."""
        import torch

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
        self._run_heads(torch.from_numpy(flat.reshape(len(idx), width)), idx, cols, outcomes)

    def _run_heads(self, x, idx: list[int], cols: dict, outcomes: list) -> None:
        """NSFW and aesthetic on embeddings ``x`` (len(idx), d) of rows ``idx``."""
        import torch

        c = self.config
        with torch.inference_mode():
            x = torch.nn.functional.normalize(x.float().to(self.device), dim=-1)  # LAION's heads: L2-normalized
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
        if self._embedder is not None and images:
            self._embed_and_run_heads(images, cols, outcomes)
        todo = {k: im for k, im in images.items() if outcomes[k] is None}
        if self._watermark is not None and todo:
            self._score_watermark(todo, cols, outcomes)
        todo = {k: im for k, im in todo.items() if outcomes[k] is None}
        if self._rigid is not None and todo:
            self._score_rigid(todo, rows.column("sample_id").to_pylist(), cols, outcomes)

    def _embed_and_run_heads(self, images: dict, cols: dict, outcomes: list) -> None:
        """safety.embedder's embeddings of the images (open_clip's own preprocessing), then the heads."""
        import torch

        m, order = self._embedder, list(images)
        with torch.inference_mode():
            x = torch.cat([m.encode_pil([images[k] for k in order[s:s + m.micro_batch]])
                           for s in range(0, len(order), m.micro_batch)])
        self._run_heads(x, order, cols, outcomes)

    def _score_watermark(self, images: dict, cols: dict, outcomes: list) -> None:
        import torch

        spec = self.config.watermark
        with torch.inference_mode():
            x = torch.from_numpy(squash_inputs(list(images.values()), spec.image_size)).to(self.device)
            probs = torch.softmax(self._watermark(x).float(), dim=1)[:, spec.watermark_class].cpu().numpy()
        t = spec.max_pwatermark
        for j, k in enumerate(images):
            p = float(probs[j])
            cols["pwatermark"][k] = p
            if t is not None and p > t:
                outcomes[k] = (WATERMARK_ABOVE.status, watermark_reason(t), f"pwatermark {p:.4f} > {t:g}")

    def _score_rigid(self, images: dict, ids: list, cols: dict, outcomes: list) -> None:
        """RIGID: cosine(f(x), f(x + noise_scale * n)), n ~ N(0, I) in the encoder's normalized pixel
        space, seeded per sample_id (IBM/RIGID adds ``torch.randn_like(x) * 0.05`` to the normalized tensor)."""
        import torch

        spec = self.config.rigid
        encoder = self._rigid
        order = list(images)
        clean = encoder.preprocess_pil([images[k] for k in order])
        noisy = clean + spec.noise_scale * rigid_noise(spec.seed, [ids[k] for k in order], clean.shape[1:])
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


def rigid_noise(seed: int, sample_ids: list, shape) -> "torch.Tensor":  # noqa: F821 - torch is imported lazily
    """Standard normal noise (len(sample_ids), *shape), each row from its own generator seeded by
    (seed, sample_id): the same for a sample whatever batch it is in, on reruns and resumes."""
    import torch

    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(_noise_seed(seed, i)))
                        for i in sample_ids])


def _noise_seed(seed: int, sample_id) -> int:
    """A per-sample noise seed from the stable sample_id (reruns and resumes give the same score)."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _open_clip_width(spec: EmbedderSpec) -> int | None:
    """The image-embedding width in the open_clip config of ``spec.model`` (no model is built)."""
    import open_clip

    if spec.model_config_path:
        open_clip.add_model_config(spec.model_config_path)
    cfg = open_clip.get_model_config(spec.model)
    return None if cfg is None else int(cfg["embed_dim"])


# --- reporting ------------------------------------------------------------------------------
def model_report(cfg: SafetyConfig, clip: ClipConfig | None = None) -> dict:
    """Per head, what the run manifest says: model, checkpoint, random_weights, threshold, and the
    embedder (embedding heads) or backbone (RIGID) it ran on, and whether those weights are random."""
    out: dict = {}
    e = cfg.embedder
    reuse = cfg.reuses_clip(clip)
    embedder = {"embedder": e.id(), "embedder_pretrained": e.pretrained, "embedder_random_weights": e.pretrained is None,
                "embeddings": f"clip stage ({EMBEDDING})" if reuse else "safety.embedder (this stage)"}
    if cfg.nsfw is not None:
        h = cfg.nsfw
        dim = h.embed_dim or e.width() or h.released_width() or "d"
        out["nsfw"] = {"model": f"laion-nsfw-mlp({dim}->{'->'.join(map(str, h.layout()))}->1) on {e.id()}",
                       "pretrained": h.checkpoint, "random_weights": h.checkpoint is None,
                       "max_punsafe": h.max_punsafe, **embedder}
    if cfg.aesthetic is not None:
        h = cfg.aesthetic
        dim = h.embed_dim or e.width() or h.released_width() or "d"
        out["aesthetic"] = {"model": f"laion-aesthetic-v2-mlp({dim}) on {e.id()}", "pretrained": h.checkpoint,
                            "random_weights": h.checkpoint is None, "min_aesthetic": h.min_aesthetic, **embedder}
    if cfg.watermark is not None:
        h = cfg.watermark
        out["watermark"] = {"model": f"timm:{h.timm_model}+laion-head", "pretrained": h.checkpoint,
                            "random_weights": h.checkpoint is None, "max_pwatermark": h.max_pwatermark}
    if cfg.rigid is not None:
        r = cfg.rigid
        common = {"backbone": r.backbone, "noise_scale": r.noise_scale, "min_similarity": r.min_similarity}
        if r.backbone == "dinov2":
            d = r.dinov2
            out["rigid"] = {"model": f"timm:{d.model}" + (f" {d.model_args}" if d.model_args else ""),
                            "pretrained": d.pretrained, "random_weights": d.random_weights(),
                            "image_size": d.image_size, "preprocess": "squash, ImageNet mean/std", **common}
        else:
            enc = r.encoder or clip
            rep = clip_model_report(enc) if enc is not None else {"model": None, "pretrained": None,
                                                                  "random_weights": None}
            out["rigid"] = {"model": rep["model"], "pretrained": rep["pretrained"],
                            "random_weights": rep["random_weights"],
                            "encoder": "safety.rigid.encoder" if r.encoder is not None else "clip",
                            "preprocess": "open_clip's", **common}
    return out
