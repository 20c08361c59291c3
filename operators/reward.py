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

Backbones:
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

import io
import logging
import math
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import ConfigDict, Field, model_validator

from operators.base import (DROPPED, FAILED, Operator, Resources, StageResources, alive_mask, mark,
                            model_stage_resources, set_columns)
from operators.clip import ClipConfig, ClipEmbedder
from operators.clip import model_report as clip_model_report
from operators.storage import StorageConfig, fsspec_fs, is_remote

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "imgcurate.reward/1"
RANDOM_SEED = 0  # heads without a checkpoint: the same random weights in every actor and run
FEATURES = {"open_clip": "concat(img, txt, img*txt) of L2-normalized open_clip embeddings",
            "blip": "[CLS] of BLIP's image-grounded text encoder (ImageReward)"}


# --- config ---------------------------------------------------------------------------------
class RewardConfig(StageResources):
    """Reward stage settings (``reward:`` in the job config)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = False
    backbone_type: Literal["open_clip", "blip"] = "open_clip"
    backbone: ClipConfig | None = Field(None, description="open_clip spec of the backbone; null = the CLIP stage's")
    blip_path: str | None = Field(None, description="local dir of a transformers BlipForImageTextRetrieval (blip)")
    head_checkpoint: str | None = Field(None, description="trained head at a path, file:// or s3://; null = random")
    head_hidden: list[int] = Field([512, 64], description="hidden widths of a random head (a checkpoint has its own)")
    min_reward: float | None = Field(None, description="drop below this standardized reward; null = score only")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    batch_size: int = Field(256, ge=1)
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
    return f"reward_below_{t:g}"


# --- head -------------------------------------------------------------------------------------
def build_head(feature_dim: int, hidden: list[int], dropout: float = 0.0, seed: int | None = RANDOM_SEED):
    """MLP ``feature_dim -> hidden... -> 1`` (GELU between); seeded, so a random head is reproducible."""
    import torch
    from torch import nn

    def build():
        layers: list = []
        width = feature_dim
        for h in hidden:
            # Dropout is always a module (a no-op at p=0 and in eval), so state_dict keys do not
            # depend on the training dropout.
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def head_hidden_of(state: dict) -> list[int]:
    """Hidden widths of a head from its state_dict (Linear weights in order)."""
    weights = [v for k, v in state.items() if k.endswith(".weight")]
    return [int(w.shape[0]) for w in weights[:-1]]


# --- checkpoints ------------------------------------------------------------------------------
def save_reward_checkpoint(path: str, head, meta: dict, backbone_state: dict | None = None,
                           storage: StorageConfig | None = None) -> str:
    """Write the head (and tuned backbone weights, if any) with its metadata; path, file:// or s3://."""
    import torch

    buf = io.BytesIO()
    state = {k: v.detach().cpu().float() for k, v in head.state_dict().items()}
    bstate = None if not backbone_state else {k: v.detach().cpu().float() for k, v in backbone_state.items()}
    torch.save({"format": CHECKPOINT_FORMAT, "head": state, "backbone_state": bstate, "meta": meta}, buf)
    fs, p = fsspec_fs(path, storage)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_remote(path):  # one PUT: atomic
        with fs.open(p, "wb") as f:
            f.write(buf.getvalue())
    else:
        with fs.open(p + ".tmp", "wb") as f:
            f.write(buf.getvalue())
        fs.mv(p + ".tmp", p)
    return path


def load_reward_checkpoint(spec: str, storage: StorageConfig | None = None) -> dict:
    """The checkpoint dict for a spec. Remote heads are small and read directly, never from a
    local cache, so a head retrained to the same path is never served stale."""
    import torch

    fs, p = fsspec_fs(spec, storage)
    try:
        with fs.open(p, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"reward.head_checkpoint {spec!r} does not exist") from None
    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"reward.head_checkpoint {spec!r} is not an imgcurate reward checkpoint "
                         f"(format {CHECKPOINT_FORMAT}; write one with jobs/train_reward.py)")
    return ckpt


# --- backbones --------------------------------------------------------------------------------
class OpenClipBackbone:
    """open_clip towers; reuses the CLIP stage's loading and (GPU-overlapped) image decoding."""

    kind = "open_clip"

    def __init__(self, cfg: ClipConfig, storage: StorageConfig | None = None, device: str = "auto",
                 micro_batch: int = 256):
        self.spec = cfg
        update = {"micro_batch": micro_batch}
        if device != "auto":
            update["device"] = device
        self._embedder = ClipEmbedder(cfg.model_copy(update=update), storage)
        if cfg.random_weights():
            # Seeded: every actor, every training worker and a later scorer get the same random
            # backbone, so a head trained on it (tests, dry run) still fits when loaded.
            import torch

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                self._embedder._setup()
        else:
            self._embedder._setup()
        self.model = self._embedder._model
        self.tokenizer = self._embedder._tokenizer
        self.device = self._embedder.device
        self.micro_batch = micro_batch
        self.embed_dim = self._embedder.dim
        self.feature_dim = 3 * self.embed_dim

    def describe(self) -> dict:
        return {"model": self.spec.model, "pretrained": self.spec.pretrained, "random_weights": self.spec.random_weights(),
                "model_config_path": self.spec.model_config_path, "embed_dim": self.embed_dim}

    def image_states(self, blobs: list, grad: bool = False):
        """L2-normalized image embeddings (N_ok, d) of the decodable blobs, and which decoded."""
        import torch

        if not grad:
            return self._embedder._encode_images(blobs)
        pixels, ok = self._embedder._decode(blobs)
        if pixels is None:
            return None, ok
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1), ok

    def _texts(self, texts: list[str]):
        import torch

        out = []
        for s in range(0, len(texts), 4 * self.micro_batch):
            tokens = self.tokenizer(texts[s:s + 4 * self.micro_batch]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)

    def features(self, image_state, texts: list[str], owner):
        """(len(texts), 3d): ``[img, txt, img * txt]`` for each caption and its image."""
        import torch

        img = image_state[owner]
        txt = self._texts(texts)
        return torch.cat([img, txt, img * txt], dim=-1)

    def similarity(self, image_state, texts: list[str], owner):
        """Plain CLIP score (cosine) of each caption with its image: the baseline."""
        return (image_state[owner] * self._texts(texts)).sum(-1)

    def tunable(self, last_blocks: int) -> dict:
        """Parameters of the last ``last_blocks`` blocks of both towers and their output layers."""
        m = self.model
        mods = {}
        vis_blocks = m.visual.transformer.resblocks
        txt_blocks = m.transformer.resblocks
        for k in range(min(last_blocks, len(vis_blocks))):
            mods[f"visual.transformer.resblocks.{len(vis_blocks) - 1 - k}"] = vis_blocks[len(vis_blocks) - 1 - k]
        for k in range(min(last_blocks, len(txt_blocks))):
            mods[f"transformer.resblocks.{len(txt_blocks) - 1 - k}"] = txt_blocks[len(txt_blocks) - 1 - k]
        out = {}
        for prefix, mod in mods.items():
            out.update({f"{prefix}.{n}": p for n, p in mod.named_parameters()})
        for name, p in m.named_parameters():
            if name.startswith(("visual.ln_post", "visual.proj", "ln_final", "text_projection")):
                out[name] = p
        return out


class BlipBackbone:
    """transformers BLIP (ITM model) from a local directory: ImageReward's backbone."""

    kind = "blip"

    def __init__(self, path: str, device: str = "auto", micro_batch: int = 256):
        import torch
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        self.path = path[len("file://"):] if path.startswith("file://") else path
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = BlipForImageTextRetrieval.from_pretrained(self.path, torch_dtype=dtype,
                                                               local_files_only=True).to(device).eval()
        self.processor = BlipProcessor.from_pretrained(self.path, local_files_only=True)
        self.micro_batch = micro_batch
        self.feature_dim = int(self.model.config.text_config.hidden_size)
        self.dtype = dtype

    def describe(self) -> dict:
        return {"model": "blip-itm", "pretrained": self.path, "feature_dim": self.feature_dim}

    def image_states(self, blobs: list, grad: bool = False):
        """Vision-transformer hidden states (N_ok, L, D) of the decodable blobs, and which decoded."""
        import torch
        from PIL import Image

        images, ok = [], []
        for b in blobs:
            try:
                with Image.open(io.BytesIO(b)) as im:
                    images.append(im.convert("RGB"))
                ok.append(True)
            except Exception:  # noqa: BLE001 - recorded per row by the caller
                ok.append(False)
        if not images:
            return None, ok
        states = []
        for s in range(0, len(images), self.micro_batch):
            px = self.processor(images=images[s:s + self.micro_batch], return_tensors="pt").pixel_values
            with torch.set_grad_enabled(grad):
                states.append(self.model.vision_model(pixel_values=px.to(self.device, self.dtype))[0])
        return torch.cat(states), ok

    def _tokens(self, texts: list[str]):
        t = self.processor(text=texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
        return t.input_ids.to(self.device), t.attention_mask.to(self.device)

    def features(self, image_state, texts: list[str], owner):
        import torch

        ids, mask = self._tokens(texts)
        enc = image_state[owner]
        out = self.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc,
                                      encoder_attention_mask=torch.ones(enc.shape[:-1], dtype=torch.long,
                                                                        device=enc.device))
        return out[0][:, 0, :].float()

    def similarity(self, image_state, texts: list[str], owner):
        """BLIP's image-text contrastive cosine: the baseline."""
        import torch.nn.functional as F

        ids, mask = self._tokens(texts)
        q = self.model.text_encoder(input_ids=ids, attention_mask=mask)[0][:, 0, :]
        img = F.normalize(self.model.vision_proj(image_state[:, 0, :]).float(), dim=-1)
        txt = F.normalize(self.model.text_proj(q).float(), dim=-1)
        return (img[owner] * txt).sum(-1)

    def tunable(self, last_blocks: int) -> dict:
        layers = self.model.text_encoder.encoder.layer
        out = {}
        for k in range(min(last_blocks, len(layers))):
            i = len(layers) - 1 - k
            out.update({f"text_encoder.encoder.layer.{i}.{n}": p for n, p in layers[i].named_parameters()})
        return out


def load_backbone(backbone_type: str, clip: ClipConfig | None, blip_path: str | None,
                  storage: StorageConfig | None = None, device: str = "auto", micro_batch: int = 256):
    """The backbone for a spec (weights are never downloaded for null / local / s3 specs)."""
    if backbone_type == "blip":
        return BlipBackbone(blip_path, device, micro_batch)
    if clip is None:
        raise ValueError("reward: an open_clip backbone needs a spec (reward.backbone or the CLIP stage's)")
    return OpenClipBackbone(clip, storage, device, micro_batch)


def check_meta(meta: dict, backbone, spec: str) -> None:
    """A head fits only the backbone (type, model, width) it was trained on."""
    if meta.get("backbone_type") != backbone.kind:
        raise ValueError(f"reward.head_checkpoint {spec!r} was trained on a {meta.get('backbone_type')!r} backbone, "
                         f"but reward.backbone_type is {backbone.kind!r}")
    if int(meta.get("feature_dim", -1)) != backbone.feature_dim:
        raise ValueError(f"reward.head_checkpoint {spec!r} expects {meta.get('feature_dim')} features but the "
                         f"backbone gives {backbone.feature_dim}: use the backbone it was trained on "
                         f"({meta.get('backbone')})")
    trained = (meta.get("backbone") or {}).get("model")
    here = backbone.describe().get("model")
    if trained and here and trained != here:
        raise ValueError(f"reward.head_checkpoint {spec!r} was trained on backbone {trained!r}, not {here!r}")


def load_tuned_backbone_state(backbone, state: dict | None, spec: str) -> None:
    """Copy fine-tuned backbone blocks from a checkpoint over the loaded backbone."""
    if not state:
        return
    missing, unexpected = backbone.model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"reward.head_checkpoint {spec!r}: backbone weights {unexpected[:3]} do not fit the backbone")


def pair_scores(head, features, mean: float = 0.0, std: float = 1.0):
    """Standardized reward of each feature row."""
    return (head(features).squeeze(-1) - mean) / std


# --- operator ---------------------------------------------------------------------------------
class RewardScorer(Operator):
    """Writes ``reward_scores`` (aligned with ``captions``), ``reward``, ``best_caption``, ``best_caption_source``.

    Reads ``caption_sources`` too when present (``best_caption_source`` is null otherwise).
    Blank captions get a null score and are never the best; a sample with no caption to score
    keeps a null reward, and is dropped as ``no_caption`` only when ``min_reward`` is set.
    """

    name: ClassVar[str] = "reward"
    reads = ("status", "drop_stage", "drop_reason", "error_message", "image", "captions")
    writes = ("reward_scores", "reward", "best_caption", "best_caption_source")

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

    def backbone_config(self) -> ClipConfig | None:
        return self.config.backbone or self.clip

    # -- state, once per actor ----------------------------------------------------------------
    def _setup(self):
        if self._head is not None:
            return
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

    # -- batch ---------------------------------------------------------------------------------
    def process(self, batch: pa.Table) -> pa.Table:
        import torch

        n = batch.num_rows
        alive = alive_mask(batch)
        outcomes: list = [None] * n
        scores_out: list = [None] * n
        reward_out: list = [None] * n
        best_out: list = [None] * n
        source_out: list = [None] * n
        idx = [i for i in range(n) if alive[i]]
        if idx:
            self._setup()
            t = self.config.min_reward
            blobs = batch.column("image").take(pa.array(idx, pa.int64())).to_pylist()
            captions = batch.column("captions").to_pylist()
            sources = (batch.column("caption_sources").to_pylist() if "caption_sources" in batch.column_names
                       else [None] * n)
            with torch.inference_mode():
                states, ok = self._backbone.image_states(blobs)
                texts, owner, where = [], [], []
                good = [i for k, i in enumerate(idx) if ok[k]]
                for k, i in enumerate(idx):
                    if not ok[k]:
                        outcomes[i] = (FAILED, "decode_error", "image bytes could not be decoded for the reward model")
                for g, i in enumerate(good):
                    caps = captions[i] or []
                    scores_out[i] = [None] * len(caps)
                    for j, cap in enumerate(caps):
                        if cap is not None and cap.strip():
                            texts.append(cap)
                            owner.append(g)
                            where.append((i, j))
                if texts:
                    feats = self._backbone.features(states, texts, torch.as_tensor(owner, device=states.device))
                    r = pair_scores(self._head, feats, self._mean, self._std).float().cpu().numpy()
                    for (i, j), v in zip(where, r):
                        scores_out[i][j] = float(v)
            for i in good:
                vals = [(v, j) for j, v in enumerate(scores_out[i]) if v is not None and math.isfinite(v)]
                if not vals:
                    if t is not None:
                        outcomes[i] = (DROPPED, "no_caption", "no caption to score")
                    continue
                v, j = max(vals)  # ties: the later caption (recaptions come last) wins
                reward_out[i] = v
                best_out[i] = captions[i][j]
                src = sources[i]
                source_out[i] = src[j] if src is not None and len(src) == len(captions[i]) else None
                if t is not None and v < t:
                    outcomes[i] = (DROPPED, threshold_reason(t), f"reward {v:.4f} < {t:g}")
        batch = set_columns(batch, {
            "reward_scores": pa.array(scores_out, pa.list_(pa.float32())),
            "reward": pa.array(reward_out, pa.float32()),
            "best_caption": pa.array(best_out, pa.string()),
            "best_caption_source": pa.array(source_out, pa.string()),
        })
        return mark(batch, self.name, outcomes)


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

