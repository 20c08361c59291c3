"""A DINOv2 image encoder from timm, preprocessed as RIGID runs it.

RIGID (He, Chen and Ho, 2024, "RIGID: A Training-free and Model-Agnostic Framework for Robust
AI-Generated Image Detection"; reference code IBM/RIGID) embeds images with DINOv2 ViT-L/14
(Oquab et al., 2023, torch.hub ``dinov2_vitl14``): ``Resize((224, 224))`` (a squash, no crop),
``ToTensor``, ``Normalize`` with ImageNet mean/std, and the model's output, the final-norm CLS
token. Here the same network and weights come from timm (``vit_large_patch14_dinov2.lvd142m``,
pooled CLS token after the final norm, no head). The difference: DINOv2 was trained at 518 px
and torch.hub's model interpolates its position embeddings to the 16 x 16 grid of a 224 px input
at every forward; timm's model is built at the configured ``image_size`` and resamples them once,
at load (bicubic, antialiased): the same operation done once, not bit-identical.

Weights by timm pretrained tag (``lvd142m``, fetched by timm from the Hugging Face hub), by a
checkpoint at a path, ``file://`` or ``s3://`` (timm's or the original DINOv2 key layout; timm's
``checkpoint_filter_fn`` converts and resamples), or seeded random weights (``pretrained: null``;
tests and the dry run build a tiny model through ``model_args``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from operators.models.common import seeded
from operators.models.laion import squash_inputs
from operators.storage import StorageConfig, local_copy

if TYPE_CHECKING:
    from operators.safety import DinoSpec


def is_checkpoint(pretrained: str | None) -> bool:
    """A path or URL (a checkpoint), as opposed to a timm pretrained tag."""
    return pretrained is not None and ("://" in pretrained or "/" in pretrained
                                       or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")))


def build_dino(spec: "DinoSpec", storage: StorageConfig | None = None, cache_dir: str | None = None):
    """The timm model for a spec: CLS-token features (``num_classes=0``) at ``spec.image_size``."""
    import timm

    kwargs = dict(num_classes=0, img_size=spec.image_size, **spec.model_args)
    if spec.pretrained is None:
        return seeded(lambda: timm.create_model(spec.model, pretrained=False, **kwargs)).eval()
    if not is_checkpoint(spec.pretrained):
        return timm.create_model(f"{spec.model}.{spec.pretrained}", pretrained=True, **kwargs).eval()
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = seeded(lambda: timm.create_model(spec.model, pretrained=False, **kwargs))
    path = local_copy(spec.pretrained, storage, cache_dir)
    state = checkpoint_filter_fn(load_state_dict(path), model)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"safety.rigid.dinov2: checkpoint {spec.pretrained!r} does not fit {spec.model} "
                         f"(check safety.rigid.dinov2.model / model_args): {exc}") from None
    return model.eval()


class DinoModel:
    """A loaded DINOv2 and RIGID's preprocessing. Public: ``model``, ``device``, ``dtype``, ``dim``,
    ``image_size``."""

    def __init__(self, spec: "DinoSpec", storage: StorageConfig | None = None, device: str = "cpu",
                 cache_dir: str | None = None):
        import torch

        self.spec = spec
        self.device = device
        precision = spec.precision
        if precision == "auto":
            precision = "fp16" if device.startswith("cuda") else "fp32"
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        self.model = build_dino(spec, storage, cache_dir).to(device, self.dtype)
        self.dim = int(self.model.num_features)
        self.image_size = spec.image_size

    def preprocess_pil(self, images: list):
        """RIGID's preprocessing: squash to image_size x image_size, ImageNet mean/std; (N, 3, S, S) float32 on the CPU."""
        import torch

        return torch.from_numpy(squash_inputs(images, self.image_size))

    def encode_pixels(self, pixels, normalize: bool = False):
        """CLS-token features (N, dim) of preprocessed pixels, float32."""
        import torch

        e = self.model(pixels.to(self.device, self.dtype)).float()
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e
