"""Pixel work on a decoded image: colour and bit-depth conversion to RGB, and the resize modes.

Works on images Pillow has already opened and loaded (see :mod:`pipeline.extract.decode`), with sizes
featurize computed, so nothing here reads untrusted bytes.

- Colour: alpha (RGBA, LA, PA, palette/RGB/L transparency) is composited over
  ``background`` at full resolution, before resizing. 16-bit integer images are scaled
  by their bit range (65535 -> 255, 32768 -> 128). Mode ``I`` (32-bit) is treated as
  16-bit when its values fit 0..65535 (Pillow's usual use of it); otherwise its min..max
  is stretched to 0..255. Float (``F``) images: values within [0, 1] map linearly to
  0..255; anything else is min..max stretched; NaN/inf become 0. ICC profiles are
  ignored, exactly like the plain ``convert("RGB")`` reference. Other modes (1, L, P,
  CMYK incl. Adobe-inverted JPEG, YCbCr, LAB, HSV) use Pillow's ``convert("RGB")``.
- Memory: 16-bit, float and alpha conversions run in bands of rows (no whole-image float64/int64
  temporaries), so any mode peaks at about 10 bytes a pixel.
- Resize ("stretch", the default) is ``Image.resize((w, h), BILINEAR, reducing_gap=None)``
  on the RGB image, so with ``draft_margin=0`` an opaque 8-bit image gives exactly
  ``Image.open(f).convert("RGB").resize((w, h), Image.BILINEAR)``. "center_crop" scales
  the image to cover the target and takes the centre (one resize with a source box, as
  ``ImageOps.fit`` does). "pad" fits the image inside the target, keeping the aspect
  ratio, centred on ``background``. Sizes and boxes come from integer arithmetic,
  rounded once: the crop box always lies within the decoded image (also after draft);
  the padded image is rounded to the nearest pixel (ties to even), 1..target on each
  side. (Float ratios were an ulp off and put the box at -1e-14 for sizes as plain as
  244x367.)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# --- colour ----------------------------------------------------------------------------


# Conversions run band by band (rows of about this many pixels), so their float64/int64 temporaries stay a few
# MB instead of 8-24 bytes a pixel of the whole image; every step is per pixel, so results are identical.
_BAND_PIXELS = 1 << 20


def _row_bands(height: int, width: int):
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield slice(top, min(height, top + rows))


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """`image` (any mode, loaded) as 8-bit RGB, transparency composited over `background`."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode == "I" or image.mode.startswith("I;16"):
        return _grey_to_rgb(_integer_to_uint8(image))
    if image.mode == "F":
        return _grey_to_rgb(_float_to_uint8(image))
    if image.has_transparency_data:
        return _composite_over(image, background)
    return image.convert("RGB")


def _composite_over(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """`image` (any mode with transparency) over an opaque background, converted to RGBA a band at a time."""
    width, height = image.size
    result = Image.new("RGB", image.size)
    for band in _row_bands(height, width):
        box = (0, band.start, width, band.stop)
        rgba = image.crop(box).convert("RGBA")  # crop keeps the palette and the transparency info
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        result.paste(Image.alpha_composite(canvas, rgba).convert("RGB"), box[:2])
    return result


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(grey).convert("RGB")


def _bands_of(image: Image.Image):
    """(row slice, that band's samples as an array) for a single-channel image, without a whole-image copy."""
    width, height = image.size
    for band in _row_bands(height, width):
        yield band, np.asarray(image.crop((0, band.start, width, band.stop)))


def _integer_to_uint8(image: Image.Image) -> np.ndarray:
    low, high = _finite_range(image)
    grey = np.empty((image.height, image.width), np.uint8)
    if low < 0 or high > 65535:  # not 16-bit data: the bit range is unknown, use the data's
        for band, values in _bands_of(image):
            grey[band] = _stretch_to_uint8(values, low, high)
        return grey
    # 16-bit range: 65535 -> 255, 32768 -> 128 (rounded), never clipped at 255.
    for band, values in _bands_of(image):
        grey[band] = (values.astype(np.int64) * 255 + 32767) // 65535
    return grey


def _float_to_uint8(image: Image.Image) -> np.ndarray:
    low, high = _finite_range(image)
    grey = np.zeros((image.height, image.width), np.uint8)
    if low is None:  # nothing finite
        return grey
    unit_range = low >= 0.0 and high <= 1.0
    for band, values in _bands_of(image):
        values = values.astype(np.float64)
        finite = np.isfinite(values)
        values[~finite] = low
        if unit_range:
            band_grey = np.rint(values * 255.0).astype(np.uint8)
        else:
            band_grey = _stretch_to_uint8(values, low, high)
        band_grey[~finite] = 0  # NaN/inf carry no intensity
        grey[band] = band_grey
    return grey


def _finite_range(image: Image.Image):
    """(min, max) of the finite samples, as ints for integer images; (None, None) when none is finite."""
    low = high = None
    for _, values in _bands_of(image):
        finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if finite.size:
            band_low, band_high = finite.min().item(), finite.max().item()
            low = band_low if low is None else min(low, band_low)
            high = band_high if high is None else max(high, band_high)
    return low, high


def _stretch_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high == low:  # a constant image has no range to stretch
        return np.zeros(values.shape, np.uint8)
    return np.rint((values.astype(np.float64) - low) * (255.0 / (high - low))).astype(np.uint8)


# --- geometry --------------------------------------------------------------------------
# Each resizer gets the RGB image (possibly draft-reduced), the original upright size,
# the target (height, width) and the background; geometry is computed on the original
# size so the output layout never depends on draft.
#
# Sizes and boxes are exact integer arithmetic with one rounding at the end. Float ratios
# are not: 160 / (160 / 244) is 244.00000000000003, which put the crop box of a 244x367
# image at -1.4e-14, a box Pillow refuses. The helpers use integer operators only, so they
# are exact for ints of any size and also run elementwise on numpy integer arrays (the
# tests check every size up to 1000x1000 at once).


def scaled_source_size(source_size: tuple[int, int], target_size: tuple[int, int], resize: str) -> tuple[int, int]:
    """(width, height) the whole source is scaled to by ``resize``, rounded up (what draft decoding must cover)."""
    if resize == "stretch":
        target_height, target_width = target_size
        return target_width, target_height
    width_scale, height_scale = _fit_scales(source_size, target_size)
    if resize == "center_crop":
        scale = _larger(width_scale, height_scale)
    else:
        scale = _smaller(width_scale, height_scale)
    source_width, source_height = source_size
    return _divide_rounding_up(scale, source_height), _divide_rounding_up(scale, source_width)


def _fit_scales(source_size: tuple[int, int], target_size: tuple[int, int]) -> tuple[int, int]:
    """The scales that fit the source's width and its height to the target, as integers.

    Both are multiplied by source width x height: target_width / source_width becomes
    target_width x source_height, and likewise for the height.
    """
    source_width, source_height = source_size
    target_height, target_width = target_size
    return target_width * source_height, target_height * source_width


def _crop_box(source_size: tuple[int, int], target_size: tuple[int, int], decoded_size: tuple[int, int]):
    """The centred crop with the target's aspect ratio, as (left, top, right, bottom) in decoded pixels.

    Scaled to cover the target, the source keeps width_scale / scale of its width and
    height_scale / scale of its height (one of them 1). Each coordinate is one exact
    fraction rounded once, so 0 <= left <= right <= decoded width (likewise for the height).
    """
    width_scale, height_scale = _fit_scales(source_size, target_size)
    scale = _larger(width_scale, height_scale)
    decoded_width, decoded_height = decoded_size
    return (
        decoded_width * (scale - width_scale) / (2 * scale),
        decoded_height * (scale - height_scale) / (2 * scale),
        decoded_width * (scale + width_scale) / (2 * scale),
        decoded_height * (scale + height_scale) / (2 * scale),
    )


def _fitted_size(source_size: tuple[int, int], target_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the whole source scaled to fit inside the target: rounded, >= 1, <= target."""
    width_scale, height_scale = _fit_scales(source_size, target_size)
    scale = _smaller(width_scale, height_scale)
    source_width, source_height = source_size
    return (
        _larger(1, _divide_rounding(scale, source_height)),
        _larger(1, _divide_rounding(scale, source_width)),
    )


def _smaller(first, second):
    return (first + second - abs(first - second)) // 2


def _larger(first, second):
    return (first + second + abs(first - second)) // 2


def _divide_rounding_up(numerator, denominator):
    return -(-numerator // denominator)


def _divide_rounding(numerator, denominator):
    """To the nearest integer, ties to even like Python's round(), which pad used on floats before."""
    doubled_sum, doubled_denominator = 2 * numerator + denominator, 2 * denominator
    quotient = doubled_sum // doubled_denominator
    is_tie = doubled_sum % doubled_denominator == 0
    return quotient - is_tie * (quotient % 2)


def _resize_stretch(image, original_size, target_size, background) -> Image.Image:
    target_height, target_width = target_size
    return image.resize((target_width, target_height), Image.Resampling.BILINEAR, reducing_gap=None)


def _resize_center_crop(image, original_size, target_size, background) -> Image.Image:
    target_height, target_width = target_size
    box = _crop_box(original_size, target_size, image.size)
    return image.resize((target_width, target_height), Image.Resampling.BILINEAR, box=box, reducing_gap=None)


def _resize_pad(image, original_size, target_size, background) -> Image.Image:
    target_height, target_width = target_size
    fitted_width, fitted_height = _fitted_size(original_size, target_size)
    fitted = image.resize((fitted_width, fitted_height), Image.Resampling.BILINEAR, reducing_gap=None)
    canvas = Image.new("RGB", (target_width, target_height), background)
    canvas.paste(fitted, ((target_width - fitted_width) // 2, (target_height - fitted_height) // 2))
    return canvas


# resize mode -> resizer(rgb image, original upright (width, height), target (height, width), background)
RESIZERS = {
    "stretch": _resize_stretch,
    "center_crop": _resize_center_crop,
    "pad": _resize_pad,
}
