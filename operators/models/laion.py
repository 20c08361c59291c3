"""LAION's released safety and quality models, rebuilt with module names that load the released weights.

LAION-5B (Schuhmann et al., 2022) publishes, per sample, an NSFW probability ``punsafe`` and a
watermark probability ``pwatermark``, and LAION-Aesthetics an ``aesthetic`` score:

- NSFW: LAION-AI/CLIP-based-NSFW-Detector, an MLP on the L2-normalized CLIP image embedding
  (AutoKeras, ported to PyTorch in that repo's ``src/models.py``): a Keras ``Normalization``
  (mean/variance buffers), then ``linear_1..linear_k`` with ReLU and a sigmoid out. ViT-L/14:
  768 -> 64 -> 512 -> 256 -> 1; ViT-B/32: 512 -> 32 -> 32 -> 1. Module names are kept, so the
  released ``models/clip_ViT-L-14_openai_binary_nsfw_head.pth`` and
  ``models/clip_ViT-B-32_openai_binary_nsfw_head.pth`` (``convert_heads_to_pytorch.py``) load as is.
  The heads were trained on OpenAI CLIP embeddings of that model and nothing else.
- Aesthetic predictor v2: christophschuhmann/improved-aesthetic-predictor, ``MLP.layers`` =
  Linear(d,1024), Dropout(.2), Linear(1024,128), Dropout(.2), Linear(128,64), Dropout(.1),
  Linear(64,16), Linear(16,1) on the L2-normalized embedding (no activations, as released);
  ``sac+logos+ava1-l14-linearMSE.pth`` loads as is. Trained on OpenAI CLIP ViT-L/14 embeddings
  (``clip.load("ViT-L/14")`` in ``simple_inference.py``).
- Watermark: LAION-AI/LAION-5B-WatermarkDetection (``inference.py``): timm ``efficientnet_b3a``
  whose ``classifier`` is Linear(1536,625), ReLU, Dropout(.3), Linear(625,256), ReLU,
  Linear(256,2); input Resize((256,256)) (no crop), ImageNet mean/std; softmax, and column 0
  is "P Watermark", column 1 "P Clean". timm >= 0.9 maps the name ``efficientnet_b3a`` to
  ``efficientnet_b3`` (the same architecture and keys), so that is the default.

``RELEASED_NSFW`` / ``RELEASED_AESTHETIC`` record, per released head, the embedder it was trained
on (``MODEL/PRETRAINED`` as open_clip names it) and its layout; the safety stage refuses a head
on another embedder's embeddings (operators/safety.py). A head built here has seeded random weights (``operators.models.common.seeded``) until
``load_state`` loads a checkpoint into it. The specs are the safety stage's config classes
(operators/safety.py).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from operators.models.common import seeded
from operators.storage import StorageConfig, local_copy

if TYPE_CHECKING:
    from operators.safety import AestheticSpec, NsfwSpec, WatermarkSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Released NSFW heads (LAION-AI/CLIP-based-NSFW-Detector ``src/models.py``): the embedder each was
# trained on -> (embedding width, hidden widths).
RELEASED_NSFW = {"ViT-L-14/openai": (768, (64, 512, 256)), "ViT-B-32/openai": (512, (32, 32))}
# Released aesthetic v2 MLP (christophschuhmann/improved-aesthetic-predictor): embedder -> width.
RELEASED_AESTHETIC = {"ViT-L-14/openai": 768}


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
            self.input_width = embed_dim
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
            self.input_size = self.input_width = input_size
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


def build_nsfw_head(spec: "NsfwSpec", embed_dim: int | None = None):
    """The NSFW head of a spec; ``embed_dim`` is the embedder's width when the spec leaves it null."""
    _, NsfwHead, _ = _nn()
    dim = _width(spec, embed_dim, "nsfw")
    return seeded(lambda: NsfwHead(dim, list(spec.layout()))).eval()


def build_aesthetic_head(spec: "AestheticSpec", embed_dim: int | None = None):
    _, _, AestheticMLP = _nn()
    dim = _width(spec, embed_dim, "aesthetic")
    return seeded(lambda: AestheticMLP(dim)).eval()


def _width(spec, embed_dim: int | None, what: str) -> int:
    dim = spec.embed_dim or embed_dim or spec.released_width()
    if dim is None:
        raise ValueError(f"safety.{what}.embed_dim is null and the width of {spec.embedder!r} is not known: set it")
    return dim


def build_watermark_model(spec: "WatermarkSpec"):
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

    return seeded(build).eval()


def squash_inputs(images: list, size: int) -> np.ndarray:
    """PIL images squashed to Resize((size, size)) (no crop), ImageNet mean/std; float32 (N, 3, size, size).

    LAION's watermark preprocessing (``inference.py``, 256 px) and RIGID's (IBM/RIGID, 224 px)."""
    from PIL import Image

    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    # torchvision's Resize((s, s)) on a PIL image is PIL's bilinear resize: the same here.
    arrs = [((np.asarray(im.resize((size, size), Image.BILINEAR), np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
            for im in images]
    return np.ascontiguousarray(np.stack(arrs))


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
