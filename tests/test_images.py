"""ImageProcessor on in-memory batches (no Ray): resize modes, formats, orientation, hostile files."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from operators.images import ImageConfig, ImageProcessor

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _batch(datas, status=None, reasons=None) -> pa.Table:
    n = len(datas)
    status = status or ["kept"] * n
    reasons = reasons or [None if s == "kept" else "http_404" for s in status]
    return pa.table({
        "sample_id": pa.array([f"id{i}" for i in range(n)], pa.string()),
        "status": pa.array(status, pa.string()),
        "drop_stage": pa.array([None if s == "kept" else "download" for s in status], pa.string()),
        "drop_reason": pa.array(reasons, pa.string()),
        "error_message": pa.array([None] * n, pa.string()),
        "image_bytes": pa.array(datas, pa.binary()),
    })


def _run(datas, **cfg) -> list[dict]:
    """Resize behaviour on small synthetic images: no size floor unless a test sets one."""
    return ImageProcessor({"min_image_size": 0, **cfg})(_batch(datas)).to_pylist()


def _one(data, **cfg) -> dict:
    return _run([data], **cfg)[0]


def _decoded(row) -> Image.Image:
    im = Image.open(io.BytesIO(row["image"]))
    im.load()
    return im


def _file(sample_dir, name) -> bytes:
    return (Path(sample_dir) / "images" / name).read_bytes()


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- resize modes ----------------------------------------------------------------------
@pytest.mark.parametrize("w,h", [(300, 120), (90, 200)])
@pytest.mark.parametrize("mode", ["border", "center_crop", "keep_ratio", "keep_ratio_largest", "no"])
def test_resize_modes(mode, w, h):
    row = _one(_encode(_rgb(w, h), "PNG"), image_size=64, resize_mode=mode)
    assert row["status"] == "kept", row["error_message"]
    out = _decoded(row)
    assert out.size == (row["width"], row["height"])
    assert (row["orig_width"], row["orig_height"]) == (w, h)
    ow, oh = out.size
    if mode in ("border", "center_crop"):
        assert (ow, oh) == (64, 64)
    elif mode == "keep_ratio":
        assert min(ow, oh) == 64
        assert abs(ow / oh - w / h) < 0.05
    elif mode == "keep_ratio_largest":
        assert max(ow, oh) == 64
        assert abs(ow / oh - w / h) < 0.05
    else:
        assert (ow, oh) == (w, h)


def test_border_pads_instead_of_cropping():
    # A wide black image: border letterboxes it (img2dataset pads with white), center_crop fills the square.
    im = Image.new("RGB", (300, 100), (0, 0, 0))
    data = _encode(im, "PNG")
    border = np.asarray(_decoded(_one(data, image_size=60, resize_mode="border")).convert("L"), np.float32)
    crop = np.asarray(_decoded(_one(data, image_size=60, resize_mode="center_crop")).convert("L"), np.float32)
    assert border[:5].mean() > 215 and border[-5:].mean() > 215 and border[28:32].mean() < 40
    assert crop.mean() < 40


def test_resize_only_if_bigger_keeps_small_images():
    data = _encode(_rgb(40, 30), "PNG")
    row = _one(data, image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=True)
    assert _decoded(row).size == (40, 30)
    row = _one(data, image_size=64, resize_mode="keep_ratio")
    assert _decoded(row).size == (85, 64)


def test_default_drops_tracking_pixels_and_icons():
    rows = ImageProcessor()(_batch([_encode(_rgb(1, 1), "GIF"), _encode(_rgb(32, 32), "PNG"),
                                    _encode(_rgb(63, 400), "PNG"), _encode(_rgb(64, 64), "PNG")])).to_pylist()
    assert [(r["status"], r["drop_reason"]) for r in rows] == [
        ("dropped", "too_small"), ("dropped", "too_small"), ("dropped", "too_small"), ("kept", None)]


# --- formats, hashes, sizes --------------------------------------------------------------
@pytest.mark.parametrize("fmt,quality,check", [
    ("jpg", 90, lambda b: b[:3] == JPEG_MAGIC),
    ("webp", 80, lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("png", 6, lambda b: b[:8] == PNG_MAGIC),
])
def test_encode_formats(sample_dir, fmt, quality, check):
    data = _file(sample_dir, "00001.jpg")
    row = _one(data, image_size=64, encode_format=fmt, encode_quality=quality)
    assert row["status"] == "kept"
    assert check(row["image"]), row["image"][:12]
    assert _decoded(row).size == (64, 64)


def test_sha256_sizes_and_source_format(sample_dir):
    names = ["00001.jpg", "00005.png", "00006.webp"]
    datas = [_file(sample_dir, n) for n in names]
    rows = _run(datas, image_size=64)
    for name, data, row in zip(names, datas, rows):
        assert row["status"] == "kept", (name, row["error_message"])
        assert row["sha256"] == hashlib.sha256(data).hexdigest()  # of the downloaded bytes
        with Image.open(io.BytesIO(data)) as src:
            assert (row["orig_width"], row["orig_height"]) == src.size
        assert (row["width"], row["height"]) == (64, 64)
    assert [r["image_format"] for r in rows] == ["jpeg", "png", "webp"]
    assert len({r["sha256"] for r in rows}) == 3


def test_image_bytes_column_is_dropped_and_columns_declared(sample_dir):
    out = ImageProcessor({"image_size": 32})(_batch([_file(sample_dir, "00001.jpg")]))
    assert "image_bytes" not in out.column_names
    assert set(ImageProcessor.writes) <= set(out.column_names)
    assert out.schema.field("image").type == pa.binary()
    assert out.schema.field("width").type == pa.int32()
    assert out.column("sample_id").to_pylist() == ["id0"]


def test_missing_input_column_is_an_error():
    with pytest.raises(KeyError, match="image_bytes"):
        ImageProcessor()(_batch([b"x"]).drop_columns(["image_bytes"]))


# --- orientation, modes, animated --------------------------------------------------------
def test_exif_orientation_applied(sample_dir):
    data = _file(sample_dir, "00013.jpg")
    with Image.open(io.BytesIO(data)) as src:
        stored = src.size
        assert src.getexif().get(0x0112) == 6  # what the generator wrote
        upright = ImageOps.exif_transpose(src).convert("RGB")
    assert stored[0] != stored[1]
    row = _one(data, image_size=64, resize_mode="no", encode_quality=95)
    assert row["status"] == "kept"
    out = _decoded(row)
    assert out.size == (stored[1], stored[0])  # width and height swapped
    assert (row["orig_width"], row["orig_height"]) == (stored[1], stored[0])
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(upright, np.int16)).mean()
    assert diff < 8


def test_exif_orientation_content():
    # Top half red, bottom half blue, stored with orientation 6 (rotate 90 CW to display):
    # upright, the red half is on the right.
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:20] = (255, 0, 0)
    arr[20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
    out = np.asarray(_decoded(_one(data, image_size=64, resize_mode="no", encode_format="png", encode_quality=1)))
    assert out.shape[:2] == (60, 40)
    assert out[:, 30:, 0].mean() > 200 and out[:, 30:, 2].mean() < 60  # right: red
    assert out[:, :10, 2].mean() > 200 and out[:, :10, 0].mean() < 60  # left: blue


def _png_with_exif_after_pixels(img: Image.Image, exif: Image.Exif) -> bytes:
    """A PNG whose eXIf chunk comes after IDAT (allowed by the spec): Pillow finds it only on load."""
    import struct
    import zlib

    png = _encode(img, "PNG")
    payload = exif.tobytes()
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload + struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + chunk + png[iend:]


@pytest.mark.parametrize("where", ["before_pixels", "after_pixels"])
def test_exif_orientation_png(where):
    # Orientation 6 on a PNG, the eXIf chunk before or after the pixel data: applied either way.
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:20] = (255, 0, 0)
    arr[20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    img = Image.fromarray(arr)
    data = _encode(img, "PNG", exif=exif) if where == "before_pixels" else _png_with_exif_after_pixels(img, exif)
    out = np.asarray(_decoded(_one(data, image_size=64, resize_mode="no", encode_format="png", encode_quality=1)))
    assert out.shape[:2] == (60, 40)
    assert out[:, 30:, 0].mean() > 200 and out[:, :10, 2].mean() > 200


def test_png_without_exif_is_not_rotated():
    arr = np.zeros((40, 60, 3), np.uint8)
    row = _one(_encode(Image.fromarray(arr), "PNG"), image_size=64, resize_mode="no", encode_format="png",
               encode_quality=1)
    assert (row["width"], row["height"]) == (60, 40)


def test_grayscale_rgba_gif_from_sample(sample_dir):
    names = ["00012.jpg", "00010.png", "00011.gif"]
    datas = [_file(sample_dir, n) for n in names]
    modes = []
    for d in datas:
        with Image.open(io.BytesIO(d)) as src:
            modes.append(src.mode)
    assert modes == ["L", "RGBA", "P"]  # the generator made what the test means to cover
    rows = _run(datas, image_size=64, resize_mode="border")
    for name, row in zip(names, rows):
        assert row["status"] == "kept", (name, row["error_message"])
        assert row["image"][:3] == JPEG_MAGIC
        assert _decoded(row).size == (64, 64)
    assert [r["image_format"] for r in rows] == ["jpeg", "png", "gif"]


def test_rgba_transparency_becomes_white():
    # Fully transparent black pixels around an opaque red centre: composited onto white.
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[16:48, 16:48] = (255, 0, 0, 255)
    data = _encode(Image.fromarray(arr, "RGBA"), "PNG")
    out = np.asarray(_decoded(_one(data, image_size=64, resize_mode="no", encode_format="png", encode_quality=1)))
    assert out.shape == (64, 64, 3)
    assert out[:8, :8].min() >= 250  # corner: white, not black
    assert tuple(out[32, 32]) == (255, 0, 0)


@pytest.mark.parametrize("make", [
    lambda: _encode(_rgb(80, 50).convert("CMYK"), "JPEG"),
    lambda: _encode(Image.fromarray((np.arange(4000).reshape(50, 80) * 16).astype(np.uint16)), "PNG"),
    lambda: _encode(_rgb(80, 50).convert("LA"), "PNG"),
    lambda: _encode(_rgb(80, 50).convert("P"), "PNG", transparency=0),
    lambda: _encode(_rgb(80, 50).convert("1"), "PNG"),
    lambda: _encode(_rgb(80, 50), "GIF", save_all=True, append_images=[_rgb(80, 50, seed=1)]),
    lambda: _encode(_rgb(80, 50).convert("RGBA"), "WEBP"),
    lambda: _encode(_rgb(80, 50), "TIFF"),
    lambda: _encode(_rgb(80, 50), "BMP"),
], ids=["cmyk-jpeg", "16bit-png", "la-png", "palette-transparency", "1bit-png", "animated-gif", "rgba-webp",
        "tiff", "bmp"])
def test_other_modes_and_containers(make):
    row = _one(make(), image_size=32, resize_mode="no", encode_format="png", encode_quality=1)
    assert row["status"] == "kept", row["error_message"]
    out = _decoded(row)
    assert out.size == (80, 50) and out.mode == "RGB"


# --- hostile inputs ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["corrupt-0.jpg", "corrupt-1.jpg", "corrupt-2.jpg", "corrupt-3.jpg",
                                  "corrupt-4.jpg"])
def test_corrupt_is_decode_error(sample_dir, name):
    data = _file(sample_dir, name)
    row = _one(data)
    assert (row["status"], row["drop_stage"], row["drop_reason"]) == ("failed", "image", "decode_error")
    assert row["error_message"]
    assert row["image"] is None and row["width"] is None
    assert row["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("data", [b"", b"<html><body>not an image</body></html>", b"\x89PNG\r\n\x1a\n"])
def test_non_images_are_decode_errors(data):
    row = _one(data)
    assert (row["status"], row["drop_reason"]) == ("failed", "decode_error")


def test_bomb_refused_from_header(sample_dir, monkeypatch):
    def no_decode(*_a, **_k):
        raise AssertionError("the bomb reached a decoder")

    monkeypatch.setattr("operators.images.decode", no_decode)
    monkeypatch.setattr("operators.images.pil_to_cv", no_decode)
    monkeypatch.setattr(Image.Image, "load", no_decode)
    data = _file(sample_dir, "bomb.png")
    assert len(data) < 1000  # header only: 30000 x 30000 declared
    row = _one(data)
    assert (row["status"], row["drop_stage"], row["drop_reason"]) == ("dropped", "image", "too_many_pixels")
    assert row["image"] is None


def test_max_pixels_from_config_without_decoding(monkeypatch):
    def no_decode(*_a, **_k):
        raise AssertionError("an over-size image reached a decoder")

    monkeypatch.setattr("operators.images.decode", no_decode)
    monkeypatch.setattr("operators.images.pil_to_cv", no_decode)
    data = _encode(_rgb(200, 100), "PNG")
    row = _one(data, max_pixels=19_999)
    assert (row["status"], row["drop_reason"]) == ("dropped", "too_many_pixels")
    assert "200x100" in row["error_message"]
    assert (row["orig_width"], row["orig_height"]) == (200, 100)


def test_small_and_wide(sample_dir):
    names = ["small-0.jpg", "wide-0.jpg", "wide-1.jpg", "00001.jpg"]
    rows = _run([_file(sample_dir, n) for n in names], image_size=64, min_image_size=32, max_aspect_ratio=5)
    assert [(r["status"], r["drop_stage"], r["drop_reason"]) for r in rows] == [
        ("dropped", "image", "too_small"), ("dropped", "image", "aspect_ratio"),
        ("dropped", "image", "aspect_ratio"), ("kept", None, None)]
    assert (rows[0]["orig_width"], rows[0]["orig_height"]) == (16, 16)
    assert all(r["image"] is None for r in rows[:3]) and rows[3]["image"] is not None
    # Without the limits the same files are kept.
    rows = _run([_file(sample_dir, n) for n in names], image_size=64)
    assert [r["status"] for r in rows] == ["kept"] * 4


def test_rows_already_dropped_pass_through(sample_dir, monkeypatch):
    good = _file(sample_dir, "00001.jpg")
    batch = _batch([good, good, None, _file(sample_dir, "corrupt-0.jpg")],
                   status=["kept", "dropped", "failed", "dropped"],
                   reasons=[None, "robots_noai", "http_404", "too_large"])
    seen = []
    real_one = ImageProcessor._one
    monkeypatch.setattr(ImageProcessor, "_one", lambda self, data: seen.append(data) or real_one(self, data))
    out = ImageProcessor({"image_size": 32})(batch).to_pylist()
    assert len(seen) == 1  # only the kept row is decoded
    assert out[0]["status"] == "kept" and out[0]["image"] is not None
    for row, reason in zip(out[1:], ["robots_noai", "http_404", "too_large"]):
        assert row["image"] is None and row["sha256"] is None and row["width"] is None
        assert row["drop_stage"] == "download" and row["drop_reason"] == reason
    assert [r["status"] for r in out] == ["kept", "dropped", "failed", "dropped"]


def test_kept_row_without_bytes_fails():
    row = ImageProcessor()(_batch([None])).to_pylist()[0]
    assert (row["status"], row["drop_stage"], row["drop_reason"]) == ("failed", "image", "no_bytes")


def test_one_bad_row_does_not_spoil_the_batch(sample_dir):
    names = ["00001.jpg", "corrupt-0.jpg", "bomb.png", "00002.jpg"]
    rows = _run([_file(sample_dir, n) for n in names], image_size=32)
    assert [r["status"] for r in rows] == ["kept", "failed", "dropped", "kept"]
    assert [r["sample_id"] for r in rows] == ["id0", "id1", "id2", "id3"]


def test_processor_resizes_one_image(sample_dir):
    cfg = ImageConfig(image_size=48, resize_mode="center_crop")
    out = ImageProcessor(cfg)(_batch([_file(sample_dir, "00001.jpg")])).to_pylist()
    assert (out[0]["width"], out[0]["height"]) == (48, 48)


# --- config validation ----------------------------------------------------------------------
@pytest.mark.parametrize("cfg,field", [
    ({"resize_mode": "stretch"}, "resize_mode"),
    ({"encode_format": "gif"}, "encode_format"),
    ({"encode_format": "png", "encode_quality": 50}, "encode_quality"),
    ({"encode_quality": 101}, "encode_quality"),
    ({"image_size": 0}, "image_size"),
    ({"min_image_size": -1}, "min_image_size"),
    ({"max_aspect_ratio": 0}, "max_aspect_ratio"),
    ({"max_pixels": 0}, "max_pixels"),
    ({"resize_modes": "border"}, "resize_modes"),
])
def test_bad_config_raises_value_error_naming_the_field(cfg, field):
    with pytest.raises(ValueError, match=field):
        ImageProcessor(cfg)


def test_png_quality_in_range_is_fine():
    assert ImageProcessor({"encode_format": "png", "encode_quality": 9}).config.encode_quality == 9


# --- parity with img2dataset's Resizer (same pixels, same bytes) ------------------------------
def _i2d_parity_inputs():
    import io as _io

    import numpy as _np
    from PIL import Image as _Image

    rng = _np.random.default_rng(7)
    out = []
    for (h, w, mode, fmt) in [(300, 200, "RGB", "JPEG"), (64, 90, "RGB", "JPEG"), (256, 256, "RGB", "PNG"),
                              (120, 333, "L", "JPEG"), (200, 150, "RGBA", "PNG"), (17, 400, "RGB", "PNG")]:
        arr = rng.integers(0, 255, (h, w, len(mode)) if mode != "L" else (h, w), dtype=_np.uint8)
        buf = _io.BytesIO()
        _Image.fromarray(arr, mode).save(buf, fmt)
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("mode", ["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"])
@pytest.mark.parametrize("only_if_bigger", [False, True])
def test_resize_matches_img2dataset_resizer(mode, only_if_bigger):
    import io as _io
    import os as _os

    _os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.resizer import Resizer

    from operators.images import ImageConfig, ImageProcessor, decode, resize_encode

    ref = Resizer(image_size=128, resize_mode=mode, resize_only_if_bigger=only_if_bigger, encode_quality=90)
    params = ImageProcessor(ImageConfig(image_size=128, encode_quality=90))._encode_params()
    for data in _i2d_parity_inputs():
        want, ww, wh, _, _, err = ref(_io.BytesIO(data))
        assert err is None
        got, gw, gh = resize_encode(decode(data), mode, 128, only_if_bigger, "jpg", params)
        assert (gw, gh) == (ww, wh)
        assert got == want, f"{mode} {only_if_bigger}: output differs from img2dataset's"


@pytest.mark.parametrize("make", [
    lambda: _rgb(40, 30),
    lambda: _rgb(40, 30).convert("L"),
    lambda: _rgb(40, 30).convert("RGBA"),
    lambda: _rgb(40, 30).convert("LA"),
    lambda: _rgb(40, 30).convert("P"),
    lambda: _rgb(40, 30).convert("CMYK"),
], ids=["rgb", "l", "rgba", "la", "p", "cmyk"])
def test_pil_pixels_equal_a_lossless_round_trip(make):
    """Images Pillow must decode (EXIF orientation, odd modes) go to OpenCV as pixels: exactly what
    saving them as PNG and decoding that with OpenCV gave, without the encode and decode."""
    from operators.images import decode, pil_to_cv

    im = make()
    ref = im if im.mode in ("RGB", "RGBA", "L", "LA") else im.convert("RGB")
    want = decode(_encode(ref, "PNG"))
    got = pil_to_cv(im)
    if ref.mode == "LA":  # OpenCV reads a gray+alpha PNG as BGRA
        assert got.shape == want.shape == (30, 40, 4)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_process_raw_equals_process(sample_dir):
    """The download actor hands bodies as a list (``process_raw``): same rows as the column form."""
    names = ["corrupt-0.jpg"] + sorted(p.name for p in (Path(sample_dir) / "images").iterdir()
                                       if p.suffix in (".jpg", ".png", ".gif", ".webp"))[:12]
    datas = [_file(sample_dir, n) for n in names] + [None]
    status = ["kept"] * (len(datas) - 2) + ["dropped", "kept"]
    batch = _batch(datas, status=status)
    proc = ImageProcessor({"image_size": 48})
    want = proc(batch)
    got = proc.process_raw(batch.drop_columns(["image_bytes"]), datas)
    assert got.equals(want)
    assert got.column("drop_reason").to_pylist()[-1] == "no_bytes"
    with pytest.raises(ValueError, match="bodies for"):
        proc.process_raw(batch.drop_columns(["image_bytes"]), datas[:-1])


# --- reduced JPEG decode (images.reduce_on_decode) ------------------------------------------
def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth content with edges and a little noise: a stand-in for a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / (37 + 7 * k) + y / (53 + 5 * k) + k) for k in range(3)], -1)
    base[(x // 97 + y // 89) % 3 == 0] *= 0.6
    base += rng.normal(0, 4, base.shape)
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("w,h,mode,gap,want", [
    (1024, 768, "border", 2.0, 2), (1023, 768, "border", 2.0, 1), (2048, 600, "border", 2.0, 4),
    (4096, 4096, "center_crop", 2.0, 8), (8192, 8192, "border", 2.0, 8), (4096, 700, "center_crop", 2.0, 1),
    (4096, 1400, "keep_ratio", 2.0, 2), (4096, 4096, "no", 2.0, 1), (4096, 4096, "border", None, 1),
    (600, 400, "border", 1.0, 2), (200, 100, "border", 1.0, 1),
])
def test_reduction_factor(w, h, mode, gap, want):
    from operators.images import reduction_factor

    cfg = ImageConfig(image_size=256, resize_mode=mode, reduce_on_decode=gap)
    assert reduction_factor(w, h, cfg) == want


@pytest.mark.parametrize("mode", ["border", "keep_ratio", "center_crop", "keep_ratio_largest"])
@pytest.mark.parametrize("gray", [False, True])
def test_reduced_decode_matches_full_decode(mode, gray):
    """A big JPEG decoded at reduced scale gives the same geometry and nearly the same pixels as
    img2dataset's full decode (the DCT reduction is itself an area-like low-pass filter)."""
    im = _photo(1601, 1203)
    if gray:
        im = im.convert("L")
    data = _encode(im, "JPEG", quality=92)
    full = _one(data, image_size=256, resize_mode=mode, reduce_on_decode=None)
    fast = _one(data, image_size=256, resize_mode=mode, reduce_on_decode=2.0)
    assert full["status"] == fast["status"] == "kept"
    assert (fast["width"], fast["height"]) == (full["width"], full["height"])
    assert (fast["orig_width"], fast["orig_height"]) == (1601, 1203)
    a = np.asarray(_decoded(full), np.float32)
    b = np.asarray(_decoded(fast), np.float32)
    assert a.shape == b.shape and _decoded(fast).mode == ("L" if gray else "RGB")
    mse = float(np.mean((a - b) ** 2))
    psnr = 10 * np.log10(255 ** 2 / max(mse, 1e-9))
    assert psnr > 32, psnr
    assert fast["image"] != full["image"]  # the reduced path did run


def test_reduced_decode_only_for_jpeg():
    """PNG and WebP have no DCT scaling: they decode in full, output identical to reduce_on_decode null."""
    for fmt in ("PNG", "WEBP"):
        data = _encode(_photo(1200, 900), fmt)
        assert (_one(data, image_size=128, reduce_on_decode=2.0)["image"]
                == _one(data, image_size=128, reduce_on_decode=None)["image"])
