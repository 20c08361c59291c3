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

The package: ``prompts`` (alt-text, templates, facts, chat messages), ``detectors`` (the vision
expert), ``captioners`` (loading and batched generation, the tiny test captioner), ``cache``,
``config``, ``stage`` (the operators), ``vllm`` (the vLLM backend's processor and its steps).
"""

from operators.recaption.cache import RecaptionCache
from operators.recaption.captioners import TINY_WORDS, TransformersCaptioner, load_captioner, write_tiny_captioner
from operators.recaption.config import RecaptionConfig, VllmConfig
from operators.recaption.detectors import DetectorConfig, TorchvisionDetector, TransformersDetector
from operators.recaption.prompts import (DEFAULT_CHAT_PROMPT, DEFAULT_TEXTUALIZE_PROMPT, SOURCE_PREFIX, alt_text_of,
                                        chat_messages, clean_alt_text, clean_caption, describe_objects,
                                        prompt_inputs_digest, render_prompt)
from operators.recaption.stage import (OUTPUT_TYPES, RecaptionCacheLookup, RecaptionCacheStore, Recaptioner,
                                      model_report, with_recaption)
from operators.recaption.vllm import (apply_vllm_recaption, image_data_url, vllm_postprocess, vllm_preprocess,
                                     vllm_processor_config, vllm_sampling_params)

__all__ = [
    "DEFAULT_CHAT_PROMPT", "DEFAULT_TEXTUALIZE_PROMPT", "OUTPUT_TYPES", "SOURCE_PREFIX", "TINY_WORDS",
    "DetectorConfig", "RecaptionCache", "RecaptionCacheLookup", "RecaptionCacheStore", "RecaptionConfig",
    "Recaptioner", "TorchvisionDetector", "TransformersCaptioner", "TransformersDetector", "VllmConfig",
    "alt_text_of", "apply_vllm_recaption", "chat_messages", "clean_alt_text", "clean_caption", "describe_objects",
    "image_data_url", "load_captioner", "model_report", "prompt_inputs_digest", "render_prompt",
    "vllm_postprocess", "vllm_preprocess", "vllm_processor_config", "vllm_sampling_params", "with_recaption",
    "write_tiny_captioner",
]
