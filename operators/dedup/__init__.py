"""Phase-2 dedup (``dedup:`` in the job config): exact (sha256), perceptual (pHash) and semantic
(SemDeDup) steps, applied in that order, each over what the previous kept. Every dedup drop has
``drop_stage`` ``dedup`` and ``duplicate_of``, the kept twin's ``sample_id``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from operators.dedup.exact import EXACT_DUPLICATE, ExactDedupStep


class DedupConfig(BaseModel):
    """Dedup settings (``dedup:`` in the job config)."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="drop samples whose image bytes (sha256) equal a kept sample's; the kept "
                                          "one is the smallest sample_id")
    merge_captions: bool = Field(True, description="exact duplicates' captions join the kept sample's captions "
                                                   "(many URLs of one image are many alt-texts of it)")
    max_captions: int = Field(16, ge=1, description="at most this many captions on a sample after merging")

    def steps(self) -> list:
        """The configured dedup steps in order."""
        out: list = []
        if self.exact:
            out.append(ExactDedupStep(self.merge_captions, self.max_captions))
        return out

    def reads(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c for s in self.steps() for c in s.reads()))


REASONS = (EXACT_DUPLICATE,)
