"""Phase-2 dedup (``dedup:`` in the job config): exact (sha256), perceptual (pHash) and semantic
(SemDeDup) steps, applied in that order, each over what the previous kept. Every dedup drop has
``drop_stage`` ``dedup`` and ``duplicate_of``, the kept twin's ``sample_id``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from operators.dedup.exact import EXACT_DUPLICATE, ExactDedupStep
from operators.dedup.perceptual import NEAR_DUPLICATE, PerceptualConfig, PerceptualDedupStep
from operators.dedup.semantic import SEMANTIC_DUPLICATE, SemanticConfig, SemanticDedupStep


class DedupConfig(BaseModel):
    """Dedup settings (``dedup:`` in the job config)."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="drop samples whose image bytes (sha256) equal a kept sample's; the kept "
                                          "one is the smallest sample_id")
    merge_captions: bool = Field(True, description="exact duplicates' captions join the kept sample's captions "
                                                   "(many URLs of one image are many alt-texts of it)")
    max_captions: int = Field(16, ge=1, description="at most this many captions on a sample after merging")
    perceptual: PerceptualConfig = Field(default_factory=PerceptualConfig,
                                         description="near duplicates by perceptual hash (operators/dedup/perceptual.py)")
    semantic: SemanticConfig = Field(default_factory=SemanticConfig,
                                     description="SemDeDup on the CLIP image embeddings (operators/dedup/semantic.py)")

    def steps(self) -> list:
        """The configured dedup steps in order."""
        out: list = []
        if self.exact:
            out.append(ExactDedupStep(self.merge_captions, self.max_captions))
        if self.perceptual.enabled:
            out.append(PerceptualDedupStep(self.perceptual))
        if self.semantic.enabled:
            out.append(SemanticDedupStep(self.semantic))
        return out

    def reads(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for s in self.steps() for c in s.reads()))


REASONS = (EXACT_DUPLICATE, NEAR_DUPLICATE, SEMANTIC_DUPLICATE)
