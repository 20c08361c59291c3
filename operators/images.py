"""ImageProcessor: decode, orient, bound, resize and re-encode downloaded images.

Resizing and encoding reuse img2dataset's ``Resizer`` (its resize modes and conventions).
Before any full decode the header is read with Pillow, so decompression bombs
(``max_pixels``) are refused from their declared size; EXIF orientation is applied first.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.base import DROPPED, FAILED, Operator, Resources, alive_mask, mark, set_columns

log = logging.getLogger(__name__)

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]


class ImageConfig(BaseModel):
    """Image stage settings (``images:`` in the job config); names follow img2dataset."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(256, ge=8, le=16384)
    resize_mode: ResizeMode = "border"
    resize_only_if_bigger: bool = False
    encode_format: Literal["jpg", "webp", "png"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    min_image_size: int = Field(0, ge=0, description="smallest side, pixels")
    max_aspect_ratio: float = Field(float("inf"), gt=0)
    max_pixels: int = Field(89_478_485, gt=0, description="width x height from the header; larger is refused")
    num_cpus: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1)


class ImageProcessor(Operator):
    """Turns ``image_bytes`` (downloaded) into ``image`` (resized, re-encoded) with sizes and sha256."""

    name: ClassVar[str] = "image"
    reads = ("status", "image_bytes")
    writes = ("image", "sha256", "orig_width", "orig_height", "width", "height", "image_format")

    def __init__(self, config: ImageConfig | dict | None = None):
        self.config = config if isinstance(config, ImageConfig) else ImageConfig(**(config or {}))
        if self.config.encode_format == "png" and self.config.encode_quality > 9:
            raise ValueError(f"encode_quality for png is a compression level 0-9, got {self.config.encode_quality}")
        self._resizer = None

    @classmethod
    def resources(cls, config: ImageConfig) -> Resources:
        return Resources(num_cpus=config.num_cpus, batch_size=config.batch_size)

    def _get_resizer(self):
        if self._resizer is None:
            os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
            from img2dataset.resizer import Resizer

            c = self.config
            self._resizer = Resizer(
                image_size=c.image_size, resize_mode=c.resize_mode, resize_only_if_bigger=c.resize_only_if_bigger,
                encode_format=c.encode_format, encode_quality=c.encode_quality,
                # Size limits are checked here from the header, before decoding (see _one).
                min_image_size=0, max_image_area=float("inf"), max_aspect_ratio=float("inf"),
            )
        return self._resizer

    def process(self, batch: pa.Table) -> pa.Table:
        alive = alive_mask(batch)
        raw = batch.column("image_bytes").to_pylist()
        n = batch.num_rows
        cols = {k: [None] * n for k in self.writes}
        outcomes: list = [None] * n
        for i in range(n):
            if not alive[i]:
                continue
            if raw[i] is None:
                outcomes[i] = (FAILED, "no_bytes", "no image bytes reached the image stage")
                continue
            res, outcome = self._one(raw[i])
            outcomes[i] = outcome
            for k, v in res.items():
                cols[k][i] = v
        types = {"image": pa.binary(), "sha256": pa.string(), "orig_width": pa.int32(), "orig_height": pa.int32(),
                 "width": pa.int32(), "height": pa.int32(), "image_format": pa.string()}
        batch = set_columns(batch, {k: pa.array(v, types[k]) for k, v in cols.items()})
        batch = mark(batch, self.name, outcomes)
        # Raw downloads are not kept past this stage: only the processed image travels on.
        return batch.drop_columns(["image_bytes"])

    def _one(self, data: bytes):
        from PIL import Image, ImageOps

        c = self.config
        res = {"sha256": hashlib.sha256(data).hexdigest()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))  # reads the header only
                w, h = im.size
                fmt = (im.format or "").lower()
        except Image.DecompressionBombWarning as exc:
            return res, (DROPPED, "too_many_pixels", str(exc)[:200])
        except Image.DecompressionBombError as exc:
            return res, (DROPPED, "too_many_pixels", str(exc)[:200])
        except Exception as exc:  # noqa: BLE001 - any undecodable header is a recorded drop
            return res, (FAILED, "decode_error", f"{type(exc).__name__}: {exc}"[:200])
        res.update(orig_width=w, orig_height=h, image_format=fmt)
        if w <= 0 or h <= 0:
            return res, (FAILED, "decode_error", f"bad size {w}x{h}")
        if w * h > c.max_pixels:
            return res, (DROPPED, "too_many_pixels", f"{w}x{h} > {c.max_pixels} pixels")
        if min(w, h) < c.min_image_size:
            return res, (DROPPED, "too_small", f"{w}x{h} < {c.min_image_size}")
        if max(w, h) / min(w, h) > c.max_aspect_ratio:
            return res, (DROPPED, "aspect_ratio", f"{w}x{h} > {c.max_aspect_ratio}")
        try:
            stream = io.BytesIO(data)
            orientation = im.getexif().get(0x0112, 1) if fmt in ("jpeg", "webp", "tiff", "png") else 1
            if orientation not in (1, None):
                # Apply EXIF orientation, then hand lossless pixels to the resizer.
                im = ImageOps.exif_transpose(im)
                stream = io.BytesIO()
                im.save(stream, format="PNG")
                w, h = im.size
                res.update(orig_width=w, orig_height=h)
            if fmt in ("gif", "tiff") or im.mode in ("P", "I;16", "I", "F", "CMYK", "1"):
                # cv2 cannot read GIF and mishandles some modes: normalise through Pillow.
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
                stream = io.BytesIO()
                im.save(stream, format="PNG")
            stream.seek(0)
            img, width, height, _ow, _oh, err = self._get_resizer()(stream)
        except Exception as exc:  # noqa: BLE001
            return res, (FAILED, "decode_error", f"{type(exc).__name__}: {exc}"[:200])
        if err is not None or img is None:
            return res, (FAILED, "decode_error", str(err)[:200])
        res.update(image=img, width=width, height=height)
        return res, None


_PROCESSORS: dict[str, ImageProcessor] = {}


def process_images(batch: pa.Table, config: ImageConfig) -> pa.Table:
    """Function form for ``map_batches`` tasks; one processor per config per worker process."""
    key = config.model_dump_json()
    proc = _PROCESSORS.get(key)
    if proc is None:
        proc = _PROCESSORS[key] = ImageProcessor(config)
    return proc(batch)
