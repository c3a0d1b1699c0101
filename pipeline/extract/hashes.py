"""Content hashes of one image, computed in the decode threads: `sha256` of the bytes as fetched (exact copies)
and `phash`, imagehash's 64-bit DCT perceptual hash of the decoded upright pixels (near copies).

`phash` is `imagehash.phash` itself (greyscale, 32x32 Lanczos, DCT, the 8x8 lowest frequencies against their
median), so a user can recompute it with the library from the file. It is taken before the resize to the model's
input, from the image as decode_image holds it: upright (EXIF applied), alpha composited on the background, and
for large JPEGs draft-decoded at reduced scale, which can move a bit or two (docs/analyse.md has the figures).
Its cost is mostly Pillow's Lanczos pass over the whole greyscale image: about half a decode (docs/performance.md).
"""

from __future__ import annotations

import hashlib

from PIL import Image

def bytes_sha256(data: bytes) -> str:
    """Hex digest of the bytes (hashlib releases the GIL on large buffers: the decode threads run in parallel)."""
    return hashlib.sha256(data).hexdigest()


def perceptual_hash(image: Image.Image) -> str:
    """16 hex digits, as `str(imagehash.phash(image))`."""
    import imagehash

    return str(imagehash.phash(image))
