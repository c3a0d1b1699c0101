"""pipeline.decode: what a user checks — shapes, colours, orientation, geometry, and that
every bad file becomes a specific error instead of an exception."""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image, ImageOps

from pipeline.extract import decode, pixels
from pipeline.extract.decode import (
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    RESIZE_MODES,
    DecodedImage,
    decode_image,
)
from pipeline.extract.pixels import to_rgb
from tests import images

WHITE, BLACK, RED = (255, 255, 255), (0, 0, 0), (255, 0, 0)


def reference_stretch(data: bytes, height: int, width: int) -> np.ndarray:
    """What a user writes by hand with plain Pillow."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((width, height), Image.BILINEAR))


def mean_abs_diff(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.int16) - second.astype(np.int16)).mean())


def assert_decoded(result: DecodedImage, height: int, width: int) -> np.ndarray:
    assert result.error is None, result.error
    assert result.error is None
    assert result.pixels.shape == (height, width, 3)
    assert result.pixels.dtype == np.uint8
    return result.pixels


# --- colour: every mode to the right RGB ------------------------------------------------

# (case id, bytes, decode options, expected colour of every pixel, tolerance)
SOLID_COLOUR_CASES = [
    ("rgb png", images.solid_bytes("RGB", RED), {}, RED, 0),
    ("rgb jpeg", images.solid_bytes("RGB", RED, "JPEG", quality=95), {}, RED, 3),
    ("rgb webp lossless", images.solid_bytes("RGB", RED, "WEBP", lossless=True), {}, RED, 0),
    ("rgb bmp", images.solid_bytes("RGB", RED, "BMP"), {}, RED, 0),
    ("rgb tiff", images.solid_bytes("RGB", RED, "TIFF"), {}, RED, 0),
    ("rgb gif", images.solid_bytes("RGB", RED, "GIF"), {}, RED, 0),
    ("rgba opaque red stays red", images.solid_bytes("RGBA", (255, 0, 0, 255)), {}, RED, 0),
    ("rgba transparent over white", images.solid_bytes("RGBA", (255, 0, 0, 0)), {}, WHITE, 0),
    ("rgba transparent over blue", images.solid_bytes("RGBA", (255, 0, 0, 0)), {"background": (0, 0, 255)},
     (0, 0, 255), 0),
    ("rgba half red over white", images.solid_bytes("RGBA", (255, 0, 0, 128)), {}, (255, 127, 127), 1),
    ("rgba half red over black", images.solid_bytes("RGBA", (255, 0, 0, 128)), {"background": BLACK}, (128, 0, 0), 1),
    ("rgba webp transparent", images.solid_bytes("RGBA", (0, 255, 0, 0), "WEBP", lossless=True), {}, WHITE, 0),
    ("la opaque", images.solid_bytes("LA", (100, 255)), {}, (100, 100, 100), 0),
    ("la transparent", images.solid_bytes("LA", (100, 0)), {"background": (10, 20, 30)}, (10, 20, 30), 0),
    ("l grey", images.solid_bytes("L", 77), {}, (77, 77, 77), 0),
    ("1-bit white", images.solid_bytes("1", 1), {}, WHITE, 0),
    ("1-bit black", images.solid_bytes("1", 0), {}, BLACK, 0),
    ("cmyk jpeg cyan", images.cmyk_jpeg((255, 0, 0, 0)), {}, (0, 255, 255), 4),
    ("cmyk jpeg black key", images.cmyk_jpeg((0, 0, 0, 255)), {}, BLACK, 4),
    ("cmyk tiff yellow", images.solid_bytes("CMYK", (0, 0, 255, 0), "TIFF"), {}, (255, 255, 0), 0),
    ("ycbcr tiff", images.converted_tiff("YCbCr", (200, 30, 60)), {}, (200, 30, 60), 3),
    ("lab tiff", images.converted_tiff("LAB", (200, 30, 60)), {}, (200, 30, 60), 6),
    ("16-bit max", images.grey16_png([[65535] * 4]), {}, WHITE, 0),
    ("16-bit big-endian tiff", images.grey16_big_endian_tiff([[65535] * 4]), {}, WHITE, 0),
    ("float 1.0", images.float_tiff([[1.0] * 4]), {}, WHITE, 0),
]


@pytest.mark.parametrize(
    ("data", "options", "expected", "tolerance"),
    [case[1:] for case in SOLID_COLOUR_CASES],
    ids=[case[0] for case in SOLID_COLOUR_CASES],
)
def test_every_mode_gives_rgb_uint8_of_the_right_colour(data, options, expected, tolerance):
    pixels = assert_decoded(decode_image(data, (5, 7), **options), 5, 7)
    difference = np.abs(pixels.astype(np.int16) - np.array(expected, np.int16))
    assert difference.max() <= tolerance, (pixels[0, 0], expected)


# (case id, bytes of a one-row image, expected grey value per column). Decoded at the
# source size, so no resampling blends neighbouring values.
GREY_LEVEL_CASES = [
    ("16-bit scales by bit range, not clipped", images.grey16_png([0, 257, 32768, 65535]), [0, 1, 128, 255]),
    ("16-bit big-endian", images.grey16_big_endian_tiff([0, 257, 32768, 65535]), [0, 1, 128, 255]),
    ("32-bit int holding 16-bit data", images.int32_tiff([0, 32768, 40000, 65535]), [0, 128, 156, 255]),
    ("32-bit int beyond 16 bits: min..max", images.int32_tiff([-100, 0, 50_000, 100_000]), [0, 0, 128, 255]),
    ("float in 0..1", images.float_tiff([0.0, 0.25, 0.5, 1.0]), [0, 64, 128, 255]),
    ("float beyond 0..1: min..max", images.float_tiff([-1.0, 0.0, 1.0, 3.0]), [0, 64, 128, 255]),
    ("float with nan and inf", images.float_tiff([0.0, np.nan, np.inf, 1.0]), [0, 0, 0, 255]),
]


@pytest.mark.parametrize(
    ("data", "expected"), [case[1:] for case in GREY_LEVEL_CASES], ids=[case[0] for case in GREY_LEVEL_CASES]
)
def test_high_bit_depth_grey_levels(data, expected):
    pixels = assert_decoded(decode_image(data, (1, 4)), 1, 4)
    assert pixels[0, :, 0].tolist() == expected
    assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grey stays grey


@pytest.mark.parametrize(
    ("transparent_index", "expected"),
    [(None, [RED, (0, 255, 0), (0, 0, 255), (128, 128, 128)]), (1, [RED, WHITE, (0, 0, 255), (128, 128, 128)])],
    ids=["palette", "palette with transparent index"],
)
def test_palette_colours_and_transparency(transparent_index, expected):
    pixels = assert_decoded(decode_image(images.palette_png(transparent_index), (1, 4)), 1, 4)
    assert [tuple(pixel) for pixel in pixels[0].tolist()] == expected


def test_palette_with_alpha_channel_is_composited():
    data = images.palette_alpha_tiff([(0, 255), (1, 0), (2, 255)])
    pixels = assert_decoded(decode_image(data, (1, 3), background=BLACK), 1, 3)
    assert [tuple(pixel) for pixel in pixels[0].tolist()] == [RED, BLACK, (0, 0, 255)]


def test_one_bit_pattern():
    pixels = assert_decoded(decode_image(images.one_bit_png(((1, 0), (0, 1))), (2, 2)), 2, 2)
    assert pixels[..., 0].tolist() == [[255, 0], [0, 255]]


def test_hsv_converts_through_pillow():
    # No file format stores HSV, so check the colour step on an in-memory image.
    rgb = to_rgb(Image.new("HSV", (2, 2), (0, 255, 255)), WHITE)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == RED


# --- EXIF orientation -------------------------------------------------------------------


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pre_rotated_copy(orientation, format):
    height, width = 48, 80  # upright size; stored transposed for orientations 5..8
    oriented, reference = images.exif_oriented(orientation, format, height, width)
    result = decode_image(oriented, (height, width))
    pixels = assert_decoded(result, height, width)
    expected = assert_decoded(decode_image(reference, (height, width)), height, width)
    assert (result.width, result.height) == (width, height)
    tolerance = 3.0 if format == "JPEG" else 0.0
    assert mean_abs_diff(pixels, expected) <= tolerance
    if orientation != 1:  # guard against a vacuous pass: ignoring the tag would differ a lot
        stored = np.asarray(Image.open(io.BytesIO(oriented)).convert("RGB").resize((width, height), Image.BILINEAR))
        assert mean_abs_diff(stored, expected) > 10


# --- broken, refused and hostile files --------------------------------------------------

# (case id, bytes, decode options, the start of the expected error)
ALLOWED_LIST = ", ".join(sorted(ALLOWED_FORMATS))
BROKEN_FILE_CASES = [
    ("empty", b"", {}, "empty file (0 bytes)"),
    ("html page named .jpg", images.HTML_ERROR_PAGE, {}, "not an image (unidentified format)"),
    ("plain text", b"just some text\n" * 10, {}, "not an image (unidentified format)"),
    ("random bytes", np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes(), {}, "not an image"),
    ("eps", images.eps_bytes(), {}, f"format EPS not allowed (allowed: {ALLOWED_LIST})"),
    ("pdf", images.pdf_bytes(), {}, "format PDF not allowed"),
    ("psd named .png", images.psd_header_bytes(), {}, "format PSD not allowed"),
    ("jpeg cut in half", images.truncated(images.photo_bytes("JPEG")), {}, "truncated image: image file is truncated"),
    ("png cut in half", images.truncated(images.photo_bytes("PNG")), {}, "truncated image: image file is truncated"),
    ("gif cut in half", images.truncated(images.photo_bytes("GIF")), {}, "truncated image"),
    ("png corrupt pixel data", images.png_with_corrupt_pixel_data(), {}, "corrupt PNG image:"),
    (
        "png bad header crc",
        images.png_with_bad_header_crc(),
        {},
        "corrupt PNG header: broken PNG file (bad header checksum",
    ),
    (
        "bomb between 1x and 2x of the limit",
        images.png_declaring_size(10_000, 10_000),
        {},
        "decompression bomb: 100000000 pixels exceeds limit 89478485",
    ),
    (
        "bomb above 2x of the limit",
        images.png_declaring_size(10_000, 20_000),
        {},
        "decompression bomb: 200000000 pixels exceeds limit 89478485",
    ),
    (
        "ordinary image over a per-call limit",
        images.photo_bytes("PNG", 100, 100),
        {"max_pixels": 5_000},
        "decompression bomb: 10000 pixels exceeds limit 5000",
    ),
]


@pytest.mark.parametrize("warning_action", ["error", "ignore"])
@pytest.mark.parametrize(
    ("data", "options", "expected_error"),
    [case[1:] for case in BROKEN_FILE_CASES],
    ids=[case[0] for case in BROKEN_FILE_CASES],
)
def test_bad_files_give_a_specific_error_under_any_warnings_filter(data, options, expected_error, warning_action):
    with warnings.catch_warnings():
        warnings.simplefilter(warning_action)
        result = decode_image(data, (32, 32), **options)
    assert result.error is not None and result.error.startswith(expected_error), result.error
    assert result.error is not None
    assert (result.pixels, result.width, result.height) == (None, None, None)


def test_refused_formats_never_reach_the_eps_plugin_or_ghostscript(monkeypatch):
    calls = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: calls.append("open"))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append("gs"))
    for data in (images.eps_bytes(), b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", images.pdf_bytes()):
        assert "not allowed" in decode_image(data, (8, 8)).error
    assert calls == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_check_does_not_change_pillow_globals():
    decode_image(images.png_declaring_size(10_000, 10_000), (8, 8), max_pixels=1_000)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS == 89_478_485


def test_concurrent_decodes_are_independent():
    # Threads as the actor uses them: bombs, per-call limits and good images interleaved.
    bomb = images.png_declaring_size(10_000, 10_000)
    photo = images.photo_bytes("JPEG")
    jobs = [(bomb, DEFAULT_MAX_PIXELS), (photo, DEFAULT_MAX_PIXELS), (photo, 100)] * 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda job: decode_image(job[0], (16, 16), max_pixels=job[1]), jobs))
    for (data, max_pixels), result in zip(jobs, results):
        assert (result.error is None) == (data is photo and max_pixels == DEFAULT_MAX_PIXELS), result.error


# --- resize geometry --------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        images.photo_bytes("JPEG", quality=90),
        images.photo_bytes("PNG"),
        images.photo_bytes("WEBP"),
        images.photo_bytes("BMP"),
        images.photo_bytes("TIFF"),
        images.photo_bytes("GIF"),
        images.encode(images.photo_like_image().convert("L"), "PNG"),
        images.encode(images.photo_like_image().convert("CMYK"), "JPEG"),
    ],
    ids=["jpeg", "png", "webp", "bmp", "tiff", "gif", "grey png", "cmyk jpeg"],
)
@pytest.mark.parametrize("target_size", [(224, 224), (37, 50), (300, 400), (96, 128)])
def test_stretch_without_draft_equals_plain_pillow(data, target_size):
    height, width = target_size
    pixels = assert_decoded(decode_image(data, target_size, draft_margin=0), height, width)
    assert np.array_equal(pixels, reference_stretch(data, height, width))


@pytest.fixture(scope="module")
def camera_jpeg() -> bytes:
    return images.photo_bytes("JPEG", 3000, 4000, quality=90)


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_draft_on_camera_size_jpeg_is_close_to_full_decode(camera_jpeg, resize):
    drafted = decode_image(camera_jpeg, (224, 160), resize=resize)
    full = decode_image(camera_jpeg, (224, 160), resize=resize, draft_margin=0)
    assert (drafted.width, drafted.height) == (full.width, full.height) == (4000, 3000)
    difference = mean_abs_diff(assert_decoded(drafted, 224, 160), assert_decoded(full, 224, 160))
    assert 0 < difference < 3  # > 0: draft is on by default and really decodes at reduced scale


def test_draft_reports_original_size_of_rotated_jpeg():
    oriented, reference = images.exif_oriented(6, "JPEG", height=768, width=1024)
    drafted = decode_image(oriented, (96, 128))
    assert (drafted.width, drafted.height) == (1024, 768)
    expected = assert_decoded(decode_image(reference, (96, 128), draft_margin=0), 96, 128)
    assert mean_abs_diff(assert_decoded(drafted, 96, 128), expected) < 3


REAL_PHOTOS = images.real_photo_bytes()


@pytest.mark.skipif(not REAL_PHOTOS, reason="scikit-learn's sample photos are not installed")
@pytest.mark.parametrize("name", sorted(REAL_PHOTOS) or ["none"])
def test_real_photos_match_plain_pillow_and_draft_stays_close(name):
    data = REAL_PHOTOS[name]
    full = decode_image(data, (112, 112), draft_margin=0)
    assert (full.width, full.height) == (640, 427)
    assert np.array_equal(assert_decoded(full, 112, 112), reference_stretch(data, 112, 112))
    drafted = decode_image(data, (112, 112), draft_margin=1)  # 640x427 is too small for the default margin
    assert 0 < mean_abs_diff(assert_decoded(drafted, 112, 112), full.pixels) < 3


def stripes(height: int, width: int, band: int) -> bytes:
    """Red | green | blue vertical bands; the outer two are ``band`` pixels wide."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :band] = RED
    pixels[:, band : width - band] = (0, 255, 0)
    pixels[:, width - band :] = (0, 0, 255)
    return images.encode(Image.fromarray(pixels), "PNG")


def test_center_crop_keeps_the_centre_and_fills_the_target():
    data = stripes(100, 200, band=50)  # the centred 100x100 square is all green
    pixels = assert_decoded(decode_image(data, (50, 50), resize="center_crop"), 50, 50)
    assert np.array_equal(pixels[:, 1:-1], np.broadcast_to(np.array((0, 255, 0), np.uint8), (50, 48, 3)))


@pytest.mark.parametrize("source_size", [(96, 128), (128, 96), (1, 4000), (4000, 1)])
@pytest.mark.parametrize("target_size", [(50, 50), (30, 80)])
def test_center_crop_matches_imageops_fit(source_size, target_size):
    data = images.photo_bytes("PNG", *source_size)
    height, width = target_size
    pixels = assert_decoded(decode_image(data, target_size, resize="center_crop"), height, width)
    fitted = ImageOps.fit(Image.open(io.BytesIO(data)).convert("RGB"), (width, height), Image.BILINEAR)
    assert mean_abs_diff(pixels, np.asarray(fitted)) < 1


@pytest.mark.parametrize("background", [WHITE, (0, 0, 0), (12, 34, 56)])
def test_pad_keeps_aspect_ratio_and_borders_are_background(background):
    data = images.solid_bytes("RGB", RED, "PNG", height=100, width=200)
    pixels = assert_decoded(decode_image(data, (100, 100), resize="pad", background=background), 100, 100)
    assert (pixels[:25] == background).all() and (pixels[75:] == background).all()
    assert (pixels[25:75] == RED).all()
    tall = images.solid_bytes("RGB", RED, "PNG", height=200, width=100)
    pixels = assert_decoded(decode_image(tall, (100, 100), resize="pad", background=background), 100, 100)
    assert (pixels[:, :25] == background).all() and (pixels[:, 75:] == background).all()
    assert (pixels[:, 25:75] == RED).all()


@pytest.mark.parametrize("resize", RESIZE_MODES)
@pytest.mark.parametrize("source_size", [(1, 1), (1, 4000), (4000, 1), (3, 2)])
def test_tiny_and_extreme_aspect_images(source_size, resize):
    data = images.photo_bytes("PNG", *source_size)
    result = decode_image(data, (224, 224), resize=resize)
    assert_decoded(result, 224, 224)
    assert (result.height, result.width) == source_size


@pytest.mark.parametrize("format", ["GIF", "PNG", "WEBP"])
def test_animated_files_give_their_first_frame(format):
    pixels = assert_decoded(decode_image(images.animated(format), (8, 8)), 8, 8)
    assert (pixels == images.ANIMATION_COLORS[0]).all()


def test_sample_directory_round_trip(tmp_path):
    paths = images.write_samples(tmp_path)
    valid_names = set(images.valid_samples())
    for name, path in paths.items():
        result = decode_image(path.read_bytes(), (16, 16))
        assert (result.error is None) == (name in valid_names), (name, result.error)


# --- programming errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"resize": "squash"}, "resize='squash' is not a resize mode; use one of ('stretch', 'center_crop', 'pad')"),
        ({"target_size": (0, 10)}, "target_size=(0, 10)"),
        ({"target_size": (224,)}, "target_size=(224,)"),
        ({"target_size": (2.5, 3)}, "target_size=(2.5, 3)"),
        ({"background": (256, 0, 0)}, "background=(256, 0, 0)"),
        ({"max_pixels": 0}, "max_pixels=0"),
        ({"data": "not bytes"}, "data must be bytes, got str"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(arguments, message):
    call = {"data": images.photo_bytes("PNG"), "target_size": (8, 8), **arguments}
    with pytest.raises(ValueError) as raised:
        decode_image(**call)
    assert message in str(raised.value)


# --- a bug in featurize is loud, not a bad-input reason ---------------------------------


@pytest.mark.parametrize("bug", [ValueError("box offset can't be negative"), OSError("bad box")], ids=repr)
def test_an_exception_in_the_resize_step_raises_and_bad_bytes_still_give_error_rows(monkeypatch, bug):
    # The resize step gets pixels already decoded and sizes featurize computed; once, float rounding put its crop
    # box outside the image and valid photos were filed as "corrupt JPEG image (ValueError)".
    def broken_resizer(image, original_size, target_size, background):
        raise bug

    monkeypatch.setitem(pixels.RESIZERS, "stretch", broken_resizer)
    monkeypatch.setattr(decode, "LARGE_IMAGE_PIXELS", 0)  # so that the decode takes the large-image turn
    for data in (images.photo_bytes("PNG"), images.photo_bytes("JPEG")):
        with pytest.raises(type(bug), match=str(bug)):
            decode_image(data, (8, 8))
        assert not decode._LARGE_IMAGE_LOCK.locked()  # the turn is given back when the resize raises
    truncated = decode_image(images.truncated(images.photo_bytes("JPEG")), (8, 8))
    assert truncated.error.startswith("truncated image: image file is truncated"), truncated.error
    corrupt = decode_image(images.png_with_corrupt_pixel_data(), (8, 8))
    assert corrupt.error.startswith("corrupt PNG image:"), corrupt.error


# --- fuzz: never raise ------------------------------------------------------------------

SEED_FILES = [
    images.photo_bytes("JPEG", 24, 32, quality=80),
    images.photo_bytes("PNG", 24, 32),
    images.exif_oriented(6, "JPEG", 16, 32)[0],
]


@st.composite
def mutated_image_bytes(draw):
    data = bytearray(draw(st.sampled_from(SEED_FILES)))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[position] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[position : position + draw(st.integers(1, 64))]
        if not data:
            break
    return bytes(data)


@pytest.mark.filterwarnings("ignore")  # Pillow warns about corrupt EXIF etc.; we only care that nothing raises
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=512), mutated_image_bytes()), resize=st.sampled_from(RESIZE_MODES))
def test_fuzzed_bytes_never_raise(data, resize):
    result = decode_image(data, (12, 10), resize=resize)
    if result.error is None:
        assert result.pixels.shape == (12, 10, 3) and result.pixels.dtype == np.uint8
        assert result.width > 0 and result.height > 0
    else:
        assert isinstance(result.error, str) and result.error
        assert result.pixels is None
