"""Image-stage benchmark: CPU per image of img2dataset's resizer against ours, on photo-sized JPEGs.

    python benchmarks/image_bench.py [--n 60] [--image-size 256] [--resize-mode border] [--quality 95]

The download benchmark serves the bundled sample (images of at most 400 px), where no reduced
decode applies. Web images are usually larger than the training size; this benchmark generates
photo-like JPEGs (smooth gradients, edges, noise) at common camera and web sizes and times, in one
process on one thread, for the same images:
- img2dataset's ``Resizer`` (full decode, OpenCV resize, encode),
- ours with ``images.reduce_on_decode: null`` (the same OpenCV calls: img2dataset's exact pixels),
- ours with the default ``reduce_on_decode`` (JPEG DCT scaling when the image is at least 2x the
  target after the reduction), and how close its output is to img2dataset's (PSNR).
It prints CPU ms per image, images/s per core, and the ratios against img2dataset.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = [(500, 375), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536), (3000, 2000)]


def photo(width: int, height: int, seed: int):
    """A photo stand-in: smooth color fields, hard edges, sensor-like noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    f = rng.uniform(20, 90, 6)
    base = np.stack([128 + 90 * np.sin(x / f[k] + y / f[k + 3] + k) for k in range(3)], -1)
    base[((x // rng.integers(50, 200)) + (y // rng.integers(50, 200))) % 3 == 0] *= 0.6
    base += rng.normal(0, 5, base.shape)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # web aspect ratios (long side / short side) for sides=


def make_jpegs(n: int, sides: tuple[int, int] | None = None, seed: int = 0,
               quality: tuple[int, int] = (75, 92)) -> list[bytes]:
    """``n`` photo-like JPEGs. Default: the camera and web ``SIZES`` in turn, landscape and portrait,
    q90. With ``sides=(lo, hi)``: web-like images instead, each drawn from ``seed``: the long side
    uniform in [lo, hi] (mean halfway), an aspect ratio from ``ASPECTS`` (the short side at least
    lo), either orientation, JPEG quality uniform in ``quality``."""
    out = []
    for i in range(n):
        if sides is None:
            w, h = SIZES[i % len(SIZES)]
            q, pseed = 90, i
        else:
            lo, hi = sides
            if not 1 <= lo <= hi:
                raise ValueError(f"sides must be (lo, hi) with 1 <= lo <= hi, got {sides!r}")
            rng = np.random.default_rng([seed, i])
            w = int(rng.integers(lo, hi + 1))
            h = max(lo, round(w / ASPECTS[int(rng.integers(len(ASPECTS)))]))
            q, pseed = int(rng.integers(quality[0], quality[1] + 1)), int(rng.integers(2 ** 31))
        if i % 2:
            w, h = h, w  # portrait too
        buf = io.BytesIO()
        photo(w, h, pseed).save(buf, "JPEG", quality=q)
        out.append(buf.getvalue())
    return out


def cpu_ms(fn, datas: list[bytes], reps: int) -> float:
    fn(datas[0])
    t0 = time.process_time()
    for _ in range(reps):
        for d in datas:
            fn(d)
    return 1000 * (time.process_time() - t0) / (reps * len(datas))


def psnr(a: bytes, b: bytes) -> float:
    from PIL import Image

    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), np.float32)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32)
    if x.shape != y.shape:
        return float("nan")
    mse = float(np.mean((x - y) ** 2))
    return 10 * np.log10(255 ** 2 / mse) if mse > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32, help="images (cycling through the sizes, landscape and portrait)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="border")
    p.add_argument("--quality", type=int, default=95)
    args = p.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import cv2
    from img2dataset.resizer import Resizer

    from operators.images import ImageConfig, ImageProcessor

    cv2.setNumThreads(1)
    datas = make_jpegs(args.n)
    ref = Resizer(image_size=args.image_size, resize_mode=args.resize_mode, resize_only_if_bigger=False,
                  encode_format="jpg", encode_quality=args.quality)
    cfg = dict(image_size=args.image_size, resize_mode=args.resize_mode, encode_format="jpg",
               encode_quality=args.quality)
    exact = ImageProcessor(ImageConfig(**cfg, reduce_on_decode=None))
    fast = ImageProcessor(ImageConfig(**cfg))
    ms = {
        "img2dataset Resizer": cpu_ms(lambda d: ref(io.BytesIO(d)), datas, args.reps),
        "imgcurate, reduce_on_decode null": cpu_ms(exact._one, datas, args.reps),
        f"imgcurate, reduce_on_decode {fast.config.reduce_on_decode:g}": cpu_ms(fast._one, datas, args.reps),
    }
    same = sum(exact._one(d)[0]["image"] == ref(io.BytesIO(d))[0] for d in datas)
    quality = [psnr(fast._one(d)[0]["image"], ref(io.BytesIO(d))[0]) for d in datas]
    mp = np.mean([np.prod(SIZES[i % len(SIZES)]) for i in range(args.n)]) / 1e6
    print(f"image benchmark: {args.n} photo-like JPEGs ({min(SIZES)[0]}x{min(SIZES)[1]} to "
          f"{max(SIZES)[0]}x{max(SIZES)[1]}, mean {mp:.1f} MP, q90) -> {args.image_size} {args.resize_mode} jpg "
          f"q{args.quality}; one thread, CPU time, {args.reps} passes")
    base = ms["img2dataset Resizer"]
    for name, v in ms.items():
        print(f"  {name:<36} {v:7.2f} ms/img  {1000 / v:7.1f} images/s per core   x{base / v:.2f} vs img2dataset")
    print(f"  reduce_on_decode null gives img2dataset's exact bytes for {same}/{len(datas)} images")
    print(f"  default output vs img2dataset's: PSNR min {min(quality):.1f} dB, median {np.median(quality):.1f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
