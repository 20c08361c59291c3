"""Recaption stage settings: the ``recaption:`` section of the job config and its cache namespace
(which covers every pass of Image Textualization mode: captioner, detector, rewriter)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.base import StageResources
from operators.models.common import RANDOM_SEED
from operators.recaption.prompts import DEFAULT_CHAT_PROMPT
from operators.recaption.textualize import TextualizeConfig
from operators.storage import is_remote


class VllmConfig(BaseModel):
    """``ray.data.llm`` vLLM processor settings (``recaption.backend: vllm``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    engine_kwargs: dict[str, Any] = Field(default_factory=lambda: {"max_model_len": 8192},
                                          description="vLLM engine arguments (tensor_parallel_size, dtype, ...)")
    concurrency: int = Field(1, ge=1, description="vLLM engine replicas")
    batch_size: int = Field(64, ge=1, description="rows per vLLM engine batch")
    accelerator_type: str | None = Field(None, description="e.g. H100; null = any GPU")
    image_format: Literal["jpeg", "png", "webp"] = Field("jpeg", description="how images are sent to the engine "
                                                                            "(data URLs)")


class RecaptionConfig(StageResources):
    """Recaption stage settings (``recaption:`` in the job config)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = Field(False, description="run the recaption stage: recaption, recaption_model, recaption_cached, "
                                             "recaption_tokens, recaption_reference, recaption_facts, "
                                             "recaption_removed, recaption_error; the caption joins "
                                             "captions with source recaption:<model>")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: AutoModelForImageTextToText in GPU actors (BLIP, BLIP-2, GIT, "
                                    "Florence-2, LLaVA, Qwen2.5-VL, SmolVLM...); vllm: ray.data.llm's vLLM processor "
                                    "(pip install 'imgcurate[vllm]', GPU only)")
    model: str | None = Field("Salesforce/blip-image-captioning-base",
                              description="HF id, local dir, file:// or s3:// prefix; null = random weights built "
                                          "from model_config_path")
    revision: str | None = Field(None, description="HF revision (commit) of a hub model: pins the cache key too")
    model_config_path: str | None = Field(None, description="dir with a transformers config + processor files "
                                                            "(random weights: tests, dry run)")
    model_name: str | None = Field(None, description="name in recaption_model and the caption source; "
                                                     "default: the model's last path part")
    prompt_style: Literal["auto", "prefix", "chat"] = Field(
        "auto", description="prefix: the prompt is a text prefix (captioners); chat: the processor's chat template; "
                            "auto: chat if the processor has a template")
    prompt: str | None = Field(None, description="the captioner's template (pass 1 in textualize mode); "
                                                 "{alt_text} is filled in. null: empty (prefix), a describe-it "
                                                 "prompt (chat)")
    system_prompt: str | None = Field(None, description="system message of a chat prompt")
    max_alt_text_chars: int = Field(400, ge=0, description="alt-text put in prompts is cut to this")
    max_prompt_tokens: int = Field(512, ge=8, description="prompts are truncated to this many tokens")
    max_new_tokens: int = Field(96, ge=1, description="decoding: most tokens generated")
    min_new_tokens: int = Field(0, ge=0, description="decoding: fewest tokens generated")
    num_beams: int = Field(1, ge=1, description="decoding: beam search width (1: greedy)")
    do_sample: bool = Field(False, description="decoding: sample instead of greedy or beam search")
    temperature: float = Field(1.0, gt=0, description="decoding: sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="decoding: nucleus sampling mass")
    repetition_penalty: float = Field(1.0, gt=0, description="decoding: penalty on repeated tokens")
    max_caption_chars: int = Field(2000, ge=1, description="longer output is cut at a word boundary")
    textualize: TextualizeConfig = TextualizeConfig()
    vllm: VllmConfig = VllmConfig()
    cache: bool = Field(True, description="cache recaptions by (image sha256, settings, prompt inputs)")
    cache_path: str | None = Field(None, description="cache root (local or s3://); null: <output>/_cache/recaption")
    cache_dir: str | None = Field(None, description="where s3:// models are copied (default: a temp dir)")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when the actor has a GPU, else CPU")
    precision: Literal["auto", "fp16", "bf16", "fp32"] = Field("auto", description="auto: fp16 on CUDA, fp32 on CPU")
    batch_size: int = Field(64, ge=1, description="rows per actor call")
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
            raise ValueError("recaption.textualize (Image Textualization: captioner, then an open-vocabulary detector, "
                             "then a text LLM rewrite, per image) runs with backend 'transformers' only; the vllm "
                             "backend writes the captioner's description alone")
        t = self.textualize
        for key, part in (("detector", t.detector), ("rewriter", t.rewriter)):
            if not t.enabled:
                break
            if part.model is None and part.model_config_path is None:
                raise ValueError(f"recaption.textualize.{key}.model is null (random weights) but "
                                 f"recaption.textualize.{key}.model_config_path is not set")
            if part.model_config_path and is_remote(part.model_config_path):
                raise ValueError(f"recaption.textualize.{key}.model_config_path must be a local directory, got "
                                 f"{part.model_config_path!r}")
        return self

    def random_weights(self) -> bool:
        """Some pass has random weights (the captioner, or in textualize mode the detector or rewriter)."""
        t = self.textualize
        return self.model is None or (t.enabled and (t.detector.model is None or t.rewriter.model is None))

    def name(self) -> str:
        if self.model_name:
            return self.model_name
        spec = self.model or self.model_config_path or "captioner"
        return spec.rstrip("/").rsplit("/", 1)[-1]

    def template(self, style: str) -> str:
        if self.prompt is not None:
            return self.prompt
        return DEFAULT_CHAT_PROMPT if style == "chat" else ""

    def settings_key(self) -> str:
        """What changes a caption (model, prompt, decoding; in textualize mode every pass: the
        detector, the object words, the rewriter and its prompt): the cache namespace."""
        data = self.model_dump(mode="json", include={
            "backend", "model", "revision", "model_config_path", "prompt_style", "prompt", "system_prompt",
            "max_alt_text_chars", "max_prompt_tokens", "max_new_tokens", "min_new_tokens", "num_beams",
            "do_sample", "temperature", "top_p", "repetition_penalty", "max_caption_chars", "precision"})
        if self.model is None:  # random weights: the config file's content is the model
            data["model_config_digest"] = _dir_digest(self.model_config_path)
        t = self.textualize
        if t.enabled:  # off, its settings change nothing
            data["textualize"] = t.model_dump(mode="json")
            data["textualize"]["words"] = list(t.words())  # the built-in list may change between releases
            for key, part in (("detector", t.detector), ("rewriter", t.rewriter)):
                if part.model is None:
                    data["textualize"][key]["model_config_digest"] = _dir_digest(part.model_config_path)
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
