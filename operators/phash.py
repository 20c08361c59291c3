"""64-bit perceptual hash (pHash) of decoded pixels, as the ``imagehash`` library's ``phash``.

pHash (Zauner, "Implementation and Benchmarking of Perceptual Image Hash Functions", 2010;
reference: ``imagehash.phash`` with ``hash_size=8, highfreq_factor=4``): grayscale, resize to
32x32, 2-D DCT-II, keep the top-left 8x8 block of coefficients (the lowest frequencies), and set
bit ``(u, v)`` where the coefficient is above the **median of those 64 coefficients, DC
included** (imagehash computes its median over the whole 8x8 block; Zauner's text excludes DC,
we follow imagehash). The 64 bits are packed row-major with coefficient (0, 0) as the most
significant bit, so ``format(phash & (2**64 - 1), "016x")`` is imagehash's ``str(hash)``; the
column holds them as a signed int64 (two's complement).

Where we differ from imagehash, and why:

- The DCT is OpenCV's (``cv2.dct``, orthonormal), where imagehash uses scipy's unnormalised
  DCT-II. Both are the same transform up to a factor per coefficient: orthonormal row/column 0
  is ``1/sqrt(2)`` smaller relative to the others. The median comparison is not scale-free per
  coefficient, so row 0 and column 0 are multiplied back by ``sqrt(2)`` (DC by 2): the bits are
  exactly imagehash's for the same 32x32 input (tests/test_phash.py checks it against an explicit
  DCT-II formula).
- The 32x32 resize is OpenCV's ``INTER_AREA`` (a box filter when shrinking) where imagehash uses
  Pillow's antialiased Lanczos; the two differ by a few bits on busy images. ``INTER_AREA`` costs
  a fraction of the stage's decode and main resize (benchmark in tests/test_phash.py's
  ``test_phash_cost``, printed with ``-s``).
- Images with alpha are matted onto white first (what the image stage writes and what a viewer
  sees); imagehash's ``convert("L")`` drops alpha. Grayscale weights are ITU-R 601 (0.299, 0.587,
  0.114) in both.
"""

from __future__ import annotations

import numpy as np

HASH_BITS = 64
HASH_SIDE = 8
DCT_SIDE = 32
_MASK64 = (1 << 64) - 1
# Row/column 0 rescale from the orthonormal DCT to scipy's unnormalised DCT-II (relative factors).
_UNNORM = np.ones((HASH_SIDE, HASH_SIDE), np.float64)
_UNNORM[0, :] *= np.sqrt(2.0)
_UNNORM[:, 0] *= np.sqrt(2.0)


def gray32(pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels (BGR, BGRA or gray; uint8 or uint16) -> 32x32 float32 luminance: OpenCV's
    fixed-point BGR->gray on the integer pixels, then INTER_AREA in float (an 8-bit 32x32, as
    imagehash's, flips a few more near-median bits of re-encoded copies); alpha is matted onto
    white first."""
    import cv2

    img = pixels
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] == 4:  # matte onto white, as the image stage does before encoding
        top = float(np.iinfo(img.dtype).max) if img.dtype.kind in "ui" else 1.0
        alpha = img[..., 3:4].astype(np.float32) / top
        img = np.rint(alpha * img[..., :3] + (1.0 - alpha) * top).astype(img.dtype)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return cv2.resize(img.astype(np.float32), (DCT_SIDE, DCT_SIDE), interpolation=cv2.INTER_AREA)


def hash_from_gray32(gray: np.ndarray) -> int:
    """The pHash bits of a 32x32 grayscale array, as a signed int64 value."""
    import cv2

    coeffs = cv2.dct(np.ascontiguousarray(gray, dtype=np.float32)).astype(np.float64)
    low = (coeffs[:HASH_SIDE, :HASH_SIDE] * _UNNORM).ravel()
    s = np.sort(low)  # the median of 64 values: mean of the 32nd and 33rd (np.median, 50x slower here)
    bits = low > (s[31] + s[32]) / 2
    return to_int64(int.from_bytes(np.packbits(bits).tobytes(), "big"))


def phash(pixels: np.ndarray) -> int:
    """64-bit pHash of decoded pixels (as ``operators.images.decode`` gives them), a signed int64."""
    return hash_from_gray32(gray32(pixels))


def to_int64(bits: int) -> int:
    """An unsigned 64-bit value as the signed int64 holding the same bits."""
    bits &= _MASK64
    return bits - (1 << 64) if bits >> 63 else bits


def to_hex(value: int) -> str:
    """imagehash's string form of a hash held as an int64."""
    return format(int(value) & _MASK64, "016x")


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Hamming distance between int64 (or uint64) hashes, elementwise (popcount of the XOR)."""
    x = np.bitwise_xor(np.asarray(a).astype(np.int64).view(np.uint64), np.asarray(b).astype(np.int64).view(np.uint64))
    return popcount64(x)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has ``bitwise_count``; a SWAR fallback otherwise)."""
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)
