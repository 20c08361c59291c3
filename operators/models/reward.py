"""The reward model: backbones, the MLP head, its checkpoints, and the pair scores.

Following ImageReward (Xu et al., 2023), as Compress & Align (Zhang et al., 2023) trains it: a
frozen-or-lightly-tuned vision-language backbone plus a small MLP head giving one scalar per
(image, caption) pair, trained with the Bradley-Terry pairwise loss ``-log sigmoid(r_preferred -
r_other)`` (jobs/train_reward.py); rewards are standardized by the mean and std of the training
rewards, as ImageReward does, so a threshold means the same across checkpoints.

Backbones:
- ``open_clip`` (default): the image and text towers of a CLIP model (``ClipModel``, the same
  specs as the CLIP stage: tag, ``hf-hub:``, path, ``file://``, ``s3://``); the head sees
  ``[img, txt, img * txt]`` of the L2-normalized embeddings (the last term sums to the CLIP score).
- ``blip``: a transformers ``BlipForImageTextRetrieval`` saved at a local path; the head sees
  the [CLS] state of BLIP's image-grounded text encoder, exactly ImageReward's feature.

Each backbone's own image-text score (``similarity``) is the baseline a trained head is measured
against: the CLIP score (cosine of the open_clip embeddings), or BLIP's image-text contrastive
(ITC) cosine of its projected [CLS] states; ``BASELINES`` names them in reports.

The head checkpoint is a ``torch.save`` of ``{"format", "head", "backbone_state", "meta"}`` at a
path, ``file://`` or ``s3://``. A head built without one has seeded random weights.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from operators.models.clip import ClipModel
from operators.models.common import RANDOM_SEED, decode_all, resolve_device, seeded
from operators.storage import StorageConfig, fsspec_fs, write_bytes_atomic

if TYPE_CHECKING:
    from operators.clip import ClipConfig

CHECKPOINT_FORMAT = "imgcurate.reward/1"
FEATURES = {"open_clip": "concat(img, txt, img*txt) of L2-normalized open_clip embeddings",
            "blip": "[CLS] of BLIP's image-grounded text encoder (ImageReward)"}
# The name of each backbone's own image-text score in reports (``similarity``, the baseline).
BASELINES = {"open_clip": "CLIP score", "blip": "BLIP ITC score"}


# --- head -------------------------------------------------------------------------------------
def build_head(feature_dim: int, hidden: list[int], dropout: float = 0.0, seed: int | None = RANDOM_SEED):
    """MLP ``feature_dim -> hidden... -> 1`` (GELU between); seeded, so a random head is reproducible."""
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

    return seeded(build, seed)


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
    write_bytes_atomic(path, buf.getvalue(), storage)
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
    """open_clip towers through the public ``ClipModel`` (the CLIP stage's loading and GPU-overlapped decoding)."""

    kind = "open_clip"

    def __init__(self, cfg: "ClipConfig", storage: StorageConfig | None = None, device: str = "auto",
                 micro_batch: int = 256):
        self.spec = cfg
        # Random weights are seeded (ClipModel): every actor, every training worker and a later
        # scorer get the same random backbone, so a head trained on it (tests, dry run) still fits.
        self.clip = ClipModel(cfg, storage, cfg.device if device == "auto" else device, micro_batch)
        self.model = self.clip.model
        self.tokenizer = self.clip.tokenizer
        self.device = self.clip.device
        self.micro_batch = micro_batch
        self.embed_dim = self.clip.dim
        self.feature_dim = 3 * self.embed_dim

    def describe(self) -> dict:
        return {"model": self.spec.model, "pretrained": self.spec.pretrained, "random_weights": self.spec.random_weights(),
                "model_config_path": self.spec.model_config_path, "embed_dim": self.embed_dim}

    def encode_blobs(self, blobs: list, grad: bool = False, stage: str = "reward"):
        """L2-normalized image embeddings (N_ok, d) of the decodable blobs, and per blob ``None`` or
        its ``decode_error`` outcome in ``stage``."""
        if not grad:
            return self.clip.encode_images(blobs, stage)
        pixels, outcomes = self.clip.pixels(blobs, stage)
        if pixels is None:
            return None, outcomes
        return self.clip.encode_pixels(pixels), outcomes

    def image_states(self, blobs: list, grad: bool = False):
        """L2-normalized image embeddings (N_ok, d) of the decodable blobs, and which decoded."""
        states, outcomes = self.encode_blobs(blobs, grad)
        return states, [o is None for o in outcomes]

    def _texts(self, texts: list[str]):
        return self.clip.encode_texts(texts, chunk=4 * self.micro_batch)

    def features(self, image_state, texts: list[str], owner):
        """(len(texts), 3d): ``[img, txt, img * txt]`` for each caption and its image."""
        import torch

        img = image_state[owner]
        txt = self._texts(texts)
        return torch.cat([img, txt, img * txt], dim=-1)

    def similarity(self, image_state, texts: list[str], owner):
        """CLIP score (cosine) of each caption with its image: the baseline (``BASELINES``)."""
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
        self.device = device = resolve_device(device)
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = BlipForImageTextRetrieval.from_pretrained(self.path, torch_dtype=dtype,
                                                               local_files_only=True).to(device).eval()
        self.processor = BlipProcessor.from_pretrained(self.path, local_files_only=True)
        self.micro_batch = micro_batch
        self.feature_dim = int(self.model.config.text_config.hidden_size)
        self.dtype = dtype

    def describe(self) -> dict:
        return {"model": "blip-itm", "pretrained": self.path, "feature_dim": self.feature_dim}

    def encode_blobs(self, blobs: list, grad: bool = False, stage: str = "reward"):
        """Vision-transformer hidden states (N_ok, L, D) of the decodable blobs, and per blob ``None``
        or its ``decode_error`` outcome in ``stage``."""
        import torch

        decoded, outcomes = decode_all(blobs, stage)
        images = [im for im in decoded if im is not None]
        if not images:
            return None, outcomes
        states = []
        for s in range(0, len(images), self.micro_batch):
            px = self.processor(images=images[s:s + self.micro_batch], return_tensors="pt").pixel_values
            with torch.set_grad_enabled(grad):
                states.append(self.model.vision_model(pixel_values=px.to(self.device, self.dtype))[0])
        return torch.cat(states), outcomes

    def image_states(self, blobs: list, grad: bool = False):
        """Vision-transformer hidden states (N_ok, L, D) of the decodable blobs, and which decoded."""
        states, outcomes = self.encode_blobs(blobs, grad)
        return states, [o is None for o in outcomes]

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
        """BLIP's image-text contrastive (ITC) cosine, as ``BlipForImageTextRetrieval(use_itm_head=False)``
        computes it: the baseline (``BASELINES``). Not the ITM head's match logit."""
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


def load_backbone(backbone_type: str, clip: "ClipConfig | None", blip_path: str | None,
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
