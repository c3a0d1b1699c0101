"""Content hashes of one image, computed in the decode threads: `sha256` of the bytes as fetched (exact copies)
and `phash`, the 64-bit DCT perceptual hash of the whole upright picture (near copies).

`phash` is `imagehash.phash` (greyscale, 32x32 Lanczos, DCT, the 8x8 lowest frequencies against their median), the
library's hash bit for bit on the same 32x32 image (tests/extract/test_content_hashes.py), of the picture as
decode_image holds it: upright (EXIF applied), alpha composited on the background, for large JPEGs draft-decoded
at reduced scale. Three things keep it cheap (on a 2-core CPU actor every tenth of a millisecond an image is about
1% of throughput, docs/performance.md):
- it is taken from the model's input where that input is the whole picture scaled down (the `stretch` resize, the
  default: those pixels are already paid for);
- the Lanczos pass starts from a box reduction that keeps PHASH_REDUCING_GAP pixels a hash pixel (Pillow's
  `reducing_gap`);
- the DCT's 8x8 lowest frequencies are two small matrix products in one call, not the library's full transforms
  and its bit-by-bit hex formatting: decode threads share one interpreter lock, and each Python step an image
  costs a hand-over of it.
Against the library's phash of the file: within 4 bits, mean 0.2 bits at a 224 stretch and 0.5 from the decoded
picture, over 300 varied photos and scans (docs/analyse.md).
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image


def bytes_sha256(data: bytes) -> str:
    """Hex digest of the bytes (hashlib releases the GIL on large buffers: the decode threads run in parallel)."""
    return hashlib.sha256(data).hexdigest()


PHASH_SIDE = 32  # imagehash.phash's Lanczos target, whose DCT gives the 8x8 lowest frequencies
PHASH_BITS_SIDE = 8
PHASH_REDUCING_GAP = 3.5  # box-reduce first while 3.5 pixels a hash pixel remain: within 4 bits of the full pass
# Rows 0..7 of the unnormalised DCT-II that imagehash applies (scipy.fftpack.dct): 2 cos(pi k (2n + 1) / 2N)
_DCT_ROWS = 2 * np.cos(np.pi * np.arange(PHASH_BITS_SIDE)[:, None] * (2 * np.arange(PHASH_SIDE)[None, :] + 1)
                       / (2 * PHASH_SIDE))


def perceptual_hash(decoded: Image.Image, stretched: Image.Image | None = None) -> str:
    """16 hex digits, as `str(imagehash.phash(picture))`. `stretched`: the whole picture resized to a model's input,
    hashed instead of `decoded` when it is a scaled-down copy with at least PHASH_REDUCING_GAP pixels a hash pixel
    (one scaled up from a small source would add the resize's blur to the hash, and a small source is cheap)."""
    picture = decoded
    if stretched is not None and PHASH_REDUCING_GAP * PHASH_SIDE <= min(stretched.size) and (
            stretched.width <= decoded.width and stretched.height <= decoded.height):
        picture = stretched
    small = picture.convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS,
                                        reducing_gap=PHASH_REDUCING_GAP)
    return dct_hash(small)


def dct_hash(small: Image.Image) -> str:
    """imagehash.phash's last steps on its 32x32 greyscale image: the 8x8 lowest DCT frequencies against their
    median (of 64: the mean of the middle two), row by row, as 16 hex digits."""
    pixels = np.frombuffer(small.tobytes(), dtype=np.uint8).reshape(PHASH_SIDE, PHASH_SIDE).astype(np.float64)
    lowest = (_DCT_ROWS @ pixels @ _DCT_ROWS.T).ravel()
    ordered = np.sort(lowest)
    middle = len(ordered) // 2
    return np.packbits(lowest > (ordered[middle - 1] + ordered[middle]) / 2).tobytes().hex()
