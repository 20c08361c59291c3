"""Report settings (``report:`` in the job config; ``imgcurate report`` takes the same keys with ``--set``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ReportConfig(BaseModel):
    """The run report: one self-contained HTML file written next to the manifest (jobs/report.py)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="write report.html next to the run manifest at the end of every run")
    path: str | None = Field(None, description="where the report goes (local or s3://); null: <output>/report.html")
    kept_per_grid: int = Field(24, ge=0, le=200, description="kept samples shown (a seeded uniform sample of the run)")
    dropped_per_grid: int = Field(12, ge=0, le=200, description="samples shown per drop reason (seeded, uniform)")
    max_grids: int = Field(40, ge=1, le=500, description="grids of dropped samples at most (the largest reasons); "
                                                        "the others are listed with their counts")
    thumbnail_px: int = Field(96, ge=16, le=512, description="longer side of a thumbnail (JPEG, inlined)")
    thumbnail_quality: int = Field(70, ge=10, le=95, description="JPEG quality of the thumbnails")
    histogram_bins: int = Field(50, ge=5, le=500, description="bars per score histogram")
    explorer_sample: int = Field(1500, ge=0, le=5000, description="image embeddings clustered for the explorer "
                                                                 "(a seeded sample; 0: no explorer)")
    explorer_branching: int = Field(6, ge=2, le=20, description="children per treemap cell at most")
    explorer_leaf_size: int = Field(30, ge=2, description="clusters of at most this many samples are not split")
    explorer_representatives: int = Field(3, ge=1, le=9, description="thumbnails per treemap cell")
    dropped_thumbnails_per_block: int = Field(
        12, ge=0, description="phase 1: per written block and drop reason, this many rows dropped after decoding "
                              "(CLIP, safety, reward...) keep a small thumbnail for the report (the seeded-smallest "
                              "ranks, so the report's sample of a reason is among them); 0: none")
    seed: int = Field(0, description="seeds which samples the grids and the explorer show")
