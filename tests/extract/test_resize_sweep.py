"""Resize geometry over a sweep of image sizes: every mode gives an ok row of the target shape for any source
size, and the pixels equal a reference computed with exact fractions and plain Pillow.

Float ratios once put the crop box an ulp outside the image (244x367 at 160x160 came back as "corrupt JPEG
image (ValueError): box offset can't be negative"), so the sizes are swept rather than picked: the geometry
for every size up to 1000x1000, and about 2,200 real PNG and JPEG decodes.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from pipeline.contract import RESIZE_MODES
from pipeline.extract.decode import decode_image
from pipeline.extract.pixels import _crop_box, _fitted_size
from tests import images

TARGET_SIZES = [(160, 160), (224, 224), (299, 299), (224, 160)]  # (height, width), as decode_image takes them
MAX_SIDE = 1000
# libjpeg's draft scales: the decoded side is ceil(side / denominator); 1 is a full decode.
DRAFT_DENOMINATORS = (1, 2, 4, 8)
# (width, height) that the float geometry refused at 160x160, from the issue.
REPORTED_SIZES = [(244, 367), (481, 319), (368, 245)]
EXTREME_SIZES = [(1, 1), (1, 2), (2, 1), (1, 577), (577, 1), (1, MAX_SIDE), (MAX_SIDE, 1), (2, MAX_SIDE),
                 (MAX_SIDE, 2), (MAX_SIDE, MAX_SIDE)]
BACKGROUND = (12, 34, 56)
JPEG_DRAFT_MARGIN = 1  # the smallest margin, so that sources from 2x the target up are draft-decoded


# --- references: exact fractions, then the same Pillow calls a user would write -------------------------------


def reference_scale(source_size: tuple[int, int], target_size: tuple[int, int], resize: str) -> Fraction:
    """The scale that makes the source cover (center_crop) or fit inside (pad) the target."""
    (source_width, source_height), (target_height, target_width) = source_size, target_size
    scales = (Fraction(target_width, source_width), Fraction(target_height, source_height))
    return max(scales) if resize == "center_crop" else min(scales)


def reference_crop_box(source_size, target_size, decoded_size) -> tuple[float, ...]:
    source_width, source_height = source_size
    target_height, target_width = target_size
    scale = reference_scale(source_size, target_size, "center_crop")
    crop_width, crop_height = target_width / scale, target_height / scale
    left, top = (source_width - crop_width) / 2, (source_height - crop_height) / 2
    to_decoded_x = Fraction(decoded_size[0], source_width)
    to_decoded_y = Fraction(decoded_size[1], source_height)
    return (float(left * to_decoded_x), float(top * to_decoded_y),
            float((left + crop_width) * to_decoded_x), float((top + crop_height) * to_decoded_y))


def reference_fitted_size(source_size, target_size) -> tuple[int, int]:
    """Rounded to the nearest pixel (round() of a Fraction takes ties to even), at least one pixel."""
    scale = reference_scale(source_size, target_size, "pad")
    return tuple(max(1, round(side * scale)) for side in source_size)


def reference_draft_request(source_size, target_size, resize) -> tuple[int, int] | None:
    """The size draft decoding must still cover, or None when the source is under 2x that (no draft)."""
    if resize == "stretch":
        needed = (target_size[1], target_size[0])
    else:
        scale = reference_scale(source_size, target_size, resize)
        needed = tuple(math.ceil(side * scale) for side in source_size)
    requested = tuple(JPEG_DRAFT_MARGIN * side for side in needed)
    covered = all(side >= 2 * request for side, request in zip(source_size, requested))
    return requested if covered else None


def reference_pixels(source: Image.Image, source_size, target_size, resize) -> np.ndarray:
    target_height, target_width = target_size
    if resize == "stretch":
        return np.asarray(source.resize((target_width, target_height), Image.BILINEAR))
    if resize == "center_crop":
        box = reference_crop_box(source_size, target_size, source.size)
        return np.asarray(source.resize((target_width, target_height), Image.BILINEAR, box=box))
    fitted_width, fitted_height = reference_fitted_size(source_size, target_size)
    canvas = np.empty((target_height, target_width, 3), np.uint8)
    canvas[...] = BACKGROUND
    top, left = (target_height - fitted_height) // 2, (target_width - fitted_width) // 2
    canvas[top : top + fitted_height, left : left + fitted_width] = source.resize(
        (fitted_width, fitted_height), Image.BILINEAR
    )
    return canvas


def reference_jpeg_source(data: bytes, source_size, target_size, resize) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    requested = reference_draft_request(source_size, target_size, resize)
    if requested is not None:
        image.draft("RGB", requested)
    return image.convert("RGB")


# --- geometry: every size up to 1000x1000 ---------------------------------------------------------------------
# The geometry functions use integer operators only, so they run elementwise on numpy arrays; with sides of at
# most 1000 every intermediate stays below 2**53, where numpy's float division rounds exactly like Python's.


@pytest.fixture(scope="module")
def every_size() -> tuple[np.ndarray, np.ndarray]:
    widths, heights = np.meshgrid(np.arange(1, MAX_SIDE + 1), np.arange(1, MAX_SIDE + 1), indexing="ij")
    return widths.ravel(), heights.ravel()


def sampled_sizes(count: int, seed: int, log_uniform: bool = False) -> list[tuple[int, int]]:
    """(width, height) pairs in 1..MAX_SIDE; log-uniform ones are mostly small: many shapes, little decoding."""
    rng = np.random.default_rng(seed)
    if log_uniform:
        sides = np.exp(rng.uniform(0, np.log(MAX_SIDE + 1), (count, 2))).astype(np.int64)
    else:
        sides = rng.integers(1, MAX_SIDE + 1, (count, 2))
    return [tuple(size) for size in np.clip(sides, 1, MAX_SIDE).tolist()]


@pytest.mark.parametrize("target_size", TARGET_SIZES, ids=str)
def test_crop_box_lies_within_the_decoded_image_for_every_size(every_size, target_size):
    widths, heights = every_size
    target_height, target_width = target_size
    for denominator in DRAFT_DENOMINATORS:
        decoded_widths, decoded_heights = -(-widths // denominator), -(-heights // denominator)
        left, top, right, bottom = _crop_box((widths, heights), target_size, (decoded_widths, decoded_heights))
        assert (left >= 0).all() and (top >= 0).all()
        assert (right <= decoded_widths).all() and (bottom <= decoded_heights).all()
        assert (left < right).all() and (top < bottom).all()
        # centred, the whole of one side kept, and the target's aspect ratio in source pixels
        assert np.allclose(left + right, decoded_widths, rtol=0, atol=1e-9)
        assert np.allclose(top + bottom, decoded_heights, rtol=0, atol=1e-9)
        assert ((right - left == decoded_widths) | (bottom - top == decoded_heights)).all()
        crop_width = (right - left) * widths / decoded_widths
        crop_height = (bottom - top) * heights / decoded_heights
        assert np.allclose(crop_width * target_height, crop_height * target_width, rtol=1e-12, atol=0)


@pytest.mark.parametrize("target_size", TARGET_SIZES, ids=str)
def test_fitted_size_is_within_the_target_for_every_size(every_size, target_size):
    widths, heights = every_size
    target_height, target_width = target_size
    fitted_widths, fitted_heights = _fitted_size((widths, heights), target_size)
    assert ((1 <= fitted_widths) & (fitted_widths <= target_width)).all()
    assert ((1 <= fitted_heights) & (fitted_heights <= target_height)).all()
    assert ((fitted_widths == target_width) | (fitted_heights == target_height)).all()
    scales = np.minimum(target_width / widths, target_height / heights)
    assert ((np.abs(fitted_heights - heights * scales) <= 0.5 + 1e-9) | (fitted_heights == 1)).all()
    assert ((np.abs(fitted_widths - widths * scales) <= 0.5 + 1e-9) | (fitted_widths == 1)).all()


@pytest.mark.parametrize("target_size", TARGET_SIZES, ids=str)
def test_geometry_equals_exact_fractions(target_size):
    """Exact, not close: the same rational rounded once, on Python ints and on numpy arrays alike."""
    sizes = REPORTED_SIZES + EXTREME_SIZES + sampled_sizes(300, seed=sum(target_size))
    for width, height in sizes:
        for denominator in DRAFT_DENOMINATORS:
            decoded = (-(-width // denominator), -(-height // denominator))
            expected = reference_crop_box((width, height), target_size, decoded)
            assert _crop_box((width, height), target_size, decoded) == expected, (width, height, decoded)
        assert _fitted_size((width, height), target_size) == reference_fitted_size((width, height), target_size)
    widths, heights = (np.array(sides) for sides in zip(*sizes))
    box_columns = _crop_box((widths, heights), target_size, (widths, heights))
    assert list(zip(*(column.tolist() for column in box_columns))) == [
        _crop_box(size, target_size, size) for size in sizes
    ]


# --- real decodes: PNG and JPEG bytes, about 2,200 sizes ------------------------------------------------------


def stored_png(pixels: np.ndarray) -> bytes:
    """An RGB PNG with no row filter and stored deflate blocks: Pillow's encoder filters adaptively even at
    compress_level=0, which took most of this test's time; the decoder reads these like any other PNG."""
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no filter, no interlace
    chunks = [(b"IHDR", header), (b"IDAT", zlib.compress(rows.tobytes(), 0)), (b"IEND", b"")]
    return images.png_from_chunks(chunks)


def decode_cases() -> list[tuple[str, tuple[int, int], tuple[int, int], str]]:
    """(format, (width, height), target_size, resize): the reported and extreme sizes in every combination; the
    diagonal from 100x100 to 700x700 and random sizes, each in one combination, taken in turn (pixels cost time;
    the geometry of every size is checked above)."""
    combinations = [(format, target_size, resize) for format in ("PNG", "JPEG")
                    for target_size in TARGET_SIZES for resize in RESIZE_MODES]
    cases = [(format, size, target_size, resize)
             for size in REPORTED_SIZES + EXTREME_SIZES for format, target_size, resize in combinations]
    diagonal = [(side, side) for side in range(100, 701)]
    random_sizes = sampled_sizes(300, seed=12) + sampled_sizes(1000, seed=13, log_uniform=True)
    for index, size in enumerate(diagonal + random_sizes):
        format, target_size, resize = combinations[index % len(combinations)]
        cases.append((format, size, target_size, resize))
    return cases


def test_every_mode_decodes_swept_sizes_exactly_like_the_reference():
    """Tolerance 0: decode_image and the reference make the same Pillow calls (the same libjpeg draft scale, the
    same resize with the same box, since an exact fraction rounds to one float), so any difference is a bug."""
    photo = images.photo_like_array(MAX_SIDE, MAX_SIDE, seed=5)
    failures = []
    cases = decode_cases()
    for format, (width, height), target_size, resize in cases:
        source = Image.fromarray(photo[:height, :width])
        if format == "PNG":
            data, options = stored_png(photo[:height, :width]), {"draft_margin": 0}
        else:
            data, options = images.encode(source, "JPEG", quality=90), {"draft_margin": JPEG_DRAFT_MARGIN}
            source = reference_jpeg_source(data, (width, height), target_size, resize)
        result = decode_image(data, target_size, resize=resize, background=BACKGROUND, **options)
        case = (format, f"{width}x{height}", f"{target_size[1]}x{target_size[0]}", resize)
        if result.error is not None:
            failures.append((*case, result.error))
        elif result.pixels.shape != (*target_size, 3) or (result.width, result.height) != (width, height):
            failures.append((*case, f"shape {result.pixels.shape}, size {result.width}x{result.height}"))
        elif not np.array_equal(result.pixels, reference_pixels(source, (width, height), target_size, resize)):
            failures.append((*case, "pixels differ from the reference"))
    assert not failures, f"{len(failures)} of {len(cases)} decodes failed, e.g. {failures[:10]}"
