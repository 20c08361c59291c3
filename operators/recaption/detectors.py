"""The vision expert of Image Textualization mode (``recaption.textualize``): a torchvision COCO
detector, or a transformers object detector saved at a path, listing objects with boxes and
scores for the prompt (``prompts.describe_objects`` turns them into facts)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from operators.models.common import seeded
from operators.storage import StorageConfig, local_copy


class DetectorConfig(BaseModel):
    """The vision expert of Image Textualization mode (``recaption.textualize``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = Field(False, description="Image Textualization: a detector lists objects with boxes, sizes and "
                                             "positions for the prompt")
    backend: Literal["torchvision", "transformers"] = Field(
        "torchvision", description="a torchvision COCO detector, or a transformers AutoModelForObjectDetection")
    model: str = Field("fasterrcnn_resnet50_fpn_v2",
                       description="torchvision detection model name, or a transformers detector's local dir / HF id")
    weights: str | None = Field("DEFAULT", description="torchvision: a weights tag (downloads), a checkpoint path / "
                                                       "file:// / s3://, or null = random weights")
    score_threshold: float = Field(0.5, ge=0, le=1, description="detections below this confidence are not facts")
    max_objects: int = Field(12, ge=1, description="facts listed per image, largest-scoring first")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: the recaption stage's device")


class TorchvisionDetector:
    """A torchvision COCO detector (``get_model(name)``); weights by tag, checkpoint or random."""

    def __init__(self, cfg: DetectorConfig, storage: StorageConfig | None, device: str, cache_dir: str | None):
        import torch
        from torchvision.models import detection, get_model

        self.cfg = cfg
        self.device = device
        weights = cfg.weights

        def build(**kw):
            # The model's own score cut (R-CNNs: box_score_thresh; RetinaNet, FCOS, SSD: score_thresh)
            # must not hide what score_threshold would keep.
            for name in ("box_score_thresh", "score_thresh"):
                try:
                    return get_model(cfg.model, **kw, **{name: min(cfg.score_threshold, 0.05)})
                except TypeError:
                    continue
            return get_model(cfg.model, **kw)

        if weights is None or "://" in weights or weights.startswith(("/", ".")) or weights.endswith((".pt", ".pth")):
            model = seeded(lambda: build(weights=None, weights_backbone=None, num_classes=91))
            if weights is not None:
                state = torch.load(local_copy(weights, storage, cache_dir), map_location="cpu", weights_only=True)
                model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        else:  # a torchvision weights tag: downloads into torch's hub cache
            model = build(weights=weights)
        self.labels = list(detection.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"])
        self.model = model.to(device).eval()

    def detect(self, images: list) -> list[list[tuple[str, float, tuple]]]:
        import torch
        from torchvision.transforms.functional import pil_to_tensor

        out = []
        with torch.inference_mode():
            tensors = [pil_to_tensor(im).to(self.device).float().div_(255) for im in images]
            for res in self.model(tensors):
                keep = res["scores"] >= self.cfg.score_threshold
                out.append([(self.labels[int(l)] if int(l) < len(self.labels) else str(int(l)), float(s),
                             tuple(float(v) for v in b))
                            for b, l, s in zip(res["boxes"][keep].cpu(), res["labels"][keep].cpu(),
                                               res["scores"][keep].cpu())])
        return out


class TransformersDetector:
    """A transformers object detector (DETR, Conditional/Deformable DETR, RT-DETR...) from a dir or HF id."""

    def __init__(self, cfg: DetectorConfig, storage: StorageConfig | None, device: str, cache_dir: str | None):
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        path = local_copy(cfg.model, storage, cache_dir)
        self.cfg = cfg
        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = AutoModelForObjectDetection.from_pretrained(path).to(device).eval()
        self.id2label = self.model.config.id2label

    def detect(self, images: list) -> list[list[tuple[str, float, tuple]]]:
        import torch

        with torch.inference_mode():
            inputs = self.processor(images=images, return_tensors="pt").to(self.device)
            outputs = self.model(**inputs)
            sizes = torch.tensor([(im.height, im.width) for im in images], device=self.device)
            results = self.processor.post_process_object_detection(outputs, threshold=self.cfg.score_threshold,
                                                                   target_sizes=sizes)
        return [[(self.id2label.get(int(l), str(int(l))), float(s), tuple(float(v) for v in b))
                 for s, l, b in zip(r["scores"].cpu(), r["labels"].cpu(), r["boxes"].cpu())] for r in results]
