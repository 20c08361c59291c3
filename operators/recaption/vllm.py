"""The vLLM backend (``recaption.backend: vllm``): ``ray.data.llm``'s vLLM processor with its
multimodal stage, between the cache lookup and store steps. It needs a GPU and ``pip install
'imgcurate[vllm]'``; everything here but the processor itself runs without one. It writes the
captioner's description only: config validation refuses ``recaption.textualize`` with it (Image
Textualization's detector and rewriter passes run in the transformers backend)."""

from __future__ import annotations

import base64

from operators.recaption.config import RecaptionConfig
from operators.recaption.prompts import (SOURCE_PREFIX, alt_text_of, chat_messages, clean_alt_text, clean_caption,
                                        render_prompt)
from operators.recaption.stage import RecaptionCacheLookup, RecaptionCacheStore, with_recaption
from operators.storage import StorageConfig, local_copy


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
    prompt = render_prompt(cfg.template("chat"), alt)
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
    out.update(recaption=text or None, recaption_model=name, recaption_cached=False, recaption_reference=None,
               recaption_facts=None, recaption_removed=None,
               recaption_tokens=int(row.get("num_generated_tokens") or 0),
               recaption_error=str(error)[:300] if error else None)
    if text:
        out.update(with_recaption(row.get("captions"), row.get("caption_sources"), text, SOURCE_PREFIX + name))
    return out


def apply_vllm_recaption(ds, rc: RecaptionConfig, storage: StorageConfig | None, cache_root: str):
    """The vLLM backend: cache lookup -> ray.data.llm's vLLM processor (multimodal stage) -> cache
    store. Every row passes through; rows not kept or cached send the engine a one-token request."""
    from functools import partial

    from ray.data import ActorPoolStrategy
    from ray.data.llm import build_processor

    io_kwargs = {"fn_constructor_kwargs": {"config": rc, "storage": storage, "cache_root": cache_root},
                 "batch_format": "pyarrow", "num_cpus": 0.25, "compute": ActorPoolStrategy(min_size=1, max_size=2)}
    ds = ds.map_batches(RecaptionCacheLookup, batch_size=rc.batch_size, **io_kwargs)
    processor = build_processor(vllm_processor_config(rc, storage), preprocess=partial(vllm_preprocess, cfg=rc),
                                postprocess=partial(vllm_postprocess, cfg=rc))
    ds = processor(ds)
    return ds.map_batches(RecaptionCacheStore, batch_size=rc.batch_size, **io_kwargs)
