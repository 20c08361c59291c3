"""Image Textualization's vision expert (Pi et al., 2024): an open-vocabulary detector that looks
for each object the reference description names. The paper runs Grounding DINO (Swin-B) once per
object; we load any transformers ``AutoModelForZeroShotObjectDetection`` whose processor takes
per-image text queries (Grounding DINO, the default; OWL-ViT, OWLv2) and ask for all of an
image's objects in one call, from an HF id, a local dir, ``file://``, ``s3://``, or random
weights built from a config dir (tests, dry run)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from operators.storage import StorageConfig


class DetectorConfig(BaseModel):
    """Pass 2's detector (``recaption.textualize.detector``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field("IDEA-Research/grounding-dino-base",
                              description="open-vocabulary detector (AutoModelForZeroShotObjectDetection: OWL-ViT, "
                                          "OWLv2, Grounding DINO): HF id, local dir, file:// or s3:// prefix; null = "
                                          "random weights from model_config_path")
    revision: str | None = Field(None, description="HF revision (commit) of a hub detector: pins the cache key too")
    model_config_path: str | None = Field(None, description="dir with the detector's transformers config + processor "
                                                            "files (random weights: tests, dry run)")
    score_threshold: float = Field(0.3, ge=0, le=1, description="a named object with no box at or above this score "
                                                                "is not in the image, a hallucination (the paper: "
                                                                "0.3-0.4 with Grounding DINO; OWLv2: about 0.1)")
    text_threshold: float = Field(0.25, ge=0, le=1, description="Grounding DINO only: a query token must score this "
                                                              "for a box to be labeled with it (the paper: 0.15-0.25)")
    nms_iou: float = Field(0.5, gt=0, le=1, description="boxes of one object overlapping a higher-scoring one by "
                                                        "more than this IoU are the same object")
    micro_batch: int = Field(8, ge=1, description="images per detector call")


@dataclass(frozen=True)
class Detection:
    """One box for one query: ``box`` is (x0, y0, x1, y1) in pixels."""

    query: str
    score: float
    box: tuple[float, float, float, float]


class OpenVocabularyDetector:
    """Boxes for per-image text queries; ``detect`` returns, per image, the detections at or above
    ``score_threshold`` (duplicates of one query suppressed by IoU)."""

    def __init__(self, cfg: DetectorConfig, storage: StorageConfig | None, device: str, dtype, cache_dir: str | None):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        from operators.recaption.captioners import load_pretrained, load_processor

        self.cfg = cfg
        self.device = device
        model, path = load_pretrained(AutoModelForZeroShotObjectDetection, cfg.model, cfg.model_config_path,
                                      cfg.revision, storage, cache_dir, dtype)
        self.model = model.to(device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.processor = load_processor(AutoProcessor, path, cfg.revision)
        self.grounding = "input_ids" in _params(self.processor.post_process_grounded_object_detection)

    def detect(self, images: list, queries: list[list[str]]) -> list[list[Detection]]:
        """Per image, the boxes found for its queries (an image without queries gets none)."""
        import torch

        out: list[list[Detection]] = [[] for _ in images]
        todo = [i for i, q in enumerate(queries) if q]
        if not todo:
            return out
        ims, qs = [images[i] for i in todo], [list(queries[i]) for i in todo]
        with torch.inference_mode():
            inputs = self.processor(images=ims, text=qs, return_tensors="pt", **self._text_kwargs())
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items() if hasattr(v, "to")}
            outputs = self.model(**inputs)
            sizes = [(im.height, im.width) for im in ims]
            kw = {"threshold": self.cfg.score_threshold, "target_sizes": sizes}
            if self.grounding:  # Grounding DINO: labels are the query phrases its tokens matched
                kw.update(input_ids=inputs["input_ids"], text_threshold=self.cfg.text_threshold, text_labels=qs)
            results = self.processor.post_process_grounded_object_detection(outputs, **kw)
        for i, q, r in zip(todo, qs, results):
            dets = []
            for s, lab, b in zip(r["scores"].tolist(), _labels(r, q, self.grounding), r["boxes"].tolist()):
                if lab is not None and b[2] > b[0] and b[3] > b[1]:  # a box without area proves nothing
                    dets.append(Detection(lab, float(s), tuple(float(v) for v in b)))
            out[i] = suppress(dets, self.cfg.nms_iou)
        return out

    def _text_kwargs(self) -> dict:
        tok = getattr(self.processor, "tokenizer", None)
        limit = getattr(tok, "model_max_length", None)
        if self.grounding or not limit or limit > 4096:
            return {"padding": True, "truncation": True}
        return {"padding": "max_length", "truncation": True, "max_length": limit}  # OWL-ViT: fixed 16 tokens


def _params(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def _labels(result: dict, queries: list[str], grounding: bool) -> list[str | None]:
    """The query each box answers. OWL-ViT gives query indices (queries are padded to the batch's
    longest list: a padded index answers nothing). Grounding DINO gives the words of the prompt
    whose tokens scored ``text_threshold``: the box answers the query those words spell, else the
    longest query whose words are all among them (first in the prompt on a tie), else none."""
    if not grounding:
        return [queries[int(x)] if 0 <= int(x) < len(queries) else None for x in result["labels"].tolist()]
    out = []
    for phrase in result["text_labels"]:
        words = re.sub(r"\[[A-Z]+\]|[^\w\s']", " ", str(phrase)).split()
        text = " ".join(words)
        inside = [q for q in queries if q.split() and set(q.split()) <= set(words)]
        out.append(text if text in queries else (max(inside, key=len) if inside else None))
    return out


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def suppress(dets: list[Detection], iou: float) -> list[Detection]:
    """Per query, highest score first, boxes overlapping a kept one by more than ``iou`` dropped."""
    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.score):
        if all(k.query != d.query or _iou(k.box, d.box) <= iou for k in kept):
            kept.append(d)
    return kept


# --- tiny model (tests, dry run) -----------------------------------------------------------------------
def write_tiny_detector(path: str, weights: bool = False, image_size: int = 64, hidden: int = 32,
                        layers: int = 2) -> str:
    """An OWL-ViT-shaped open-vocabulary detector: config + processor files (and seeded random
    weights when ``weights``). Its tokenizer is CLIP's byte-level BPE with no merges (one token per
    character, 16 tokens a query as OWL-ViT's). Random weights box things at random."""
    from transformers import (CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor,
                              OwlViTProcessor)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from operators.recaption.captioners import save_tiny

    chars = sorted(set(bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text = {"vocab_size": len(vocab), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 2, "max_position_embeddings": 16,
            "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"]}
    vision = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": 2, "image_size": image_size, "patch_size": 16}
    cfg = OwlViTConfig(text_config=text, vision_config=vision, projection_dim=hidden)
    size = {"height": image_size, "width": image_size}
    os.makedirs(path, exist_ok=True)
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tok)
    processor.save_pretrained(path)
    return save_tiny(path, cfg, OwlViTForObjectDetection, weights)
