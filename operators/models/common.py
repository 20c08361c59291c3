"""What every model stage shares: seeded random weights, device resolution, decode to RGB.

One seed for every model built without released weights (tests, the dry run): each actor and
each rerun builds the same random model, so scores are reproducible and a resume does not mix
the outputs of two random models.
"""

from __future__ import annotations

import io
from typing import Callable, TypeVar

from operators.base import DECODE_ERROR

RANDOM_SEED = 0

T = TypeVar("T")


def seeded(build: Callable[[], T], seed: int | None = RANDOM_SEED) -> T:
    """``build()`` with torch's RNG seeded, without touching the process's RNG (``seed=None``: unseeded)."""
    if seed is None:
        return build()
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def resolve_device(setting: str, use_gpu: bool = True) -> str:
    """``auto`` is CUDA when there is a GPU (and the stage asked for one), else CPU; others as given."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def decode_rgb(blob: bytes | None):
    """A PIL image in RGB from encoded bytes; raises ``ValueError`` when there are none or they do not decode."""
    if blob is None:
        raise ValueError("no image bytes")
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        return im.convert("RGB")


def decode_all(blobs: list[bytes | None], stage: str) -> tuple[list, list]:
    """Decode each blob to RGB: (images with ``None`` where it failed, outcomes with a recorded
    ``decode_error`` there and ``None`` elsewhere), aligned with ``blobs``."""
    images, outcomes = [], []
    for b in blobs:
        try:
            images.append(decode_rgb(b))
            outcomes.append(None)
        except Exception as exc:  # noqa: BLE001 - recorded per row, never raised
            images.append(None)
            outcomes.append(decode_failure(stage, exc))
    return images, outcomes


def decode_failure(stage: str, exc: BaseException | str) -> tuple[str, str, str]:
    """The outcome of a row whose image did not decode in ``stage``."""
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return (DECODE_ERROR.status, DECODE_ERROR.name, f"{stage}: image could not be decoded: {detail}"[:500])
