"""SafetyScorer: LAION-5B's safety and quality scores, and an optional RIGID AI-image score.

LAION-5B (Schuhmann et al., 2022) publishes, per sample, an NSFW probability ``punsafe`` and a
watermark probability ``pwatermark``, and LAION-Aesthetics an ``aesthetic`` score:

- NSFW: LAION-AI/CLIP-based-NSFW-Detector, an MLP on the L2-normalized CLIP image embedding
  (AutoKeras, ported to PyTorch in that repo's ``src/models.py``): a Keras ``Normalization``
  (mean/variance buffers), then ``linear_1..linear_k`` with ReLU and a sigmoid out. ViT-L/14:
  768 -> 64 -> 512 -> 256 -> 1; ViT-B/32: 512 -> 32 -> 32 -> 1. Module names are kept, so the
  released ``clip_ViT-L-14_openai_binary_nsfw_head.pth`` loads as is.
- Aesthetic predictor v2: christophschuhmann/improved-aesthetic-predictor, ``MLP.layers`` =
  Linear(d,1024), Dropout(.2), Linear(1024,128), Dropout(.2), Linear(128,64), Dropout(.1),
  Linear(64,16), Linear(16,1) on the L2-normalized embedding (no activations, as released);
  ``sac+logos+ava1-l14-linearMSE.pth`` loads as is.
- Watermark: LAION-AI/LAION-5B-WatermarkDetection (``inference.py``): timm ``efficientnet_b3a``
  whose ``classifier`` is Linear(1536,625), ReLU, Dropout(.3), Linear(625,256), ReLU,
  Linear(256,2); input Resize((256,256)) (no crop), ImageNet mean/std; softmax, and column 0
  is "P Watermark", column 1 "P Clean". timm >= 0.9 maps the name ``efficientnet_b3a`` to
  ``efficientnet_b3`` (the same architecture and keys), so that is the default here.
- RIGID (He, Chen and Ho, 2024, "RIGID: A Training-free and Model-Agnostic Framework for
  Robust AI-Generated Image Detection"; IBM/RIGID): the cosine between an encoder's embeddings
  of an image and of the image plus Gaussian noise (scale 0.05 in normalized pixel space);
  real images are more robust, so lower similarity means more likely AI-generated. The paper
  uses DINOv2; the method is model-agnostic and this operator uses an open_clip image encoder.

The embedding heads are nearly free, so they run first and their drops are marked before the
watermark CNN and RIGID (two encoder passes) run on what is still kept. Rows dropped earlier
pass through untouched. A head whose ``checkpoint`` is null gets seeded random weights built
here (tests, dry run), and ``model_report`` says so.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.base import (DROPPED, FAILED, KEPT, Operator, Resources, StageResources, mark, model_stage_resources,
                            set_columns)
from operators.clip import ClipConfig, load_clip
from operators.clip import model_report as clip_model_report
from operators.storage import StorageConfig, local_copy

log = logging.getLogger(__name__)

EMBEDDING = "clip_image_embedding"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0  # heads without a checkpoint: the same random weights in every actor and run


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

    enabled: bool = False
    nsfw: NsfwSpec | None = None
    aesthetic: AestheticSpec | None = None
    watermark: WatermarkSpec | None = None
    rigid: RigidSpec | None = None
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: a GPU only when the watermark or RIGID model is on (MLP heads run on CPU)")
    cache_dir: str | None = Field(None, description="where s3:// checkpoints are copied (default: a temp dir)")
    batch_size: int = Field(256, ge=1)
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
    return f"nsfw_above_{t:g}"


def watermark_reason(t: float) -> str:
    return f"watermark_above_{t:g}"


def aesthetic_reason(t: float) -> str:
    return f"aesthetic_below_{t:g}"


def rigid_reason(t: float) -> str:
    return f"rigid_below_{t:g}"


# --- models ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _nn():
    """The torch module classes, defined on first use (importing this module needs no torch)."""
    import torch
    from torch import nn

    class Normalization(nn.Module):
        """Keras ``Normalization`` as LAION ported it: (x - mean) / (sqrt(variance) + 1e-10)."""

        def __init__(self, dim: int):
            super().__init__()
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("variance", torch.ones(dim))

        def forward(self, x):
            return (x - self.mean) / (self.variance.sqrt() + 1e-10)

    class NsfwHead(nn.Module):
        """LAION NSFWModel_L14 / _B32: norm, ReLU-linears, sigmoid; returns punsafe (N,)."""

        def __init__(self, embed_dim: int, hidden_dims: list[int]):
            super().__init__()
            self.norm = Normalization(embed_dim)
            dims = [embed_dim, *hidden_dims, 1]
            self.n_linear = len(dims) - 1
            for k in range(self.n_linear):
                self.add_module(f"linear_{k + 1}", nn.Linear(dims[k], dims[k + 1]))
            self.act = nn.ReLU()
            self.act_out = nn.Sigmoid()

        def forward(self, x):
            x = self.norm(x)
            for k in range(1, self.n_linear):  # B32's dropout (after linear_2) is a no-op in eval
                x = self.act(getattr(self, f"linear_{k}")(x))
            return self.act_out(getattr(self, f"linear_{self.n_linear}")(x)).squeeze(-1)

    class AestheticMLP(nn.Module):
        """improved-aesthetic-predictor ``MLP`` (same module names as the released .pth)."""

        def __init__(self, input_size: int):
            super().__init__()
            self.input_size = input_size
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024), nn.Dropout(0.2),
                nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x).squeeze(-1)

    return Normalization, NsfwHead, AestheticMLP


def _seeded(build):
    """Build a module with the global torch RNG forked and seeded (random heads are reproducible)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def build_nsfw_head(spec: NsfwSpec):
    _, NsfwHead, _ = _nn()
    return _seeded(lambda: NsfwHead(spec.embed_dim, list(spec.hidden_dims))).eval()


def build_aesthetic_head(spec: AestheticSpec):
    _, _, AestheticMLP = _nn()
    return _seeded(lambda: AestheticMLP(spec.embed_dim)).eval()


def build_watermark_model(spec: WatermarkSpec):
    """The timm model with its classifier replaced by LAION's head (``classifier.0/.3/.5`` for b3)."""
    import timm
    from torch import nn

    def build():
        model = timm.create_model(spec.timm_model, pretrained=False, num_classes=2)
        attr = model.pretrained_cfg.get("classifier") or "classifier"
        *parents, leaf = attr.split(".")
        owner = model
        for p in parents:
            owner = getattr(owner, p)
        old = getattr(owner, leaf)
        in_features = old.in_features if isinstance(old, nn.Linear) else model.num_features
        layers: list = []
        for k, width in enumerate(spec.head_dims):
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            if k == 0:
                layers.append(nn.Dropout(0.3))
            in_features = width
        layers.append(nn.Linear(in_features, 2))
        setattr(owner, leaf, nn.Sequential(*layers))
        return model

    return _seeded(build).eval()


def load_state(module, checkpoint: str | None, what: str, storage: StorageConfig | None = None,
               cache_dir: str | None = None):
    """Load a ``torch.save(state_dict)`` checkpoint (path, file://, s3://) into ``module``."""
    import torch

    if checkpoint is None:
        return module
    path = local_copy(checkpoint, storage, cache_dir)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"safety.{what}: checkpoint {checkpoint!r} does not fit the configured head "
                         f"(check embed_dim / hidden_dims / timm_model): {exc}") from None
    return module.eval()


# --- operator -------------------------------------------------------------------------------
class SafetyScorer(Operator):
    """Writes ``punsafe``, ``aesthetic``, ``pwatermark`` and ``rigid_similarity`` (those configured)."""

    name: ClassVar[str] = "safety"

    def __init__(self, config: SafetyConfig | dict | None = None, storage: StorageConfig | dict | None = None,
                 clip: ClipConfig | dict | None = None):
        self.config = config if isinstance(config, SafetyConfig) else SafetyConfig(**(config or {}))
        self.storage = storage if isinstance(storage, StorageConfig) or storage is None else StorageConfig(**storage)
        self.clip = clip if isinstance(clip, ClipConfig) or clip is None else ClipConfig(**clip)
        c = self.config
        if c.rigid is not None and c.rigid.encoder is None and self.clip is None:
            raise ValueError("safety.rigid.encoder is null (use the CLIP stage's model) but no clip config was given")
        reads = ["status", "drop_stage", "drop_reason", "error_message"]
        if c.nsfw is not None or c.aesthetic is not None:
            reads.append(EMBEDDING)
        if c.uses_images():
            reads.append("image")
        if c.rigid is not None:
            reads.append("sample_id")
        self.reads = tuple(reads)
        self.writes = tuple(col for head, col in (("nsfw", "punsafe"), ("aesthetic", "aesthetic"),
                                                  ("watermark", "pwatermark"), ("rigid", "rigid_similarity"))
                            if getattr(c, head) is not None)
        self._ready = False

    @classmethod
    def resources(cls, config: SafetyConfig) -> Resources:
        # Embedding heads alone are tiny MLPs: with device auto they need no GPU.
        return model_stage_resources(config, needs_gpu=config.device != "auto" or config.uses_images())

    def rigid_encoder_config(self) -> ClipConfig | None:
        r = self.config.rigid
        return None if r is None else (r.encoder or self.clip)

    # -- state, once per actor ----------------------------------------------------------------
    def _setup(self):
        if self._ready:
            return
        import torch

        c = self.config
        if c.device == "auto":
            use_gpu = self.resources(c).num_gpus > 0 and torch.cuda.is_available()
            self.device = "cuda" if use_gpu else "cpu"
        else:
            self.device = c.device
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
            model, preprocess, _ = load_clip(self.rigid_encoder_config(), self.storage, self.device)
            self._rigid = (model, preprocess, next(model.parameters()).dtype)
        self._ready = True

    # -- batch ---------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        c = self.config
        n = batch.num_rows
        status = batch.column("status").to_pylist()
        outcomes: list = [None] * n
        cols: dict[str, list] = {col: [None] * n for col in self.writes}
        alive = [s == KEPT for s in status]
        if c.nsfw is not None or c.aesthetic is not None:
            self._check_embed_dims(batch.schema.field(EMBEDDING).type)
        if any(alive):
            self._setup()
            if c.nsfw is not None or c.aesthetic is not None:
                self._score_embeddings(batch, alive, cols, outcomes)
            if c.uses_images():
                todo = [i for i in range(n) if alive[i] and outcomes[i] is None]
                if todo:
                    self._score_images(batch, todo, cols, outcomes)
        batch = set_columns(batch, {col: pa.array(v, pa.float32()) for col, v in cols.items()})
        return mark(batch, self.name, outcomes)

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

    def _score_embeddings(self, batch: pa.Table, alive: list[bool], cols: dict, outcomes: list) -> None:
        import torch

        c = self.config
        column = batch.column(EMBEDDING)
        valid = pc.is_valid(column).to_pylist()
        idx = [i for i in range(batch.num_rows) if alive[i] and valid[i]]
        if not idx:
            return
        rows = column.take(pa.array(idx, pa.int64())).combine_chunks()
        flat = rows.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        if flat.size % len(idx) or (not pa.types.is_fixed_size_list(rows.type)
                                    and len(set(pc.list_value_length(rows).to_pylist())) != 1):
            raise ValueError(f"{EMBEDDING}: rows of different widths in one batch")
        width = flat.size // len(idx)
        self._check_embed_dims(rows.type, width)
        with torch.inference_mode():
            x = torch.from_numpy(flat.reshape(len(idx), width)).to(self.device)
            x = torch.nn.functional.normalize(x, dim=-1)  # LAION's heads take L2-normalized embeddings
            punsafe = self._nsfw(x).float().cpu().numpy() if self._nsfw is not None else None
            aesthetic = self._aesthetic(x).float().cpu().numpy() if self._aesthetic is not None else None
        for k, i in enumerate(idx):
            if punsafe is not None:
                p = float(punsafe[k])
                cols["punsafe"][i] = p
                t = c.nsfw.max_punsafe
                if t is not None and p > t:
                    outcomes[i] = (DROPPED, nsfw_reason(t), f"punsafe {p:.4f} > {t:g}")
            if aesthetic is not None:
                a = float(aesthetic[k])
                cols["aesthetic"][i] = a
                t = c.aesthetic.min_aesthetic
                if outcomes[i] is None and t is not None and a < t:
                    outcomes[i] = (DROPPED, aesthetic_reason(t), f"aesthetic {a:.4f} < {t:g}")

    def _score_images(self, batch: pa.Table, idx: list[int], cols: dict, outcomes: list) -> None:
        from PIL import Image

        blobs = batch.column("image").take(pa.array(idx, pa.int64())).to_pylist()
        images: dict[int, object] = {}
        for i, b in zip(idx, blobs):
            try:
                if b is None:
                    raise ValueError("no image bytes")
                with Image.open(io.BytesIO(b)) as im:
                    images[i] = im.convert("RGB")
            except Exception as exc:  # noqa: BLE001 - recorded per row, never raised
                outcomes[i] = (FAILED, "decode_error", f"safety: image could not be decoded: {exc}"[:500])
        if self._watermark is not None and images:
            self._score_watermark(images, cols, outcomes)
        todo = {i: im for i, im in images.items() if outcomes[i] is None}
        if self._rigid is not None and todo:
            ids = batch.column("sample_id").to_pylist()
            self._score_rigid(todo, ids, cols, outcomes)

    def _score_watermark(self, images: dict, cols: dict, outcomes: list) -> None:
        import torch
        from PIL import Image

        spec = self.config.watermark
        s = spec.image_size
        mean = np.asarray(IMAGENET_MEAN, np.float32)
        std = np.asarray(IMAGENET_STD, np.float32)
        # torchvision's Resize((s, s)) on a PIL image is PIL's bilinear resize: the same here.
        arrs = [((np.asarray(im.resize((s, s), Image.BILINEAR), np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
                for im in images.values()]
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(np.stack(arrs))).to(self.device)
            probs = torch.softmax(self._watermark(x).float(), dim=1)[:, spec.watermark_class].cpu().numpy()
        t = spec.max_pwatermark
        for k, i in enumerate(images):
            p = float(probs[k])
            cols["pwatermark"][i] = p
            if t is not None and p > t:
                outcomes[i] = (DROPPED, watermark_reason(t), f"pwatermark {p:.4f} > {t:g}")

    def _score_rigid(self, images: dict, ids: list, cols: dict, outcomes: list) -> None:
        import torch

        spec = self.config.rigid
        model, preprocess, dtype = self._rigid
        order = list(images)
        clean = torch.stack([preprocess(images[i]) for i in order])
        noise = torch.stack([torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(
            _noise_seed(spec.seed, ids[i]))) for i in order])
        noisy = clean + spec.noise_scale * noise
        with torch.inference_mode():
            emb = model.encode_image(torch.cat([clean, noisy]).to(self.device, dtype)).float()
            a, b = emb[:len(order)], emb[len(order):]
            sim = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1).cpu().numpy()
        t = spec.min_similarity
        for k, i in enumerate(order):
            v = float(sim[k])
            cols["rigid_similarity"][i] = v
            if t is not None and v < t:
                outcomes[i] = (DROPPED, rigid_reason(t), f"rigid_similarity {v:.4f} < {t:g}")


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
