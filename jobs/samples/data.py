"""The bundled dry-run sample: images generated deterministically, and a URL list with expectations.

``generate_images`` writes a few hundred small images plus the hostile files a crawler must
survive (tiny, extreme aspect ratio, corrupt, a decompression-bomb PNG header); ``sample_cases``
lists the rows of the URL list, each with the outcome the pipeline should reach (``kept`` or a
named drop reason), against the routes of ``jobs.samples.server``.

    python -m jobs.samples.data OUT_DIR [--n-good 240] [--seed 0] [--base-url URL]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import struct
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Thresholds the dry run is configured with; the expectations below depend on them.
DRYRUN_MAX_BYTES = 2_000_000
DRYRUN_MAX_REDIRECTS = 5
DRYRUN_MIN_IMAGE_SIZE = 32
DRYRUN_MAX_ASPECT_RATIO = 5.0

IMAGES_SUBDIR = "images"
MARKER = ".generated"
BOMB_SIZE = 30000

# Placeholders a SampleCase.raw_url may hold, filled in from the server's base URL.
BASE = "{BASE}"                            # http://127.0.0.1:PORT
BASE_UPPER_SCHEME = "{BASE_UPPER_SCHEME}"  # HTTP://127.0.0.1:PORT

EXPECT_REASONS = (
    "kept", "http_404", "http_500", "robots_noai", "robots_noimageai", "robots_noindex",
    "timeout", "decode_error", "not_image", "too_large", "too_many_pixels", "too_many_redirects",
    "too_small", "aspect_ratio", "invalid_url", "unsupported_scheme", "missing_url", "empty_body",
)

# Index of the special good images (modulo n_good, so small n_good still gets them).
_RGBA_PNG, _GIF, _GRAY, _EXIF_ROT = 10, 11, 12, 13
# Planted copies of good images for phase-2 dedup (kind -> good image indices, never a special one
# above, all below 16 so the smallest test sample has them): ``exact`` the same bytes under another
# URL, ``jpeg`` re-encoded at quality 75, ``resized`` 0.6x (1.5x when that would fall under 64 px),
# ``cropped`` 1.5% off each side; each a kept sample of phase 1, with its own alt text. The
# generated images are smooth, so their pHash is less stable than a photo's; these originals are
# ones whose copies stay within dedup.perceptual's default (tests/test_dedup_perceptual.py prints
# the distributions over many images).
TWINS = {"exact": (2, 4, 8), "jpeg": (3, 7, 14), "resized": (15, 1, 7), "cropped": (6, 9, 0)}


@dataclass
class SampleCase:
    """One input row of the URL list and the outcome the pipeline should reach for it."""

    path: str            # server path, e.g. "/img/00001.jpg", joined to the server's base_url
    caption: str | None  # alt text (may be None or odd)
    title: str | None    # a second caption column (page title), often None
    expect: str          # "kept" or the expected drop reason
    raw_url: str | None = None  # used verbatim (after placeholder substitution) when set
    dup_of: str | None = None   # path of the row this one must merge with (same sample)
    twin_of: str | None = None  # path of the good image this one is a planted copy of (phase-2 dedup)

    def url(self, base_url: str) -> str | None:
        """The URL written to the list: raw_url with placeholders, base+path, or None."""
        base = base_url.rstrip("/")
        if self.raw_url is not None:
            scheme, sep, rest = base.partition("://")
            return (self.raw_url.replace(BASE_UPPER_SCHEME, scheme.upper() + sep + rest)
                    .replace(BASE, base))
        if not self.path:
            return None
        return base + self.path


# ---------------------------------------------------------------------------- images

def good_image_names(n_good: int) -> list[str]:
    """File names of the good images, in index order (independent of the seed)."""
    special = {_EXIF_ROT % n_good: "jpg", _GRAY % n_good: "jpg", _GIF % n_good: "gif",
               _RGBA_PNG % n_good: "png"}  # later keys win if tiny n_good makes them collide
    names = []
    for i in range(n_good):
        ext = special.get(i) or {5: "png", 6: "webp"}.get(i % 8, "jpg")
        names.append(f"{i:05d}.{ext}")
    return names


def twin_names(n_good: int) -> list[tuple[str, str, str]]:
    """(kind, file name of the copy, file name of its original) of the planted copies."""
    names = good_image_names(n_good)
    return [(kind, f"twin-{kind}-{k}.jpg", names[i % n_good])
            for kind, idx in TWINS.items() for k, i in enumerate(idx)]


def _write_twins(root_dir: str, n_good: int) -> None:
    for kind, name, original in twin_names(n_good):
        src = os.path.join(root_dir, original)
        dst = os.path.join(root_dir, name)
        if kind == "exact":
            with open(src, "rb") as f, open(dst, "wb") as g:
                g.write(f.read())
            continue
        im = Image.open(src).convert("RGB")
        w, h = im.size
        if kind == "resized":
            scale = 0.6 if 0.6 * min(w, h) >= 64 else 1.5
            im = im.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
        elif kind == "cropped":
            dx, dy = round(0.015 * w), round(0.015 * h)
            im = im.crop((dx, dy, w - dx, h - dy))
        _save(im, dst, quality=75 if kind == "jpeg" else 90)


def _pixels(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Random colour blocks or a two-colour gradient, uint8 HxWx3."""
    if rng.random() < 0.5:
        gy, gx = int(rng.integers(2, 9)), int(rng.integers(2, 9))
        blocks = rng.integers(0, 256, size=(gy, gx, 3), dtype=np.uint8)
        img = np.repeat(np.repeat(blocks, -(-height // gy), axis=0), -(-width // gx), axis=1)
        img = img[:height, :width]
    else:
        c0 = rng.integers(0, 256, size=3).astype(np.float32)
        c1 = rng.integers(0, 256, size=3).astype(np.float32)
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xx * np.cos(angle) / width + yy * np.sin(angle) / height
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c0 + (c1 - c0) * t[..., None]
    noise = rng.integers(-12, 13, size=(height, width, 1))
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = BOMB_SIZE, height: int = BOMB_SIZE) -> bytes:
    """A PNG whose valid IHDR declares width x height 8-bit RGB, then an invalid tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", b"\x78\x9c\x00\x01\x02\x03") + _png_chunk(b"IEND", b""))


def _save(im: Image.Image, path: str, **kw) -> None:
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}[path.rsplit(".", 1)[1]]
    if fmt == "JPEG":
        kw.setdefault("quality", 85)
    elif fmt == "WEBP":
        kw.setdefault("quality", 80)
        kw.setdefault("method", 0)  # fastest; still deterministic
    im.save(path, fmt, **kw)


def generate_images(root_dir: str, n_good: int = 240, seed: int = 0) -> None:
    """Writes the good and hostile images into root_dir. Deterministic given seed."""
    if n_good < 1:
        raise ValueError(f"n_good must be >= 1, got {n_good!r}")
    os.makedirs(root_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = good_image_names(n_good)
    specials = {_EXIF_ROT % n_good: "exif", _GRAY % n_good: "gray", _GIF % n_good: "gif",
                _RGBA_PNG % n_good: "rgba"}  # same priority as good_image_names
    for i, name in enumerate(names):
        # Sizes 64..400 px with aspect ratio <= 3, far from the dry run's limit of 5.
        w = int(rng.integers(64, 401))
        h = int(np.clip(w * rng.uniform(1 / 3, 3), 64, 400))
        im = Image.fromarray(_pixels(rng, w, h), "RGB")
        path = os.path.join(root_dir, name)
        kind = specials.get(i)
        if kind == "rgba":
            alpha = np.zeros((h, w), np.uint8)
            alpha[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255  # opaque centre, clear border
            im = im.convert("RGBA")
            im.putalpha(Image.fromarray(alpha, "L"))
            _save(im, path)
        elif kind == "gif":
            _save(im.quantize(colors=64), path)
        elif kind == "gray":
            _save(im.convert("L"), path)
        elif kind == "exif":
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: rotate 90 CW to display
            _save(im, path, exif=exif)
        else:
            _save(im, path)

    _write_twins(root_dir, n_good)  # from the files just written: the generator's stream is unchanged

    for k in range(3):
        _save(Image.fromarray(_pixels(rng, 16, 16), "RGB"), os.path.join(root_dir, f"small-{k}.jpg"))
    # Extreme aspect ratio with the short side above min_image_size, so the only fault is shape.
    for k, (w, h) in enumerate([(400, 40), (48, 400)]):
        _save(Image.fromarray(_pixels(rng, w, h), "RGB"), os.path.join(root_dir, f"wide-{k}.jpg"))

    garbage = random.Random(seed)
    for k in range(4):
        body = b"\xff\xd8\xff\xe0" + garbage.randbytes(garbage.randint(200, 4000))
        with open(os.path.join(root_dir, f"corrupt-{k}.jpg"), "wb") as f:
            f.write(body)
    # A real JPEG truncated to half its length, with the part after SOI scrambled: a JPEG cut
    # inside its scan data still decodes (grey bottom) under LOAD_TRUNCATED_IMAGES, so garbage
    # after the SOI marker is what guarantees a decode error.
    buf = io.BytesIO()
    Image.fromarray(_pixels(rng, 200, 200), "RGB").save(buf, "JPEG", quality=85)
    real = buf.getvalue()
    half = real[: len(real) // 2]
    body = half[:4] + garbage.randbytes(len(half) - 4)
    with open(os.path.join(root_dir, "corrupt-4.jpg"), "wb") as f:
        f.write(body)

    with open(os.path.join(root_dir, "bomb.png"), "wb") as f:
        f.write(bomb_png())


# ---------------------------------------------------------------------------- URL list

_PLAIN = [
    "A red barn in a green field under a clear sky",
    "close-up photo of a golden retriever puppy",
    "abstract painting with bold blue and orange shapes",
    "a bowl of ramen with egg and scallions",
    "city skyline at night, long exposure",
    "vintage bicycle leaning against a brick wall",
    "snow-covered mountains reflected in a lake",
    "minimalist living room with a grey sofa",
    "a child flying a kite on the beach",
    "macro shot of a bee on a sunflower",
    "Product photo: white sneakers on a white background",
    "watercolor illustration of a lighthouse",
]
_UNICODE = [
    "一只在草地上睡觉的猫",
    "قطة نائمة على العشب الأخضر",
    "🐱 cat napping on the grass 🌿☀️",
    "Ночной город после дождя",
    "東京の夜景、雨上がり",
    "강아지가 공원에서 뛰어노는 모습",
    "Crème brûlée à la française — délicieux",
    "नीले आसमान में उड़ती पतंग",
    "👩\u200d👩\u200d👧\u200d👦 family picnic 🧺",
    "Zürich, Straße am Fluss (ß, ä, ö, ü)",
]
_HTML = [
    "Tom &amp; Jerry&#39;s &quot;best&quot; moments",
    "<b>Bold</b> claim: <i>best</i> pizza in town",
    "&lt;script&gt;alert(1)&lt;/script&gt; harmless text",
    "<img src=x onerror=alert(1)> a picture of a dog",
    "caf&eacute; latte art &hearts; &#x1F600;",
    "<p>Sunset over the sea</p><br/>",
]
_CONTROL = [
    "first line\nsecond line",
    "tab\tseparated\tcaption",
    "windows\r\nline ending",
    "bell\x07 and escape\x1b[31m red",
    "  leading and trailing spaces   ",
    "zero\u200bwidth\u200bspaces and a BOM \ufeff",
    "form\x0cfeed and vertical\x0btab and del\x7f",
    'quotes "double" and \'single\', commas, and; semicolons',
]
_TITLES = [
    "Home | Example Gallery", "Photos of the week", "Untitled", "Stock images — free download",
    "My blog: travel diary", "Recipes", "图片库", "Page 2 of 17",
]
LONG_CAPTION = ("A very long caption that repeats itself. " * 200)[:5000]


def _caption(i: int) -> tuple[str | None, str | None]:
    """(caption, title) for good image i: mostly plain English, with every odd kind present."""
    if i == 7:
        return LONG_CAPTION, None
    bucket = i % 10
    if bucket in (1, 4):
        return _UNICODE[(i // 10) % len(_UNICODE)], None
    if bucket == 2:
        return _HTML[(i // 10) % len(_HTML)], None
    if bucket == 3:
        return _CONTROL[(i // 10) % len(_CONTROL)], None
    if bucket == 8:
        # No alt text: empty string or None, with the page title standing in.
        return ("" if (i // 10) % 2 else None), _TITLES[(i // 10) % len(_TITLES)]
    caption = _PLAIN[(i * 7) % len(_PLAIN)]
    title = _TITLES[i % len(_TITLES)] if bucket == 5 else None
    return caption, title


def sample_cases(n_good: int = 240) -> list[SampleCase]:
    """All rows of the dry-run URL list, in a fixed shuffled order."""
    names = good_image_names(n_good)

    def name(k: int) -> str:
        return names[k % n_good]

    cases: list[SampleCase] = []
    for i, nm in enumerate(names):
        caption, title = _caption(i)
        cases.append(SampleCase(f"/img/{nm}", caption, title, "kept"))

    # Duplicates: the same URL on a second row with another caption, merged into one sample.
    for k in range(10):
        p = f"/img/{name(20 + 3 * k)}"
        cases.append(SampleCase(p, f"another caption for the same picture #{k}", None, "kept",
                                dup_of=p))
    # URLs that normalise to an existing one: fragment, upper-case scheme.
    for prefix, k, suffix, cap in [(BASE, 3, "#top", "same image, link with a #fragment"),
                                   (BASE_UPPER_SCHEME, 4, "", "same image, upper-case scheme"),
                                   (BASE_UPPER_SCHEME, 5, "#gallery", "upper-case scheme and a fragment")]:
        p = f"/img/{name(k)}"
        cases.append(SampleCase(p, cap, None, "kept", raw_url=prefix + p + suffix, dup_of=p))

    # Planted copies under their own URLs (phase 1 keeps them; phase-2 dedup finds them).
    for kind, twin, original in twin_names(n_good):
        cases.append(SampleCase(f"/img/{twin}", f"the same picture again ({kind} copy of {original})", None,
                                "kept", twin_of=f"/img/{original}"))

    def add(path: str, expect: str, caption: str = "a picture", title: str | None = None) -> None:
        cases.append(SampleCase(path, caption, title, expect))

    for i in range(10):
        add(f"/status/404?i={i}", "http_404")
    add("/img/does-not-exist.jpg", "http_404")
    for i in range(3):
        add(f"/status/500?i={i}", "http_500")
    for i in range(3):
        add(f"/flaky/k{i}/2/{name(40 + i)}", "kept", "flaky host, recovers on retry")
    for i in range(2):
        add(f"/ratelimit/k{i}/{name(50 + i)}", "kept", "rate limited once")
    for i in range(3):
        add(f"/slow/30/{name(60 + i)}?i={i}", "timeout", "never arrives in time")
    for i, directive in enumerate(["noai", "noai", "noimageai", "noimageai", "noindex"]):
        add(f"/optout/{directive}/{name(70 + i)}", f"robots_{directive}", "opted out")
    for k in range(5):
        add(f"/img/corrupt-{k}.jpg", "decode_error", "corrupt file")
    for i in range(3):
        add(f"/html?i={i}", "not_image", "a web page")
    for i in range(2):
        add(f"/fakejpeg?i={i}", "not_image", "HTML sent as image/jpeg")
    for i in range(2):
        add(f"/big/3000000?i={i}", "too_large", "3 MB body with Content-Length")
    add("/bigchunked/3000000", "too_large", "3 MB chunked body")
    add("/img/bomb.png", "too_many_pixels", "decompression bomb header")
    for i in range(2):
        add(f"/redirect/2/{name(80 + i)}", "kept", "two redirects")
    for i in range(2):
        add(f"/redirect/10/{name(90 + i)}?i={i}", "too_many_redirects", "ten redirects")
    for k in range(3):
        add(f"/img/small-{k}.jpg", "too_small", "a thumbnail")
    for k in range(2):
        add(f"/img/wide-{k}.jpg", "aspect_ratio", "a banner")
    add("/empty", "empty_body", "nothing")

    for raw, expect in [("", "missing_url"),
                        ("ftp://example.invalid/a.jpg", "unsupported_scheme"),
                        ("not a url", "unsupported_scheme"),
                        ("javascript:alert(1)", "unsupported_scheme"),
                        ("http://", "invalid_url")]:
        cases.append(SampleCase("", "bad url row", None, expect, raw_url=raw))
    cases.append(SampleCase("", "no url at all", None, "missing_url", raw_url=None))

    random.Random(1234).shuffle(cases)
    return cases


def expected_counts(cases: list[SampleCase]) -> dict[str, int]:
    """Rows per expected outcome, counting rows that merge into another (dup_of) once."""
    return dict(Counter(c.expect for c in cases if c.dup_of is None))


def write_url_list(cases: list[SampleCase], base_url: str, out_path: str, fmt: str = "csv") -> str:
    """Writes columns url, caption, title, expect as csv (None -> empty field), parquet or jsonl."""
    rows = [{"url": c.url(base_url), "caption": c.caption, "title": c.title, "expect": c.expect}
            for c in cases]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    columns = ["url", "caption", "title", "expect"]
    if fmt == "csv":
        with open(out_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, quoting=csv.QUOTE_MINIMAL)
            writer.writeheader()
            writer.writerows(rows)  # csv writes None as an empty field
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: pa.array([r[k] for r in rows], pa.string()) for k in columns})
        pq.write_table(table, out_path)
    elif fmt == "jsonl":
        with open(out_path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"fmt must be csv, parquet or jsonl, got {fmt!r}")
    return out_path


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def images_dir(work_dir: str) -> str:
    return os.path.join(work_dir, IMAGES_SUBDIR)


def build_dryrun_sample(work_dir: str, base_url: str, n_good: int = 240, fmt: str = "csv") -> str:
    """Generates work_dir/images once (marker file) and writes work_dir/urls.<fmt>; returns its path."""
    img_dir = images_dir(work_dir)
    marker = os.path.join(img_dir, MARKER)
    stamp = f"n_good={n_good} seed=0 twins={len(twin_names(n_good))}\n"
    if not (os.path.exists(marker) and _read(marker) == stamp):
        generate_images(img_dir, n_good=n_good, seed=0)
        with open(marker, "w", encoding="utf-8") as f:
            f.write(stamp)
    return write_url_list(sample_cases(n_good), base_url,
                          os.path.join(work_dir, f"urls.{fmt}"), fmt=fmt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.samples.data", description="Generate the dry-run sample images.")
    parser.add_argument("out_dir")
    parser.add_argument("--n-good", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", default=None,
                        help="also write OUT_DIR/urls.csv against this (loopback) server URL")
    args = parser.parse_args(argv)
    generate_images(args.out_dir, n_good=args.n_good, seed=args.seed)
    if args.base_url:
        write_url_list(sample_cases(args.n_good), args.base_url, os.path.join(args.out_dir, "urls.csv"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
