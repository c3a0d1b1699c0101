"""Content hashes of one image, computed in the decode threads: `sha256` of the bytes as fetched (exact copies)
and `phash`, imagehash's 64-bit DCT perceptual hash of the decoded upright pixels (near copies).

`phash` is `imagehash.phash` (greyscale, 32x32 Lanczos, DCT, the 8x8 lowest frequencies against their median) of
the image as decode_image holds it: upright (EXIF applied), alpha composited on the background, for large JPEGs
draft-decoded at reduced scale, and box-reduced first (perceptual_hash), so it is within a few bits of the
library's on the file (docs/analyse.md has the figures). Its cost is mostly the Lanczos pass (docs/performance.md).
"""

from __future__ import annotations

import hashlib

from PIL import Image

def bytes_sha256(data: bytes) -> str:
    """Hex digest of the bytes (hashlib releases the GIL on large buffers: the decode threads run in parallel)."""
    return hashlib.sha256(data).hexdigest()


PHASH_SIDE = 32  # imagehash.phash's Lanczos target, whose DCT gives the 8x8 lowest frequencies
PHASH_MARGIN = 4  # a box reduction first keeps at least this many source pixels a target pixel


def perceptual_hash(image: Image.Image) -> str:
    """16 hex digits, as `str(imagehash.phash(image))`, after a box reduction by the largest whole factor that
    keeps the shorter side at least PHASH_MARGIN x 32 pixels. The Lanczos pass over the whole image is most of
    the hash's cost; reduced first it costs about half as much, and the hash stays within 4 bits of the
    library's on the full image (mean 0.4 bits over 300 varied photos, tests/extract/test_content_hashes.py)."""
    import imagehash

    grey = image.convert("L")
    factor = min(grey.size) // (PHASH_MARGIN * PHASH_SIDE)
    if factor > 1:
        grey = grey.reduce(factor)
    return str(imagehash.phash(grey))
