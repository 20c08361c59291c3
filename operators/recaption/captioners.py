"""Recaptioner: a detailed caption from a vision-language model, ranked later against the alt-text.

Web alt-text is short and noisy; recent datasets train on model-written captions (Image
Textualization, Pi et al. 2024; ImageInWords, Garg et al. 2024). This stage writes
``recaption`` and ``recaption_model`` and appends the new caption to ``captions`` with the
source ``recaption:<model>``, so the reward stage, which runs after it, ranks it against the
alt-texts (``best_caption_source`` says which won; the manifest counts how often it was the
recaption).

Two backends (``recaption.backend``):

- ``transformers`` (this operator, GPU actors): image-to-text models through
  ``AutoModelForImageTextToText`` (BLIP, BLIP-2, GIT, Florence-2, LLaVA, Qwen2.5-VL, SmolVLM...),
  batched ``generate`` in half precision on CUDA, micro-batches sorted by prompt length so little
  is padded. Prompt styles: ``prefix`` (captioners: the prompt is a text prefix, e.g. BLIP's
  "a picture of"), ``chat`` (instruction VLMs: the processor's chat template with one image and
  the prompt), ``auto`` (chat when the processor has a chat template).
- ``vllm``: ``ray.data.llm``'s vLLM processor with its multimodal stage, for large VLMs; see
  :func:`vllm_processor_config` and :func:`vllm_preprocess`. It needs a GPU and ``pip install
  'imgcurate[vllm]'``.

Image Textualization mode (``recaption.textualize``): a vision expert first lists objects with
boxes, scores and relative sizes (a torchvision COCO detector, or a transformers object detector
saved at a path); the prompt gives the model the alt-text and these facts and asks for one
detailed caption naming only what is there.

Only kept rows are recaptioned. Results are cached by (image sha256, settings, prompt inputs):
one small JSON object per image under ``cache_path/<settings key>/``, read and written in
concurrent batches, so a resumed wave or a later refresh never regenerates a caption it has.

Random weights (``model: null`` + ``model_config_path``, a directory holding a transformers
config and processor files) build the model from its config without any download; its output
is gibberish, and the run manifest and summary say so.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import logging
import os
import re
import threading
import unicodedata
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.base import (FAILED, Operator, Resources, StageResources, alive_mask, mark, model_stage_resources,
                            set_columns)
from operators.storage import StorageConfig, fsspec_fs, is_remote, join, local_copy

log = logging.getLogger(__name__)

SOURCE_PREFIX = "recaption:"
RANDOM_SEED = 0
DEFAULT_CHAT_PROMPT = "Describe this image in one detailed paragraph. Mention only what is visible."
DEFAULT_TEXTUALIZE_PROMPT = (
    "Write one detailed caption for this image.\n"
    "The web page's alt-text for it was: \"{alt_text}\".\n"
    "An object detector found:\n{facts}\n"
    "Use the alt-text and the detections only where the image agrees with them; name only what is "
    "actually there. Reply with the caption only."
)


# --- config -------------------------------------------------------------------------------------
class DetectorConfig(BaseModel):
    """The vision expert of Image Textualization mode (``recaption.textualize``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = False
    backend: Literal["torchvision", "transformers"] = "torchvision"
    model: str = Field("fasterrcnn_resnet50_fpn_v2",
                       description="torchvision detection model name, or a transformers detector's local dir / HF id")
    weights: str | None = Field("DEFAULT", description="torchvision: a weights tag (downloads), a checkpoint path / "
                                                       "file:// / s3://, or null = random weights")
    score_threshold: float = Field(0.5, ge=0, le=1)
    max_objects: int = Field(12, ge=1, description="facts listed per image, largest-scoring first")
    device: Literal["auto", "cuda", "cpu"] = "auto"


class VllmConfig(BaseModel):
    """``ray.data.llm`` vLLM processor settings (``recaption.backend: vllm``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    engine_kwargs: dict[str, Any] = Field(default_factory=lambda: {"max_model_len": 8192},
                                          description="vLLM engine arguments (tensor_parallel_size, dtype, ...)")
    concurrency: int = Field(1, ge=1, description="vLLM engine replicas")
    batch_size: int = Field(64, ge=1)
    accelerator_type: str | None = Field(None, description="e.g. H100; null = any GPU")
    image_format: Literal["jpeg", "png", "webp"] = "jpeg"


class RecaptionConfig(StageResources):
    """Recaption stage settings (``recaption:`` in the job config)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = False
    backend: Literal["transformers", "vllm"] = "transformers"
    model: str | None = Field("Salesforce/blip-image-captioning-base",
                              description="HF id, local dir, file:// or s3:// prefix; null = random weights built "
                                          "from model_config_path")
    revision: str | None = Field(None, description="HF revision (commit) of a hub model: pins the cache key too")
    model_config_path: str | None = Field(None, description="dir with a transformers config + processor files "
                                                            "(random weights: tests, dry run)")
    model_name: str | None = Field(None, description="name in recaption_model and the caption source; "
                                                     "default: the model's last path part")
    prompt_style: Literal["auto", "prefix", "chat"] = "auto"
    prompt: str | None = Field(None, description="template; {alt_text} and {facts} are filled in. null: "
                                                 "empty (prefix), a describe-it prompt (chat), the IT prompt "
                                                 "(textualize)")
    system_prompt: str | None = None
    max_alt_text_chars: int = Field(400, ge=0, description="alt-text put in prompts is cut to this")
    max_prompt_tokens: int = Field(512, ge=8)
    max_new_tokens: int = Field(96, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    num_beams: int = Field(1, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    max_caption_chars: int = Field(2000, ge=1, description="longer output is cut at a word boundary")
    textualize: DetectorConfig = DetectorConfig()
    vllm: VllmConfig = VllmConfig()
    cache: bool = True
    cache_path: str | None = Field(None, description="cache root (local or s3://); null: <output>/_cache/recaption")
    cache_dir: str | None = Field(None, description="where s3:// models are copied (default: a temp dir)")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    batch_size: int = Field(64, ge=1)
    micro_batch: int = Field(32, ge=1, description="images per generate call")

    @model_validator(mode="after")
    def _model_named(self):
        if self.model is None and self.model_config_path is None:
            raise ValueError("recaption.model is null (random weights) but recaption.model_config_path is not set")
        if self.model_config_path and is_remote(self.model_config_path):
            raise ValueError(f"recaption.model_config_path must be a local directory, got {self.model_config_path!r}")
        if self.backend == "vllm" and self.model is None:
            raise ValueError("recaption.backend 'vllm' needs recaption.model (vLLM cannot build random weights)")
        if self.backend == "vllm" and self.textualize.enabled:
            raise ValueError("recaption.textualize runs with backend 'transformers' only")
        return self

    def random_weights(self) -> bool:
        return self.model is None

    def name(self) -> str:
        if self.model_name:
            return self.model_name
        spec = self.model or self.model_config_path or "captioner"
        return spec.rstrip("/").rsplit("/", 1)[-1]

    def template(self, style: str) -> str:
        if self.prompt is not None:
            return self.prompt
        if self.textualize.enabled:
            return DEFAULT_TEXTUALIZE_PROMPT
        return DEFAULT_CHAT_PROMPT if style == "chat" else ""

    def settings_key(self) -> str:
        """What changes a caption (model, prompt, decoding, vision expert): the cache namespace."""
        data = self.model_dump(mode="json", include={
            "backend", "model", "revision", "model_config_path", "prompt_style", "prompt", "system_prompt",
            "max_alt_text_chars", "max_prompt_tokens", "max_new_tokens", "min_new_tokens", "num_beams",
            "do_sample", "temperature", "top_p", "repetition_penalty", "max_caption_chars", "textualize", "precision"})
        if self.random_weights():  # random weights: the config file's content is the model
            data["model_config_digest"] = _dir_digest(self.model_config_path)
        data["seed"] = RANDOM_SEED
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _dir_digest(path: str | None) -> str | None:
    if not path or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.isfile(p) and not name.endswith((".safetensors", ".bin")):
            h.update(name.encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


# --- prompts ------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]")


def clean_alt_text(text: str | None, max_chars: int) -> str:
    """Alt-text as it goes into a prompt: NFC, no control or bidi characters, one line, cut at
    ``max_chars`` (on a word boundary when there is one) with an ellipsis."""
    if not text:
        return ""
    t = unicodedata.normalize("NFC", str(text))
    t = _CONTROL.sub(" ", t)
    t = " ".join(t.split())
    if len(t) > max_chars:
        t = _cut_at_word(t, max_chars) + "…"
    return t


def _cut_at_word(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars``, at the last space when that keeps more than half."""
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def alt_text_of(captions: list | None, sources: list | None) -> str:
    """The first non-blank caption that is not a recaption: the alt-text the prompt quotes."""
    caps = captions or []
    srcs = sources if sources is not None and len(sources) == len(caps) else [None] * len(caps)
    for c, s in zip(caps, srcs):
        if c is not None and c.strip() and not (s or "").startswith(SOURCE_PREFIX):
            return c
    return ""


_FIELD = re.compile(r"\{(alt_text|facts)\}")


def render_prompt(template: str, alt_text: str, facts: str) -> str:
    """Fill ``{alt_text}`` and ``{facts}`` in one pass over the template: braces (or a
    ``{facts}``) inside the alt-text are just text."""
    values = {"alt_text": alt_text or "(none)", "facts": facts or "(nothing detected)"}
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def prompt_inputs_digest(template: str, alt_text: str) -> str:
    """The per-image part of the cache key: what of the row goes into the prompt (the facts are a
    function of the image and the detector settings, already in the key)."""
    if "{alt_text}" not in template:
        return "-"
    return hashlib.sha256(alt_text.encode()).hexdigest()[:12]


def clean_caption(text: str, max_chars: int) -> str:
    t = " ".join((text or "").split())
    return _cut_at_word(t, max_chars) if len(t) > max_chars else t


def chat_messages(prompt: str, system_prompt: str | None = None, image_url: str | None = None) -> list[dict]:
    """OpenAI-style chat messages: one user turn with the image first, then the prompt."""
    image_part = {"type": "image"} if image_url is None else {"type": "image_url", "image_url": {"url": image_url}}
    msgs = []
    if system_prompt:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    msgs.append({"role": "user", "content": [image_part, {"type": "text", "text": prompt}]})
    return msgs


# --- Image Textualization facts --------------------------------------------------------------------
def _where(cx: float, cy: float) -> str:
    v = "top" if cy < 1 / 3 else ("bottom" if cy > 2 / 3 else "middle")
    h = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "center")
    return "center" if (v, h) == ("middle", "center") else f"{v} {h}"


def describe_objects(detections: list[tuple[str, float, tuple[float, float, float, float]]], width: int, height: int,
                     max_objects: int = 12) -> tuple[str, list[dict]]:
    """Facts from detections ``(label, score, (x0, y0, x1, y1) in pixels)``: one line per object
    with its box in relative coordinates, the share of the image it covers and where it is."""
    w, h = max(int(width), 1), max(int(height), 1)
    objs = []
    for label, score, (x0, y0, x1, y1) in sorted(detections, key=lambda d: -d[1])[:max_objects]:
        bx = [min(max(x0 / w, 0.0), 1.0), min(max(y0 / h, 0.0), 1.0), min(max(x1 / w, 0.0), 1.0),
              min(max(y1 / h, 0.0), 1.0)]
        area = max(bx[2] - bx[0], 0.0) * max(bx[3] - bx[1], 0.0)
        objs.append({"label": str(label), "score": round(float(score), 3), "box": [round(v, 3) for v in bx],
                     "area": round(area, 4), "where": _where((bx[0] + bx[2]) / 2, (bx[1] + bx[3]) / 2)})
    lines = [f"- {o['label']} (confidence {o['score']:.2f}) at the {o['where']}, covering {o['area']:.0%} of the "
             f"image, box [{', '.join(f'{v:.2f}' for v in o['box'])}]" for o in objs]
    return "\n".join(lines), objs


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
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                model = build(weights=None, weights_backbone=None, num_classes=91)
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


# --- models ------------------------------------------------------------------------------------------
def _dtype(precision: str, device: str):
    import torch

    if precision == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def load_captioner(cfg: RecaptionConfig, storage: StorageConfig | None = None, device: str = "cpu"):
    """(model, processor) for a spec: an HF id (hub cache), a local dir, ``file://``, ``s3://``, or random
    weights built from ``model_config_path`` (seeded: every actor gets the same model)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    dtype = _dtype(cfg.precision, device)
    if cfg.model is None:
        path = cfg.model_config_path
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = AutoModelForImageTextToText.from_config(config)
        model = model.to(dtype)
    else:
        path = local_copy(cfg.model, storage, cfg.cache_dir)
        local = os.path.isdir(path)
        model = AutoModelForImageTextToText.from_pretrained(path, revision=None if local else cfg.revision,
                                                            dtype=dtype, local_files_only=local)
    processor = AutoProcessor.from_pretrained(path, local_files_only=os.path.isdir(path),
                                              revision=None if os.path.isdir(path) else cfg.revision)
    return model.to(device).eval(), processor


def _chat_template_of(processor) -> str | None:
    return getattr(processor, "chat_template", None) or getattr(getattr(processor, "tokenizer", None),
                                                                "chat_template", None)


class TransformersCaptioner:
    """Batched ``generate`` over PIL images and prompts; one caption and its token count per image."""

    def __init__(self, cfg: RecaptionConfig, storage: StorageConfig | None, device: str):
        self.cfg = cfg
        self.device = device
        self.model, self.processor = load_captioner(cfg, storage, device)
        self.dtype = next(self.model.parameters()).dtype
        style = cfg.prompt_style
        if style == "auto":
            style = "chat" if _chat_template_of(self.processor) else "prefix"
        if style == "chat" and not _chat_template_of(self.processor):
            raise ValueError(f"recaption.prompt_style is 'chat' but {cfg.model or cfg.model_config_path!r} has no "
                             "chat template")
        self.style = style
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        tok = getattr(self.processor, "tokenizer", None)
        self.tokenizer = tok
        if tok is not None and not self.encoder_decoder:
            tok.padding_side = "left"  # decoder-only generation continues from the right end
        # Micro-batches are prepared on another thread: it gets its own processor (a fast
        # tokenizer changes its truncation state per call, which two threads must not share),
        # and a lock for when a retry prepares on this thread.
        self._prep_processor = copy.deepcopy(self.processor)
        self._prep_lock = threading.Lock()

    def text_inputs(self, prompts: list[str]) -> list[str]:
        if self.style != "chat":
            return prompts
        return [self.processor.apply_chat_template(chat_messages(p, self.cfg.system_prompt), tokenize=False,
                                                   add_generation_prompt=True) for p in prompts]

    def prompt_lengths(self, texts: list[str]) -> list[int]:
        if self.tokenizer is None:
            return [len(t) for t in texts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def generation_kwargs(self) -> dict:
        c = self.cfg
        kw = {"max_new_tokens": c.max_new_tokens, "min_new_tokens": c.min_new_tokens, "num_beams": c.num_beams,
              "do_sample": c.do_sample, "repetition_penalty": c.repetition_penalty}
        if c.do_sample:
            kw.update(temperature=c.temperature, top_p=c.top_p)
        return kw

    def generate(self, images: list, prompts: list[str]) -> list[tuple[str | None, int, str | None]]:
        """``(caption, new tokens, error)`` for equally long lists of images and (rendered) prompts,
        in order. Micro-batches are prepared (image processor, tokenizer, copy to the device) in a
        background thread while the previous one generates. A micro-batch that fails (CUDA out of
        memory, a prompt the model cannot take) is split in halves and retried, so one bad input
        costs only its own caption."""
        from concurrent.futures import ThreadPoolExecutor

        texts = self.text_inputs(prompts)
        if len(set(texts)) > 1:
            lengths = self.prompt_lengths(texts)
            order = sorted(range(len(texts)), key=lambda i: lengths[i])
        else:
            order = list(range(len(texts)))
        mb = self.cfg.micro_batch
        chunks = [order[s:s + mb] for s in range(0, len(order), mb)]
        out: list = [None] * len(texts)

        def prepare(ids):
            try:
                return self._prepare([images[i] for i in ids], [texts[i] for i in ids]), None
            except Exception as exc:  # noqa: BLE001 - retried (and split) on the generating thread
                return None, exc

        with ThreadPoolExecutor(1, thread_name_prefix="recaption-prep") as pool:
            pending = pool.submit(prepare, chunks[0]) if chunks else None
            for k, ids in enumerate(chunks):
                inputs, exc = pending.result()
                pending = pool.submit(prepare, chunks[k + 1]) if k + 1 < len(chunks) else None
                sub_images, sub_texts = [images[i] for i in ids], [texts[i] for i in ids]
                res = None
                if inputs is not None:
                    try:
                        res = [(text, n, None) for text, n in self._run(inputs, sub_texts)]
                    except Exception as e:  # noqa: BLE001
                        exc = e
                if res is None:
                    res = self._after_failure(exc, sub_images, sub_texts)
                for i, r in zip(ids, res):
                    out[i] = r
        return out

    def _after_failure(self, exc, images: list, texts: list[str]) -> list[tuple[str | None, int, str | None]]:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        if len(images) == 1:
            log.warning("recaption: generation failed for one image: %s", exc)
            return [(None, 0, f"{type(exc).__name__}: {str(exc)[:300]}")]
        h = len(images) // 2
        return self._generate_split(images[:h], texts[:h]) + self._generate_split(images[h:], texts[h:])

    def _generate_split(self, images: list, texts: list[str]) -> list[tuple[str | None, int, str | None]]:
        try:
            return [(text, n, None) for text, n in self._run(self._prepare(images, texts), texts)]
        except Exception as exc:  # noqa: BLE001 - recorded per row after the split
            return self._after_failure(exc, images, texts)

    def _prepare(self, images: list, texts: list[str]) -> dict:
        """Processor outputs on the device (pinned host memory first on CUDA, copies non-blocking)."""
        kw: dict = {"images": images, "return_tensors": "pt"}
        if any(texts):
            kw.update(text=texts, padding=True, truncation=True, max_length=self.cfg.max_prompt_tokens)
        with self._prep_lock:
            inputs = self._prep_processor(**kw)
        tensors = {k: v for k, v in inputs.items() if hasattr(v, "to")}
        if not self.device.startswith("cuda"):
            return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        import torch

        # Copies on a stream of their own, so they overlap the previous micro-batch's generation;
        # synchronized before the generating thread gets them (it frees them only after its own
        # generate has finished, so the allocator never hands the memory out early).
        if getattr(self, "_copy_stream", None) is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        out = {}
        with torch.cuda.stream(self._copy_stream):
            for k, v in tensors.items():
                v = v.pin_memory()
                out[k] = (v.to(self.device, self.dtype, non_blocking=True) if v.is_floating_point()
                          else v.to(self.device, non_blocking=True))
        self._copy_stream.synchronize()
        return out

    def _run(self, inputs: dict, texts: list[str]) -> list[tuple[str, int]]:
        import torch

        with torch.inference_mode():
            seqs = self.model.generate(**inputs, **self.generation_kwargs())
        seqs = seqs.cpu()
        prompt_ids = inputs.get("input_ids")
        new = seqs
        if prompt_ids is not None and not self.encoder_decoder:
            p = prompt_ids.cpu()
            if seqs.shape[1] >= p.shape[1] and torch.equal(seqs[:, :p.shape[1]], p):
                new = seqs[:, p.shape[1]:]  # decoder-only: the prompt is echoed first
        specials = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        decoded = self.processor.batch_decode(new, skip_special_tokens=True)
        echoed, echoed_len = [""] * len(texts), [0] * len(texts)
        if new is seqs and any(texts) and self.tokenizer is not None:
            # A captioner that echoes its prefix (BLIP) echoes it as its tokenizer sees it
            # (lower-cased, unknown words dropped): strip that round trip.
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            echoed = self.processor.batch_decode(ids, skip_special_tokens=True)
            echoed_len = [sum(1 for t in x if t not in specials) for x in ids]
        res = []
        for k, text in enumerate(decoded):
            if echoed[k]:
                text = _strip_prefix(text, echoed[k])
            n_tok = max(int(sum(1 for t in new[k].tolist() if t not in specials)) - echoed_len[k], 0)
            res.append((clean_caption(text, self.cfg.max_caption_chars), n_tok))
        return res


def _strip_prefix(text: str, prefix: str) -> str:
    """Drop an echoed prompt prefix, compared case- and space-insensitively."""
    norm_t, norm_p = " ".join(text.split()), " ".join(prefix.split())
    if norm_p and norm_t.lower().startswith(norm_p.lower()):
        return norm_t[len(norm_p):].strip()
    return text


# --- cache ---------------------------------------------------------------------------------------------
class RecaptionCache:
    """One JSON object per (image sha256, prompt inputs) under ``root/<settings key>/<sha[:2]>/``.

    Reads and writes go in concurrent batches (fsspec ``cat`` / ``pipe``; s3fs runs them on
    its event loop). One object per image is what object stores scale to; at billions of
    images it costs one PUT per newly recaptioned image, small beside the GPU time of the
    caption itself (README, "Recaption cache").
    """

    def __init__(self, root: str, settings_key: str, storage: StorageConfig | None = None):
        self.root = join(root, settings_key)
        self.fs, self.base = fsspec_fs(self.root, storage)
        self.remote = is_remote(root)

    def path(self, sha256: str, inputs: str) -> str:
        return f"{self.base}/{sha256[:2]}/{sha256}.{inputs}.json"

    def get_many(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        if not keys:
            return {}
        paths = {self.path(*k): k for k in keys}
        try:
            found = self.fs.cat(list(paths), on_error="omit")
        except FileNotFoundError:
            found = {}
        out = {}
        for p, data in found.items():
            if p not in paths:
                continue
            try:
                out[paths[p]] = json.loads(data)
            except (ValueError, TypeError):
                log.warning("recaption cache: unreadable entry %s ignored", p)
        return out

    def put_many(self, entries: dict[tuple[str, str], dict]) -> None:
        if not entries:
            return
        blobs = {self.path(*k): json.dumps(v, ensure_ascii=False).encode() for k, v in entries.items()}
        if self.remote:
            self.fs.pipe(blobs)  # one PUT each: atomic
            return
        for p, data in blobs.items():  # local: write then rename, so a reader never sees half a file
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)


# --- operator ---------------------------------------------------------------------------------------------
def with_recaption(captions: list | None, sources: list | None, recaption: str | None, source: str) -> dict:
    """``captions`` and ``caption_sources`` with ``recaption`` appended under ``source``. Sources
    are padded with nulls (or cut) to the captions' length, so no alt-text is lost; an earlier
    caption from ``source`` is replaced (a rerun never duplicates). No recaption: only the padding."""
    caps, srcs = list(captions or []), list(sources or [])
    if len(srcs) != len(caps):
        srcs = (srcs + [None] * len(caps))[:len(caps)]
    if recaption:
        keep = [j for j, s in enumerate(srcs) if s != source]
        caps, srcs = [caps[j] for j in keep] + [recaption], [srcs[j] for j in keep] + [source]
    return {"captions": caps, "caption_sources": srcs}


OUTPUT_TYPES = {"recaption": pa.string(), "recaption_model": pa.string(), "recaption_cached": pa.bool_(),
                "recaption_tokens": pa.int32(), "recaption_facts": pa.string(), "recaption_error": pa.string()}


class _RecaptionStage(Operator):
    """What the recaption steps share: config, cache keys per row, and writing the columns."""

    reads = ("status", "drop_stage", "drop_reason", "error_message", "image", "captions")
    writes = tuple(OUTPUT_TYPES)

    def __init__(self, config: RecaptionConfig | dict | None = None, storage: StorageConfig | dict | None = None,
                 cache_root: str | None = None):
        self.config = config if isinstance(config, RecaptionConfig) else RecaptionConfig(**(config or {}))
        self.storage = storage if isinstance(storage, StorageConfig) or storage is None else StorageConfig(**storage)
        root = self.config.cache_path or cache_root
        self.cache = (RecaptionCache(root, self.config.settings_key(), self.storage)
                      if self.config.cache and root else None)
        self.model_name = self.config.name()
        self.source = SOURCE_PREFIX + self.model_name

    @classmethod
    def resources(cls, config: RecaptionConfig) -> Resources:
        return model_stage_resources(config)

    def _rows(self, batch: pa.Table) -> dict:
        """Per batch: kept rows, their alt-text and cache key ((sha256, prompt inputs))."""
        c = self.config
        n = batch.num_rows
        alive = alive_mask(batch)
        captions = batch.column("captions").to_pylist()
        sources = (batch.column("caption_sources").to_pylist() if "caption_sources" in batch.column_names
                   else [[None] * len(x or []) for x in captions])
        idx = [i for i in range(n) if alive[i]]
        blobs = batch.column("image").to_pylist() if idx else [None] * n
        shas = batch.column("sha256").to_pylist() if "sha256" in batch.column_names else [None] * n
        for i in idx:
            if shas[i] is None and blobs[i] is not None:
                shas[i] = hashlib.sha256(blobs[i]).hexdigest()
        # Whether the template quotes the alt-text does not depend on the prompt style (only a set
        # prompt or IT mode do), so keys are known before the model is loaded.
        tmpl = c.template("prefix")
        alts = {i: clean_alt_text(alt_text_of(captions[i], sources[i]), c.max_alt_text_chars) for i in idx}
        keys = {i: (shas[i], prompt_inputs_digest(tmpl, alts[i])) for i in idx if shas[i]}
        cols: dict[str, list] = {k: [None] * n for k in OUTPUT_TYPES}
        for k in OUTPUT_TYPES:  # values an earlier step (cache lookup, vLLM) already wrote
            if k in batch.column_names:
                cols[k] = batch.column(k).to_pylist()
        return {"n": n, "idx": idx, "blobs": blobs, "alts": alts, "keys": keys, "captions": captions,
                "sources": sources, "cols": cols}

    def _lookup(self, r: dict) -> list[int]:
        """Fill cached recaptions; the kept rows still to generate."""
        cols, keys = r["cols"], r["keys"]
        hits = self.cache.get_many(list(set(keys.values()))) if self.cache else {}
        todo = []
        for i in r["idx"]:
            entry = hits.get(keys.get(i))
            if entry is None:
                todo.append(i)
                continue
            cols["recaption"][i] = entry.get("recaption")
            cols["recaption_tokens"][i] = entry.get("tokens")
            cols["recaption_facts"][i] = entry.get("facts")
            cols["recaption_cached"][i] = True
            cols["recaption_model"][i] = self.model_name
        return todo

    def _store(self, r: dict, rows: list[int]) -> None:
        if not self.cache:
            return
        cols = r["cols"]
        self.cache.put_many({r["keys"][i]: {"recaption": cols["recaption"][i], "tokens": cols["recaption_tokens"][i],
                                            "facts": cols["recaption_facts"][i], "model": self.model_name}
                             for i in rows if i in r["keys"]})

    def _finish(self, batch: pa.Table, r: dict, outcomes: list) -> pa.Table:
        """Write the columns; append each recaption to ``captions`` with its source (once)."""
        cols = r["cols"]
        new_caps, new_srcs = [], []
        for i in range(r["n"]):
            row = with_recaption(r["captions"][i], r["sources"][i], cols["recaption"][i], self.source)
            new_caps.append(row["captions"])
            new_srcs.append(row["caption_sources"])
        out = {k: pa.array(v, OUTPUT_TYPES[k]) for k, v in cols.items()}
        out["captions"] = pa.array(new_caps, pa.list_(pa.string()))
        out["caption_sources"] = pa.array(new_srcs, pa.list_(pa.string()))
        return mark(set_columns(batch, out), self.name, outcomes)


class Recaptioner(_RecaptionStage):
    """Writes ``recaption``, ``recaption_model``, ``recaption_cached``, ``recaption_tokens``,
    ``recaption_facts`` (Image Textualization's detections, JSON), ``recaption_error`` and appends
    the recaption to ``captions`` / ``caption_sources``. Rows that are not kept get nulls and no
    compute; cached rows get the cached caption and no compute. A generation that fails leaves
    the sample kept with its alt-texts, a null recaption and the error in ``recaption_error``."""

    name: ClassVar[str] = "recaption"

    def __init__(self, config: RecaptionConfig | dict | None = None, storage: StorageConfig | dict | None = None,
                 cache_root: str | None = None):
        super().__init__(config, storage, cache_root)
        if self.config.backend != "transformers":
            raise ValueError("Recaptioner runs the transformers backend; the vllm backend is ray.data.llm's processor "
                             "(jobs.curate.apply_vllm_recaption)")
        self._captioner = None
        self.generated = 0  # captions generated by this instance (tests, benchmarks)

    def _setup(self):
        if self._captioner is not None:
            return
        import torch

        c = self.config
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
        self._captioner = TransformersCaptioner(c, self.storage, self.device)
        self.template = c.template(self._captioner.style)
        self._detector = None
        if c.textualize.enabled:
            d = c.textualize
            ddev = self.device if d.device == "auto" else d.device
            cls = TorchvisionDetector if d.backend == "torchvision" else TransformersDetector
            self._detector = cls(d, self.storage, ddev, c.cache_dir)

    def process(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        c = self.config
        r = self._rows(batch)
        cols = r["cols"]
        outcomes: list = [None] * r["n"]
        todo = self._lookup(r) if r["idx"] else []
        images, ok_rows = [], []
        for i in todo:
            try:
                with Image.open(io.BytesIO(r["blobs"][i])) as im:
                    images.append(im.convert("RGB"))
                ok_rows.append(i)
            except Exception as exc:  # noqa: BLE001 - recorded per row
                outcomes[i] = (FAILED, "decode_error", f"recaption: image bytes could not be decoded ({exc})")
        if ok_rows:
            self._setup()
            facts_text = [""] * len(ok_rows)
            det_error = None
            if self._detector is not None:
                try:
                    dets = self._detector.detect(images)
                except Exception as exc:  # noqa: BLE001 - the caption is still written, without facts
                    log.warning("recaption: the detector failed on a batch: %s", exc)
                    det_error = f"detector: {type(exc).__name__}: {str(exc)[:300]}"
                    dets = [[] for _ in images]
                for k, (im, d) in enumerate(zip(images, dets)):
                    facts_text[k], objs = describe_objects(d, im.width, im.height, c.textualize.max_objects)
                    cols["recaption_facts"][ok_rows[k]] = None if det_error else json.dumps(objs)
            prompts = [render_prompt(self.template, r["alts"][i], facts_text[k]) for k, i in enumerate(ok_rows)]
            results = self._captioner.generate(images, prompts)
            self.generated += len(results)
            for i, (text, n_tok, error) in zip(ok_rows, results):
                cols["recaption"][i] = text or None
                cols["recaption_tokens"][i] = n_tok
                cols["recaption_cached"][i] = False
                cols["recaption_model"][i] = self.model_name
                cols["recaption_error"][i] = error or det_error
            # A failed generation (or detection) is not cached: a rerun tries again.
            self._store(r, [i for i in ok_rows if cols["recaption_error"][i] is None])
        return self._finish(batch, r, outcomes)


class RecaptionCacheLookup(_RecaptionStage):
    """vLLM backend, before the processor: cached recaptions filled in (those rows skip the engine)."""

    name: ClassVar[str] = "recaption"

    def process(self, batch: pa.Table) -> pa.Table:
        r = self._rows(batch)
        if r["idx"]:
            self._lookup(r)
        return self._finish(batch, r, [None] * r["n"])


class RecaptionCacheStore(_RecaptionStage):
    """vLLM backend, after the processor: newly generated recaptions written to the cache."""

    name: ClassVar[str] = "recaption"

    def process(self, batch: pa.Table) -> pa.Table:
        r = self._rows(batch)
        cols = r["cols"]
        self._store(r, [i for i in r["idx"] if cols["recaption_cached"][i] is False and not cols["recaption_error"][i]])
        return batch


# --- vLLM backend (ray.data.llm) ------------------------------------------------------------------------
def vllm_processor_config(cfg: RecaptionConfig, storage: StorageConfig | None = None):
    """``vLLMEngineProcessorConfig`` for the recaption model, multimodal stage enabled."""
    from ray.data.llm import vLLMEngineProcessorConfig

    v = cfg.vllm
    engine = dict(v.engine_kwargs)
    engine.setdefault("limit_mm_per_prompt", {"image": 1})
    if cfg.revision:
        engine.setdefault("revision", cfg.revision)
    return vLLMEngineProcessorConfig(
        model_source=local_copy(cfg.model, storage, cfg.cache_dir),
        engine_kwargs=engine,
        batch_size=v.batch_size,
        concurrency=v.concurrency,
        accelerator_type=v.accelerator_type,
        prepare_multimodal_stage={"enabled": True},
        chat_template_stage={"enabled": True},
        tokenize_stage={"enabled": True},
        detokenize_stage={"enabled": True},
        should_continue_on_error=True,  # one bad image must not fail the job: its row records the error
    )


def image_data_url(blob: bytes, fmt: str = "jpeg") -> str:
    return f"data:image/{fmt};base64," + base64.b64encode(blob).decode("ascii")


def vllm_sampling_params(cfg: RecaptionConfig) -> dict:
    p = {"max_tokens": cfg.max_new_tokens, "min_tokens": cfg.min_new_tokens,
         "repetition_penalty": cfg.repetition_penalty}
    p.update(temperature=cfg.temperature, top_p=cfg.top_p) if cfg.do_sample else p.update(temperature=0.0)
    return p


def vllm_preprocess(row: dict, cfg: RecaptionConfig) -> dict:
    """A row -> the processor's request: chat messages with the image as a data URL and the prompt.

    Rows that are not kept, or already have a cached recaption, send a one-token text-only
    request (the processor maps every row; this keeps the engine's work for them negligible)."""
    needs = row.get("status") == "kept" and not row.get("recaption_cached") and row.get("image")
    if not needs:
        return {**row, "messages": [{"role": "user", "content": [{"type": "text", "text": "."}]}],
                "sampling_params": {"max_tokens": 1, "temperature": 0.0}, "recaption_skip": True}
    alt = clean_alt_text(alt_text_of(row.get("captions"), row.get("caption_sources")), cfg.max_alt_text_chars)
    prompt = render_prompt(cfg.template("chat"), alt, "")
    msgs = chat_messages(prompt, cfg.system_prompt, image_data_url(row["image"], cfg.vllm.image_format))
    return {**row, "messages": msgs, "sampling_params": vllm_sampling_params(cfg), "recaption_skip": False}


def vllm_postprocess(row: dict, cfg: RecaptionConfig) -> dict:
    """The processor's answer -> our columns (the request columns are dropped)."""
    out = {k: v for k, v in row.items() if k not in ("messages", "sampling_params", "recaption_skip",
                                                     "generated_text", "generated_tokens", "num_generated_tokens",
                                                     "prompt", "prompt_token_ids", "num_input_tokens", "time_taken_llm",
                                                     "request_id", "params", "__inference_error__", "image_sizes",
                                                     "multimodal_data", "mm_processor_kwargs", "tokenized_prompt",
                                                     "embeddings")}
    if row.get("recaption_skip"):
        return out
    error = row.get("__inference_error__")  # should_continue_on_error: the engine's error for this row
    text = "" if error else clean_caption(row.get("generated_text") or "", cfg.max_caption_chars)
    name = cfg.name()
    out.update(recaption=text or None, recaption_model=name, recaption_cached=False, recaption_facts=None,
               recaption_tokens=int(row.get("num_generated_tokens") or 0),
               recaption_error=str(error)[:300] if error else None)
    if text:
        out.update(with_recaption(row.get("captions"), row.get("caption_sources"), text, SOURCE_PREFIX + name))
    return out


# --- reporting ------------------------------------------------------------------------------------------
def model_report(cfg: RecaptionConfig) -> dict:
    return {"model": cfg.name(), "pretrained": cfg.model, "revision": cfg.revision, "backend": cfg.backend,
            "random_weights": cfg.random_weights(), "textualize": cfg.textualize.enabled,
            "detector": cfg.textualize.model if cfg.textualize.enabled else None,
            "settings_key": cfg.settings_key()}


# --- tiny model (tests, dry run) -----------------------------------------------------------------------
TINY_WORDS = ("a an the of on in with and at by near under over beside photo picture image view close up "
              "dog cat bird horse person man woman child people car bus bike boat train plane tree flower grass "
              "sky cloud sun water sea river lake beach sand mountain hill road street city building house room "
              "window door table chair bed sofa lamp book cup plate food bread fruit apple banana cake pizza "
              "red blue green yellow white black brown gray orange pink purple small large old new bright dark "
              "sitting standing running walking flying lying looking holding wearing playing eating riding "
              "front back left right top bottom middle two three four many some group field park garden wall "
              "floor snow rain night day light shadow hat shirt dress shoe bag ball toy phone computer sign").split()


def write_tiny_captioner(path: str, weights: bool = False, image_size: int = 64, hidden: int = 32, layers: int = 2,
                         heads: int = 2, vocab_size: int | None = None) -> str:
    """A BLIP-shaped captioner: config + processor files (and seeded random weights when
    ``weights``). The default is tiny, with a small word vocabulary; ``image_size=384,
    hidden=768, layers=12, heads=12, vocab_size=30524`` is BLIP-base's shape (benchmarks).
    Random weights write gibberish captions."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    words = specials + list(dict.fromkeys(TINY_WORDS))
    if vocab_size:  # filler word pieces up to the size, so every id the model may emit decodes
        words += [f"w{i}" for i in range(max(vocab_size - len(words), 0))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    cfg = BlipConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": hidden, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "intermediate_size": 4 * hidden if layers > 2 else 2 * hidden,
                     "max_position_embeddings": 512, "bos_token_id": vocab["[DEC]"], "pad_token_id": vocab["[PAD]"],
                     "sep_token_id": vocab["[SEP]"], "eos_token_id": vocab["[SEP]"]},
        vision_config={"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                       "intermediate_size": 4 * hidden if layers > 2 else 2 * hidden, "image_size": image_size,
                       "patch_size": 16},
        projection_dim=min(hidden, 256))
    os.makedirs(path, exist_ok=True)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tok)
    processor.save_pretrained(path)
    if weights:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            BlipForConditionalGeneration(cfg).save_pretrained(path)
    else:
        cfg.save_pretrained(path)
    return path


if __name__ == "__main__":  # python -m operators.recaption DIR: (re)write the dry run's tiny captioner
    import sys

    print(write_tiny_captioner(sys.argv[1] if len(sys.argv) > 1 else "configs/models/imgcurate-tiny-captioner"))
