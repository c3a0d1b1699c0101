"""Decode image bytes into RGB uint8 pixels at a target size, or a recorded error.

Stateless and thread-safe: bytes in, one :class:`DecodedImage` out. Two phases:

- Decode (reads the bytes): ``Image.open``, the pixel limit, draft, the decoder itself
  (``load``), EXIF, transpose and colour conversion. Pillow raises many exception types
  on bad or hostile data here, so every failure in this phase comes back as
  ``DecodedImage(error="...")`` with a specific reason, and the caller writes an error row.
- Resize (stretch, crop or pad): works on the decoded in-memory RGB image with sizes
  featurize computed, so an exception there is a bug in featurize, not a bad image: it
  propagates.

Invalid arguments (an unknown resize mode, a malformed ``target_size``) raise ``ValueError``.

Decisions (the "why" behind the behaviour):

- Formats are sniffed from the bytes by Pillow, never from a file name, and only the
  :data:`ALLOWED_FORMATS` plugins are tried, so the EPS plugin (Ghostscript) and other
  exotic parsers never run. A refused format is named from its magic bytes ("format EPS
  not allowed"), using prefix checks only.
- Decompression-bomb limit: ``width * height`` from the header is checked against
  ``max_pixels`` before any pixel is decoded. ``max_pixels=None`` means Pillow's current
  ``Image.MAX_IMAGE_PIXELS``. Pillow's own check still runs inside ``Image.open``: above
  2x its global limit it raises, between 1x and 2x it emits a ``DecompressionBombWarning``.
  We neither touch ``Image.MAX_IMAGE_PIXELS`` nor the warnings filters (both are process
  globals, and ``warnings.catch_warnings`` is not thread-safe); instead the result never
  depends on them: our own check turns the 1x-2x band into an error row, and when the
  filters make the warning an exception it becomes the same error row. Consequently
  ``max_pixels`` can tighten the limit per call but cannot loosen Pillow's process-wide one.
- Truncated data is an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off).
- EXIF orientation is applied with the same transpose table as
  ``ImageOps.exif_transpose`` (not the function itself: it also rewrites EXIF/XMP
  metadata and copies images that need no transpose). ``width``/``height`` are the
  original size after orientation, even when draft decoding shrank the pixels.
- Animated files (GIF, APNG, WebP, MPO, multi-page TIFF) give their first frame.
- Colour conversion and the resize modes live in :mod:`pipeline.extract.pixels`.
- Draft (JPEG/MPO only, on by default): when the source is at least 2x the size the
  image must be scaled to in both dimensions, libjpeg decodes at a reduced DCT scale
  (1/2, 1/4, 1/8) that still covers that size. Much faster for camera-size JPEGs, but
  the pixels differ slightly from a full decode.
- Error rows have ``width``/``height`` None; a bomb's size is in its error text.
- ``perceptual_hash=True`` adds the image's ``phash`` (see :mod:`pipeline.extract.hashes`), taken from the
  upright RGB picture (from the resized pixels when the ``stretch`` resize scaled the whole picture down); like
  the resize it works on decoded pixels, so its failure is a bug.
- Memory: images above :data:`LARGE_IMAGE_PIXELS` decode one at a time per process (a process-wide
  lock), so decode threads do not multiply the conversion's peak of about 10 bytes a pixel.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.contract import DEFAULT_DRAFT_MARGIN, RESIZE_MODES
from pipeline.extract.hashes import perceptual_hash as phash_of
from pipeline.extract.pixels import RESIZERS, scaled_source_size, to_rgb

# Order Image.open tries them in: most common first. MPO (multi-picture camera JPEGs)
# has no opener of its own; Pillow's JPEG opener returns it.
_FORMATS_IN_OPEN_ORDER = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "AVIF", "PPM")
ALLOWED_FORMATS = frozenset(_FORMATS_IN_OPEN_ORDER)

# Pillow's default Image.MAX_IMAGE_PIXELS, as a literal so that a process that disabled
# Pillow's limit before importing us still gets one.
DEFAULT_MAX_PIXELS = 89_478_485

_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})

# Images above this many pixels (after draft) decode one at a time per process: an actor decodes in several
# threads, and each image near the pixel limit holds 0.5-1 GB while it is converted, so a few at once would
# multiply the actor's peak memory. Smaller ones (camera JPEGs after draft, usual PNGs) decode in parallel.
LARGE_IMAGE_PIXELS = 4096 * 4096
_LARGE_IMAGE_LOCK = threading.Lock()

# Formats Pillow cannot open at all (so has no prefix check for), named for the error.
_UNSUPPORTED_SIGNATURES = (
    (lambda prefix: prefix.startswith(b"%PDF-"), "PDF"),
    (lambda prefix: prefix[4:8] == b"ftyp"
        and prefix[8:12] in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"), "HEIC"),
)

# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATIONS_SWAPPING_AXES = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112

_BOMB_MESSAGE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


@dataclass(frozen=True)
class DecodedImage:
    """One image's outcome: pixels and original size, or an error reason (never both)."""

    pixels: np.ndarray | None  # (height, width, 3) uint8 at the target size; None on error
    width: int | None  # original width after EXIF orientation; None on error
    height: int | None  # original height after EXIF orientation; None on error
    error: str | None  # None when ok; else a specific, human-readable reason
    phash: str | None = None  # 16 hex digits when asked for (perceptual_hash=True) and ok


class _RejectedImage(Exception):
    """A refusal whose message is already the final, human-readable reason."""


@dataclass(frozen=True)
class DecodedSource:
    """The decode phase's outcome: the upright RGB image (maybe draft-reduced) and its original size, or an error.
    Valid inside `open_decoded` only (the image is closed, and the large-image turn given back, on leaving it)."""

    rgb: Image.Image | None
    original_size: tuple[int, int] | None  # (width, height) after EXIF orientation
    error: str | None
    draftable: bool = False  # a format decode_image drafts (JPEG): a one-target decode may be at a reduced scale

    def resized(self, target_size: tuple[int, int], resize: str = "stretch",
                background: tuple[int, int, int] = (255, 255, 255), perceptual_hash: bool = False) -> DecodedImage:
        """The image at `target_size` (height, width) by `resize` (pipeline/extract/pixels.py), with the picture's
        phash when asked (hashes.py: from these pixels where a `stretch` scaled the whole picture down, else from
        the decoded picture). Outside the error-row boundary on purpose (see the module docstring): it works on
        pixels already decoded."""
        if self.error is not None:
            return _failed(self.error)
        _check_target(target_size, resize, background)
        target_size, background = (int(target_size[0]), int(target_size[1])), tuple(background)
        pixels = RESIZERS[resize](self.rgb, self.original_size, target_size, background)
        phash = phash_of(self.rgb, pixels if resize == "stretch" else None) if perceptual_hash else None
        return DecodedImage(np.asarray(pixels), self.original_size[0], self.original_size[1], None, phash)


def decode_image(
    data: bytes,
    target_size: tuple[int, int],
    resize: str = "stretch",
    background: tuple[int, int, int] = (255, 255, 255),
    draft_margin: int = DEFAULT_DRAFT_MARGIN,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    perceptual_hash: bool = False,
) -> DecodedImage:
    """Decode ``data`` to RGB uint8 of shape ``target_size`` (height, width).

    Never raises for bad bytes: every failure to decode them is returned as ``DecodedImage.error``.
    Raises ValueError for invalid arguments, and lets an exception from the resize step propagate
    (it works on pixels already decoded, so it is a bug in featurize, not a bad image).
    """
    _check_target(target_size, resize, background)
    with open_decoded(data, [(target_size, resize, draft_margin)], background, max_pixels) as source:
        return source.resized(target_size, resize, background, perceptual_hash)


@contextlib.contextmanager
def open_decoded(
    data: bytes,
    draft_targets: list[tuple[tuple[int, int], str, int]],
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Iterator[DecodedSource]:
    """The decode phase once, for every (target_size, resize, draft_margin) that will be resized from it: a JPEG
    drafts to the smallest scale that still covers each target by its margin (no draft when any margin is 0), so
    one target gives exactly what decode_image always gave. Yields a DecodedSource (an error one for bad bytes)."""
    _check_arguments(data, background, max_pixels)
    for target_size, resize, _ in draft_targets:
        _check_target(target_size, resize, background)
    if len(data) == 0:
        yield DecodedSource(None, None, "empty file (0 bytes)")
        return
    background = tuple(background)
    targets = [((int(size[0]), int(size[1])), resize, margin) for size, resize, margin in draft_targets]
    pixel_limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    formats = _available_allowed_formats()
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        yield DecodedSource(None, None, _explain_unidentified(bytes(data[:16]), data, formats))
        return
    except Exception as error:  # noqa: BLE001 - every Pillow failure becomes an error row
        yield DecodedSource(None, None, _describe_error(error, None, pixel_limit))
        return
    # The large-image turn, once taken, is held until the resizes are done: the decoded image lives until then.
    with image, contextlib.ExitStack() as large_image_turn:
        try:
            rgb, original_size = _decode_upright_rgb(image, targets, background, pixel_limit, large_image_turn)
        except Exception as error:  # noqa: BLE001 - the decode phase reads the bytes: its failures are the image's
            source = DecodedSource(None, None, _describe_error(error, image.format, pixel_limit))
        else:
            source = DecodedSource(rgb, original_size, None, image.format in _DRAFT_FORMATS)
        yield source


def _decode_upright_rgb(
    image: Image.Image,
    targets: list[tuple[tuple[int, int], str, int]],
    background: tuple[int, int, int],
    pixel_limit: int | None,
    large_image_turn: contextlib.ExitStack,
) -> tuple[Image.Image, tuple[int, int]]:
    """The decode phase: (upright RGB pixels, maybe draft-reduced; original upright (width, height))."""
    raw_width, raw_height = image.size  # header size: read before draft shrinks it
    _check_pixel_limit(raw_width, raw_height, pixel_limit)
    if all(margin > 0 for _, _, margin in targets) and image.format in _DRAFT_FORMATS:
        _draft_for_targets(image, targets)
    large_image_turn.enter_context(_turn_for_large_images(image.size))
    image.load()
    orientation = _exif_orientation(image)
    if orientation in _ORIENTATIONS_SWAPPING_AXES:
        original_size = (raw_height, raw_width)
    else:
        original_size = (raw_width, raw_height)
    upright = image.transpose(_UPRIGHT_TRANSPOSE[orientation]) if orientation in _UPRIGHT_TRANSPOSE else image
    return to_rgb(upright, background), original_size


@contextlib.contextmanager
def _turn_for_large_images(size: tuple[int, int]):
    if size[0] * size[1] <= LARGE_IMAGE_PIXELS:
        yield
        return
    with _LARGE_IMAGE_LOCK:
        yield


def _failed(reason: str) -> DecodedImage:
    return DecodedImage(pixels=None, width=None, height=None, error=reason)


# --- arguments -------------------------------------------------------------------------


def _check_arguments(data, background, max_pixels) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}; pass the file's raw bytes")
    _check_background(background)
    if max_pixels is not None and not (_is_int(max_pixels) and max_pixels > 0):
        raise ValueError(f"max_pixels={max_pixels!r} is invalid; pass a positive int, or None for Pillow's limit")


def _check_target(target_size, resize, background) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize={resize!r} is not a resize mode; use one of {RESIZE_MODES}")
    if not (_is_int_sequence(target_size, 2) and all(side > 0 for side in target_size)):
        raise ValueError(
            f"target_size={target_size!r} is invalid; pass (height, width) as two positive ints"
        )
    _check_background(background)


def _check_background(background) -> None:
    if not (_is_int_sequence(background, 3) and all(0 <= value <= 255 for value in background)):
        raise ValueError(f"background={background!r} is invalid; pass (red, green, blue) ints in 0..255")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_int_sequence(value, length: int) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == length and all(_is_int(item) for item in value)


# --- identification and errors ---------------------------------------------------------


def _available_allowed_formats() -> tuple[str, ...]:
    # Image.open raises KeyError for a format whose plugin is missing (e.g. a Pillow
    # built without AVIF), so pass only registered ones. init() is a no-op after the first call.
    Image.init()
    return tuple(name for name in _FORMATS_IN_OPEN_ORDER if name in Image.OPEN)


def _explain_unidentified(prefix: bytes, data: bytes, formats: tuple[str, ...]) -> str:
    for name in formats:
        factory, accept = Image.OPEN[name]
        verdict = _prefix_verdict(accept, prefix)
        if isinstance(verdict, str):  # the plugin says why it cannot read this variant
            return f"unsupported {name} file: {verdict}"
        if verdict:  # an allowed format's magic bytes, but its header parser refused it
            return f"corrupt {name} header: {_header_error(factory, data)}"
    refused = _sniff_refused_format(prefix, formats)
    if refused is not None:
        return f"format {refused} not allowed (allowed: {', '.join(sorted(ALLOWED_FORMATS))})"
    return "not an image (unidentified format)"


def _sniff_refused_format(prefix: bytes, allowed: tuple[str, ...]) -> str | None:
    """Name a non-allowed format from magic bytes only; never runs its plugin's parser."""
    for matches, name in _UNSUPPORTED_SIGNATURES:
        if matches(prefix):
            return name
    for name, (_, accept) in Image.OPEN.items():
        # Formats without a prefix check would match anything; skip them.
        if name not in allowed and accept is not None and _prefix_verdict(accept, prefix) is True:
            return name
    return None


def _prefix_verdict(accept, prefix: bytes) -> bool | str:
    if accept is None:
        return False
    try:
        verdict = accept(prefix)
    except Exception:  # noqa: BLE001 - some prefix checks unpack past a short prefix: no match
        return False
    return verdict if isinstance(verdict, str) else bool(verdict)


def _header_error(factory, data: bytes) -> str:
    # Image.open swallows the parser's reason; rerun the (allowed) parser to recover it.
    try:
        factory(io.BytesIO(data), "").close()
    except Exception as error:  # noqa: BLE001 - we want the message of whatever it raised
        return str(error) or type(error).__name__
    return "header could not be parsed"


def _describe_error(error: Exception, format_name: str | None, pixel_limit: int | None) -> str:
    if isinstance(error, _RejectedImage):
        return str(error)
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return _describe_bomb(str(error), pixel_limit)
    message = str(error) or type(error).__name__
    if isinstance(error, EOFError) or "truncated" in message.lower():
        return f"truncated image: {message}"
    if isinstance(error, MemoryError):
        return f"out of memory: {message}"
    subject = f"corrupt {format_name} image" if format_name else "corrupt image"
    if isinstance(error, (OSError, SyntaxError)):  # Pillow's usual "bad data" signals
        return f"{subject}: {message}"
    return f"{subject} ({type(error).__name__}): {message}"


def _describe_bomb(pillow_message: str, pixel_limit: int | None) -> str:
    # Pillow refused in Image.open, before our own check could run. Word it like ours,
    # naming our limit when the image exceeds it (Pillow's hard limit is 2x its global).
    match = _BOMB_MESSAGE.search(pillow_message)
    if match is None:
        return f"decompression bomb: {pillow_message}"
    num_pixels, pillow_limit = int(match[1]), int(match[2])
    exceeded = pixel_limit if pixel_limit is not None and num_pixels > pixel_limit else pillow_limit
    return _bomb_reason(num_pixels, exceeded)


def _bomb_reason(num_pixels: int, limit: int) -> str:
    return f"decompression bomb: {num_pixels} pixels exceeds limit {limit}"


def _check_pixel_limit(width: int, height: int, pixel_limit: int | None) -> None:
    num_pixels = width * height
    if pixel_limit is not None and num_pixels > pixel_limit:
        raise _RejectedImage(_bomb_reason(num_pixels, pixel_limit))


# --- orientation and draft -------------------------------------------------------------


def _exif_orientation(image: Image.Image) -> int:
    orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    return orientation if _is_int(orientation) else 1  # a corrupt tag means "as stored"


def _draft_for_targets(image: Image.Image, targets: list[tuple[tuple[int, int], str, int]]) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while the result stays >= margin x what each resize needs.

    DCT-domain downscaling changes pixels versus a full decode; keeping the decoded image at least
    `margin` times the target lets the antialiased resize do the final reduction, so features stay
    within cosine 0.9994 of a full decode at margin 4 (measured on photos with the dog MobileNetV2),
    while a 4000x3000 JPEG decodes 2-4x faster. With several targets (one decode feeding several models)
    the scale covers the largest request of them all. Must run before load(); EXIF lives in the header.
    """
    swaps_axes = _exif_orientation(image) in _ORIENTATIONS_SWAPPING_AXES
    width, height = image.size
    upright_size = (height, width) if swaps_axes else (width, height)
    requested = (0, 0)
    for target_size, resize, margin in targets:
        needed_width, needed_height = scaled_source_size(upright_size, target_size, resize)
        if swaps_axes:
            needed_width, needed_height = needed_height, needed_width
        requested = (max(requested[0], margin * needed_width), max(requested[1], margin * needed_height))
    if width >= 2 * requested[0] and height >= 2 * requested[1]:
        # Pillow picks the largest scale whose result is still >= the requested size.
        image.draft("RGB", requested)
