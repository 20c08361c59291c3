"""Recaptioner: a detailed caption from a vision-language model, ranked later against the alt-text.

Web alt-text is short and noisy; recent datasets train on model-written captions (Image
Textualization, Pi et al. 2024; ImageInWords, Garg et al. 2024). This stage writes
``recaption`` and ``recaption_model`` and appends the new caption to ``captions`` with the
source ``recaption:<model>``, so the reward stage, which runs after it, ranks it against the
alt-texts (``best_caption_source`` says which won; the manifest counts how often it was the
recaption).

Two backends (``recaption.backend``):

- ``transformers`` (``Recaptioner``, GPU actors): image-to-text models through
  ``AutoModelForImageTextToText`` (BLIP, BLIP-2, GIT, Florence-2, LLaVA, Qwen2.5-VL, SmolVLM...),
  batched ``generate`` in half precision on CUDA, micro-batches sorted by prompt length so little
  is padded. Prompt styles: ``prefix`` (captioners: the prompt is a text prefix, e.g. BLIP's
  "a picture of"), ``chat`` (instruction VLMs: the processor's chat template with one image and
  the prompt), ``auto`` (chat when the processor has a chat template).
- ``vllm``: ``ray.data.llm``'s vLLM processor with its multimodal stage, for large VLMs; see
  :func:`vllm.vllm_processor_config` and :func:`vllm.vllm_preprocess`. It needs a GPU and ``pip install
  'imgcurate[vllm]'``.

Image Textualization mode (``recaption.textualize``; Pi et al., 2024, "Image Textualization: An
Automatic Framework for Creating Accurate and Detailed Image Descriptions") runs the paper's three
passes: the captioner writes a reference description (``recaption_reference``); an
open-vocabulary detector (OWL-ViT / OWLv2 / Grounding DINO through transformers) looks for each
object the description names, boxes found become facts (``recaption_facts``: label, score,
relative box, share of the image, position) and objects not found are hallucinations
(``recaption_removed``); a text-only causal LM rewrites the reference from the facts, deleting
the hallucinations (``recaption``). See :mod:`textualize`. Transformers backend only.

Only kept rows are recaptioned. Results are cached by (image sha256, settings, prompt inputs):
one small JSON object per image under ``cache_path/<settings key>/``, read and written in
concurrent batches, so a resumed wave or a later refresh never regenerates a caption it has.

Random weights (``model: null`` + ``model_config_path``, a directory holding a transformers
config and processor files) build the model from its config without any download; its output
is gibberish, and the run manifest and summary say so.

The package: ``prompts`` (alt-text, templates, facts, chat messages), ``captioners`` (loading and
batched generation, the tiny test captioner), ``textualize`` (Image Textualization's settings and
its verification step), ``objects`` (the objects a description names), ``detectors`` (the
open-vocabulary detector, its tiny test model), ``rewriters`` (the text-only rewriter, its tiny
test model), ``cache``, ``config``, ``stage`` (the operators), ``vllm`` (the vLLM backend's
processor and its steps).
"""

from operators.recaption.cache import RecaptionCache
from operators.recaption.captioners import TINY_WORDS, TransformersCaptioner, load_captioner, write_tiny_captioner
from operators.recaption.config import RecaptionConfig, VllmConfig
from operators.recaption.detectors import Detection, DetectorConfig, OpenVocabularyDetector, write_tiny_detector
from operators.recaption.objects import DEFAULT_OBJECT_WORDS, extract_objects
from operators.recaption.prompts import (DEFAULT_CHAT_PROMPT, DEFAULT_REWRITE_PROMPT, SOURCE_PREFIX, alt_text_of,
                                        chat_messages, clean_alt_text, clean_caption, describe_objects,
                                        evidence_text, prompt_inputs_digest, render_prompt, render_rewrite)
from operators.recaption.rewriters import TextRewriter, write_tiny_rewriter
from operators.recaption.stage import (FACT_TYPE, OUTPUT_TYPES, RecaptionCacheLookup, RecaptionCacheStore,
                                      Recaptioner, model_report, with_recaption)
from operators.recaption.textualize import RewriterConfig, TextualizeConfig, Verification, queries_for, verify
from operators.recaption.vllm import (apply_vllm_recaption, image_data_url, vllm_postprocess, vllm_preprocess,
                                     vllm_processor_config, vllm_sampling_params)

__all__ = [
    "DEFAULT_CHAT_PROMPT", "DEFAULT_OBJECT_WORDS", "DEFAULT_REWRITE_PROMPT", "FACT_TYPE", "OUTPUT_TYPES",
    "SOURCE_PREFIX", "TINY_WORDS", "Detection", "DetectorConfig", "OpenVocabularyDetector", "RecaptionCache",
    "RecaptionCacheLookup", "RecaptionCacheStore", "RecaptionConfig", "Recaptioner", "RewriterConfig",
    "TextRewriter", "TextualizeConfig", "TransformersCaptioner", "Verification", "VllmConfig", "alt_text_of",
    "apply_vllm_recaption", "chat_messages", "clean_alt_text", "clean_caption", "describe_objects", "evidence_text",
    "extract_objects", "image_data_url", "load_captioner", "model_report", "prompt_inputs_digest", "queries_for",
    "render_prompt", "render_rewrite", "verify", "vllm_postprocess", "vllm_preprocess", "vllm_processor_config",
    "vllm_sampling_params", "with_recaption", "write_tiny_captioner", "write_tiny_detector", "write_tiny_rewriter",
]
