"""ImageProcessor: decode, orient, bound, resize and re-encode downloaded images (and pHash them).

Resizing follows img2dataset's ``Resizer`` exactly (its five resize modes, white borders,
alpha matting onto white, lanczos up / area down; tests compare pixels with it), but calls
OpenCV directly: img2dataset builds albumentations transforms for every image, which costs
about as much as the resize itself.
Before any full decode the header is read with Pillow, so decompression bombs
(``max_pixels``) are refused from their declared size; EXIF orientation is applied first.
Every decoded image also gets its 64-bit pHash (``phash``, operators/phash.py), for phase 2's
perceptual dedup.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from typing import ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.base import DECODE_ERROR, DROPPED, FAILED, Columns, DropReason, Operator, Resources, alive_mask, mark, set_columns
from operators.phash import phash

log = logging.getLogger(__name__)

ResizeMode = Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]


class ImageConfig(BaseModel):
    """Image stage settings (``images:`` in the job config); names follow img2dataset."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(256, ge=8, le=16384, description="target size in pixels (img2dataset's image_size)")
    resize_mode: ResizeMode = Field("border", description="img2dataset's resize modes: no, border (pad to a "
                                                          "square), keep_ratio, keep_ratio_largest, center_crop")
    resize_only_if_bigger: bool = Field(False, description="never upscale")
    encode_format: Literal["jpg", "webp", "png"] = Field("jpg", description="format of the written image")
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality; for png a compression level 0-9")
    # Tracking pixels (1x1), spacers and icons (16-48 px) are not training images, and below 64 px the
    # default 256 px output would be a 4x+ upscale; img2dataset keeps them (its default is 0).
    min_image_size: int = Field(64, ge=0, description="smallest side, pixels; smaller images are dropped (too_small)")
    max_aspect_ratio: float = Field(float("inf"), gt=0, description="longer over shorter side; more is dropped "
                                                                       "(aspect_ratio)")
    max_pixels: int = Field(89_478_485, gt=0, description="width x height from the header; larger is refused")
    reduce_on_decode: float | None = Field(
        2.0, ge=1.0,
        description="decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, as Pillow's draft() in "
                    "thumbnail()) when that scale still leaves at least this many times the target size, then "
                    "resize as usual; null: always decode in full (img2dataset's exact pixels)")
    num_cpus: float = Field(0.5, gt=0, description="CPUs the download actor adds for image work (it runs there, "
                                                   "on ceil(num_cpus) threads)")
    batch_size: int = Field(64, ge=1, description="rows per call when the image stage runs on its own; the job runs it "
                                                   "in the download actor, on chunks of download.yield_rows")


class ImageProcessor(Operator):
    """Turns ``image_bytes`` (downloaded) into ``image`` (resized, re-encoded) with sizes and sha256."""

    name: ClassVar[str] = "image"
    reads = ("status", "image_bytes")
    writes = ("image", "sha256", "orig_width", "orig_height", "width", "height", "image_format", "phash")
    # phash: 64-bit pHash (operators/phash.py) of the decoded pixels, bits in an int64; null without an image.
    types = {"image": pa.binary(), "sha256": pa.string(), "orig_width": pa.int32(), "orig_height": pa.int32(),
             "width": pa.int32(), "height": pa.int32(), "image_format": pa.string(), "phash": pa.int64()}
    reasons = (
        DECODE_ERROR,
        DropReason("too_many_pixels", DROPPED, "more than images.max_pixels pixels (read from the header, "
                                               "before decoding)"),
        DropReason("too_small", DROPPED, "the smaller side is under images.min_image_size"),
        DropReason("aspect_ratio", DROPPED, "the aspect ratio is over images.max_aspect_ratio"),
        DropReason("no_bytes", FAILED, "no image bytes reached the image stage"),
    )

    @classmethod
    def columns(cls, config=None) -> Columns:
        return Columns(cls.reads, dict(cls.types))

    def __init__(self, config: ImageConfig | dict | None = None):
        self.config = config if isinstance(config, ImageConfig) else ImageConfig(**(config or {}))
        if self.config.encode_format == "png" and self.config.encode_quality > 9:
            raise ValueError(f"encode_quality for png is a compression level 0-9, got {self.config.encode_quality}")
        self._params = None

    @classmethod
    def resources(cls, config: ImageConfig) -> Resources:
        return Resources(num_cpus=config.num_cpus, batch_size=config.batch_size)

    def _encode_params(self) -> list[int]:
        import cv2

        flag = {"jpg": cv2.IMWRITE_JPEG_QUALITY, "webp": cv2.IMWRITE_WEBP_QUALITY,
                "png": cv2.IMWRITE_PNG_COMPRESSION}[self.config.encode_format]
        return [int(flag), self.config.encode_quality]

    def process(self, batch: pa.Table) -> pa.Table:
        raw = batch.column("image_bytes").to_pylist()
        # Raw downloads are not kept past this stage: only the processed image travels on.
        return self.process_raw(batch.drop_columns(["image_bytes"]), raw)

    def process_raw(self, batch: pa.Table, raw: list[bytes | None]) -> pa.Table:
        """``process`` with the downloaded bytes given as a list beside the batch (the download
        actor hands its bodies over this way: no copy into an Arrow column and back)."""
        if len(raw) != batch.num_rows:
            raise ValueError(f"{len(raw)} bodies for {batch.num_rows} rows")
        alive = alive_mask(batch)
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
        batch = set_columns(batch, {k: pa.array(v, self.types[k]) for k, v in cols.items()})
        return mark(batch, self.name, outcomes)

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
            pixels = None  # decoded by Pillow when it must be (orientation, modes OpenCV mishandles)
            orientation = exif_orientation(im, data, fmt)
            if orientation not in (1, None):
                im = ImageOps.exif_transpose(im)
                w, h = im.size
                res.update(orig_width=w, orig_height=h)
                pixels = im
            if fmt in ("gif", "tiff") or im.mode in ("P", "I;16", "I", "F", "CMYK", "1"):
                # cv2 cannot read GIF and mishandles some modes: normalise through Pillow.
                pixels = to_rgb_or_rgba(im)
            if self._params is None:
                self._params = self._encode_params()
            factor = reduction_factor(w, h, c) if pixels is None and fmt == "jpeg" else 1
            img = decode(data, factor, gray=im.mode == "L") if pixels is None else pil_to_cv(pixels)
            ph = phash(img)  # of the decoded pixels (a reduced JPEG decode is close to the full one)
            img, width, height = resize_encode(img, c.resize_mode, c.image_size, c.resize_only_if_bigger,
                                               c.encode_format, self._params,
                                               orig_size=(h, w) if factor > 1 else None)
        except Exception as exc:  # noqa: BLE001
            return res, (FAILED, "decode_error", f"{type(exc).__name__}: {exc}"[:200])
        res.update(image=img, width=width, height=height, phash=ph)
        return res, None


def exif_orientation(im, data: bytes, fmt: str) -> int | None:
    """EXIF orientation tag, 1 when absent. A PNG without an ``eXIf`` chunk before its pixels makes
    Pillow's ``getexif`` decode the whole image to look for one after them; when the bytes hold no
    ``eXIf`` at all the answer is known without that decode."""
    if fmt not in ("jpeg", "webp", "tiff", "png"):
        return 1
    if fmt == "png" and "exif" not in im.info and b"eXIf" not in data:
        return 1
    return im.getexif().get(0x0112, 1)


_CV2_THREADS_SET = False


def _cv2():
    """OpenCV with one thread per call: the caller's threads are the parallelism (set once)."""
    global _CV2_THREADS_SET
    import cv2

    if not _CV2_THREADS_SET:
        cv2.setNumThreads(1)
        _CV2_THREADS_SET = True
    return cv2


def reduction_factor(width: int, height: int, c: ImageConfig) -> int:
    """1, 2, 4 or 8: the largest JPEG decode reduction that leaves the side the resize mode scales
    to at least ``reduce_on_decode`` times the target (1 when nothing would be resized down)."""
    if c.reduce_on_decode is None or c.resize_mode == "no":
        return 1
    side = min(width, height) if c.resize_mode in ("keep_ratio", "center_crop") else max(width, height)
    if side <= c.image_size:
        return 1
    for f in (8, 4, 2):
        if side / f >= c.image_size * c.reduce_on_decode:
            return f
    return 1


def decode(data: bytes, factor: int = 1, gray: bool = False):
    """Bytes -> BGR, BGRA or gray pixels, as img2dataset's ``cv2.imdecode(..., IMREAD_UNCHANGED)``;
    ``factor`` 2, 4 or 8 decodes a JPEG at that reduced scale (color or ``gray``, EXIF ignored as
    IMREAD_UNCHANGED ignores it)."""
    import numpy as np

    cv2 = _cv2()
    if factor == 1:
        flags = cv2.IMREAD_UNCHANGED
    else:
        flags = {(2, False): cv2.IMREAD_REDUCED_COLOR_2, (4, False): cv2.IMREAD_REDUCED_COLOR_4,
                 (8, False): cv2.IMREAD_REDUCED_COLOR_8, (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
                 (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8}[factor, gray]
        flags |= cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise ValueError("Image decoding error")
    return img


def to_rgb_or_rgba(im):
    """A Pillow image in RGB, or RGBA when it has alpha or a transparent colour."""
    return im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")


def pil_to_cv(im):
    """A Pillow image -> the pixels ``decode`` would give for it saved losslessly (BGR / BGRA / gray)."""
    import numpy as np

    cv2 = _cv2()
    if im.mode == "L":
        return np.asarray(im)
    if im.mode not in ("RGB", "RGBA"):
        im = to_rgb_or_rgba(im)
    arr = np.asarray(im)
    return cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA if im.mode == "RGBA" else cv2.COLOR_RGB2BGR)


def resize_encode(img, mode: str, size: int, only_if_bigger: bool, fmt: str,
                  params: list[int], orig_size: tuple[int, int] | None = None) -> tuple[bytes, int, int]:
    """Resize decoded pixels as img2dataset's Resizer does, then encode. Raises ValueError.
    ``orig_size`` (height, width): the image's size before a reduced decode; the output size and
    filter are those of the full image."""
    import numpy as np

    cv2 = _cv2()
    if img.ndim == 3 and img.shape[-1] == 4:  # alpha matting with a white background
        alpha = img[:, :, 3, np.newaxis]
        img = np.rint((alpha / 255 * img[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8)
    h, w = orig_size or img.shape[:2]
    if mode in ("keep_ratio", "center_crop"):
        side = min(h, w)
    elif mode in ("border", "keep_ratio_largest"):
        side = max(h, w)
    else:
        side = None
    if side is not None and (not only_if_bigger or side > size):
        interp = cv2.INTER_AREA if side > size else cv2.INTER_LANCZOS4
        scale = size / side
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != img.shape[:2]:
            img = cv2.resize(img, (nw, nh), interpolation=interp)
        h, w = img.shape[:2]
        if mode == "center_crop":
            y, x = (h - size) // 2, (w - size) // 2
            img = img[y:y + size, x:x + size]
        elif mode == "border" and (h < size or w < size):
            top, left = int((size - h) / 2.0) if h < size else 0, int((size - w) / 2.0) if w < size else 0
            bottom, right = max(0, size - h - top), max(0, size - w - left)
            img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=[255, 255, 255])
    ok, buf = cv2.imencode(f".{fmt}", img, params=params)
    if not ok:
        raise ValueError(f"cannot encode as {fmt}")
    return buf.tobytes(), int(img.shape[1]), int(img.shape[0])
