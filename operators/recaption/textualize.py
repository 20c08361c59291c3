"""Image Textualization (Pi et al., 2024, "Image Textualization: An Automatic Framework for
Creating Accurate and Detailed Image Descriptions"; github.com/sterzhang/image-textualization):
three passes over each image.

1. Holistic textualization: the captioner (``recaption.model``) writes a reference description
   with its plain prompt.
2. Visual detail textualization: the objects the reference names (:mod:`objects`, a vocabulary
   heuristic where the paper prompts an LLM) are the queries of an open-vocabulary detector
   (:mod:`detectors`); a named object with no box is a hallucination, and the boxes found become
   facts: label, score, relative box, share of the image, position.
3. Textualized recaptioning: a text-only language model (:mod:`rewriters`) rewrites the reference
   from the facts, deleting the hallucinations.

This module holds the settings of passes 2 and 3 and the step between them (``verify``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.recaption.detectors import Detection, DetectorConfig
from operators.recaption.objects import extract_objects
from operators.recaption.prompts import DEFAULT_REWRITE_PROMPT, describe_objects


class RewriterConfig(BaseModel):
    """Pass 3's text-only language model (``recaption.textualize.rewriter``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field("Qwen/Qwen2.5-7B-Instruct",
                              description="text-only causal LM (AutoModelForCausalLM): HF id, local dir, file:// or "
                                          "s3:// prefix; null = random weights from model_config_path")
    revision: str | None = Field(None, description="HF revision (commit) of a hub rewriter: pins the cache key too")
    model_config_path: str | None = Field(None, description="dir with the rewriter's transformers config + tokenizer "
                                                            "files (random weights: tests, dry run)")
    prompt: str | None = Field(None, description="template; {reference} (pass 1's description) and {evidence} (the "
                                                 "verified objects and the hallucinations) are filled in; null: the "
                                                 "built-in rewrite prompt")
    system_prompt: str | None = Field(None, description="system message of a chat prompt")
    prompt_style: Literal["auto", "prefix", "chat"] = Field(
        "auto", description="chat: the tokenizer's chat template; prefix: the prompt as plain text; "
                            "auto: chat if the tokenizer has a template")
    max_prompt_tokens: int = Field(1024, ge=8, description="rewrite prompts are truncated to this many tokens")
    max_new_tokens: int = Field(256, ge=1, description="decoding (greedy): most tokens of the rewritten description")
    min_new_tokens: int = Field(0, ge=0, description="decoding: fewest tokens of the rewritten description")
    repetition_penalty: float = Field(1.0, gt=0, description="decoding: penalty on repeated tokens")
    micro_batch: int = Field(16, ge=1, description="prompts per generate call")

    @field_validator("prompt")
    @classmethod
    def _quotes_reference(cls, v):
        if v is not None and "{reference}" not in v:
            raise ValueError(f"recaption.textualize.rewriter.prompt must contain {{reference}}, got {v!r}")
        return v

    def template(self) -> str:
        return self.prompt if self.prompt is not None else DEFAULT_REWRITE_PROMPT


class TextualizeConfig(BaseModel):
    """Image Textualization's three passes (``recaption.textualize``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    enabled: bool = Field(False, description="Image Textualization: the captioner's description (pass 1) is checked "
                                             "by an open-vocabulary detector (pass 2) and rewritten by a text-only LLM "
                                             "from the verified objects (pass 3)")
    detector: DetectorConfig = DetectorConfig()
    rewriter: RewriterConfig = RewriterConfig()
    object_words: list[str] | None = Field(None, description="the objects (words or two-word phrases) looked for in "
                                                             "the description and checked by the detector; null: "
                                                             "the built-in list (COCO's classes and common objects)")
    extra_queries: list[str] = Field(default_factory=list,
                                     description="objects the detector always looks for: found, they join the facts "
                                                 "(the rewriter may add them); not found, nothing is said")
    max_objects: int = Field(12, ge=1, description="facts per image, highest-scoring first")

    def words(self) -> tuple[str, ...]:
        from operators.recaption.objects import DEFAULT_OBJECT_WORDS

        return DEFAULT_OBJECT_WORDS if self.object_words is None else tuple(self.object_words)


@dataclass
class Verification:
    """Pass 2's outcome for one image: the objects named, the facts (detections of named or extra
    objects, as ``describe_objects`` writes them), the named objects not found, and the facts as
    prompt lines."""

    named: list[str]
    facts: list[dict]
    removed: list[str]
    facts_text: str

    def changes_anything(self) -> bool:
        """Pass 3 has something to do: facts to add, or hallucinations to delete."""
        return bool(self.facts or self.removed)


def queries_for(reference: str | None, cfg: TextualizeConfig) -> tuple[list[str], list[str]]:
    """(objects the reference names, all detector queries: those and the extra ones)."""
    named = extract_objects(reference, cfg.words())
    extra = [q for q in dict.fromkeys(" ".join(q.lower().split()) for q in cfg.extra_queries) if q and q not in named]
    return named, named + extra


def verify(named: list[str], detections: list[Detection], width: int, height: int,
           cfg: TextualizeConfig) -> Verification:
    """A named object is verified when the detector boxed it; the others are removed. Facts list
    every box kept (named or extra objects), highest score first, at most ``max_objects``."""
    found = {d.query for d in detections}
    removed = [o for o in named if o not in found]
    text, facts = describe_objects([(d.query, d.score, d.box) for d in detections], width, height, cfg.max_objects)
    for f in facts:
        f["mentioned"] = f["label"] in named
    return Verification(named, facts, removed, text)
