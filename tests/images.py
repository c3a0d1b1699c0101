"""Test images made with Pillow and numpy: valid ones in every mode, and broken ones.

Deterministic (seeded), small unless asked otherwise, and returned as encoded bytes so
tests feed exactly what a storage read would. Sizes are given as (height, width) like
the pipeline's target_size; Pillow's own (width, height) stays inside this module.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112


# --- valid images -----------------------------------------------------------------------


def photo_like_array(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: smooth gradients, a few shapes, mild noise. Asymmetric,
    so every flip and rotation of it is distinguishable."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    columns = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
    pixels = np.empty((height, width, 3), np.float32)
    pixels[..., 0] = 200 * columns + 40 * rows
    pixels[..., 1] = 120 + 100 * np.sin(3 * rows + 2 * columns + phase[1])
    pixels[..., 2] = 220 * rows * (1 - columns) + 20
    for _ in range(3):  # discs and rectangles at seeded places
        centre_y, centre_x = rng.uniform(0.15, 0.85, 2)
        radius = rng.uniform(0.08, 0.2)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        disc = (rows - centre_y) ** 2 + ((columns - centre_x) * width / height) ** 2 < radius**2
        pixels[disc] = colour
    top, left = int(0.1 * height), int(0.6 * width)
    pixels[top : top + max(1, height // 5), left : left + max(1, width // 4)] = (250, 240, 30)
    noise = rng.integers(-8, 9, size=(height, width, 1), dtype=np.int16)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def photo_like_image(height: int = 96, width: int = 128, seed: int = 0) -> Image.Image:
    return Image.fromarray(photo_like_array(height, width, seed))


def encode(image: Image.Image, format: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **save_options)
    return buffer.getvalue()


def photo_bytes(format: str = "JPEG", height: int = 96, width: int = 128, seed: int = 0, **save_options) -> bytes:
    return encode(photo_like_image(height, width, seed), format, **save_options)


def solid_image(mode: str, color, height: int = 8, width: int = 8) -> Image.Image:
    return Image.new(mode, (width, height), color)


def solid_bytes(mode: str, color, format: str = "PNG", height: int = 8, width: int = 8, **save_options) -> bytes:
    return encode(solid_image(mode, color, height, width), format, **save_options)


def palette_png(transparent_index: int | None = None) -> bytes:
    """4 wide, 1 high, palette mode: indices 0..3 = red, green, blue, grey."""
    image = Image.new("P", (4, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 128, 128, 128])
    image.putdata([0, 1, 2, 3])
    options = {} if transparent_index is None else {"transparency": transparent_index}
    return encode(image, "PNG", **options)


def palette_alpha_tiff(index_alpha: list[tuple[int, int]]) -> bytes:
    """PA mode (palette + alpha; TIFF can store it), one pixel per (index, alpha), palette as palette_png."""
    image = Image.new("PA", (len(index_alpha), 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 128, 128, 128])
    image.putdata(index_alpha)
    return encode(image, "TIFF")


def grey_array_bytes(values, format: str = "PNG", mode: str | None = None) -> bytes:
    """One row (or a 2-D block) of integer or float samples, saved in their own precision.

    uint16 -> I;16 (or mode="I;16B"), int32 -> I, float32 -> F, uint8 -> L.
    """
    array = np.asarray(values)
    array = array[None, :] if array.ndim == 1 else array
    image = Image.fromarray(array)
    if mode is not None and mode != image.mode:
        converted = Image.new(mode, image.size)
        converted.putdata(array.ravel().tolist())
        image = converted
    return encode(image, format)


def grey16_png(values) -> bytes:
    return grey_array_bytes(np.asarray(values, np.uint16), "PNG")


def grey16_big_endian_tiff(values) -> bytes:
    return grey_array_bytes(np.asarray(values, np.uint16), "TIFF", mode="I;16B")


def int32_tiff(values) -> bytes:
    return grey_array_bytes(np.asarray(values, np.int32), "TIFF")


def float_tiff(values) -> bytes:
    return grey_array_bytes(np.asarray(values, np.float32), "TIFF")


def cmyk_jpeg(color: tuple[int, int, int, int] = (255, 0, 0, 0), height: int = 16, width: int = 16) -> bytes:
    """Pillow writes CMYK JPEGs the Adobe (inverted) way, with an APP14 marker."""
    return solid_bytes("CMYK", color, "JPEG", height, width, quality=95)


def converted_tiff(mode: str, rgb: tuple[int, int, int], height: int = 8, width: int = 8) -> bytes:
    """A solid RGB colour stored in another colour space (YCbCr, LAB, CMYK, ...) as TIFF."""
    return encode(solid_image("RGB", rgb, height, width).convert(mode), "TIFF")


def one_bit_png(pattern=((1, 0), (0, 1))) -> bytes:
    array = np.asarray(pattern, dtype=bool)
    return encode(Image.fromarray(array), "PNG")


# --- orientation ------------------------------------------------------------------------


def stored_from_upright(upright: np.ndarray, orientation: int) -> np.ndarray:
    """What a camera stores for an upright picture tagged with EXIF ``orientation``.

    From the EXIF spec's meaning of each value (where the stored row 0 / column 0 sit in
    the upright picture), written with numpy, independently of Pillow's transpose table.
    """
    transposed = np.transpose(upright, (1, 0, 2))
    return {
        1: upright,
        2: upright[:, ::-1],  # mirrored horizontally
        3: upright[::-1, ::-1],  # rotated 180
        4: upright[::-1, :],  # mirrored vertically
        5: transposed,  # row 0 is the left column
        6: np.rot90(upright, 1),  # shot with the camera turned: view by rotating 90 clockwise
        7: transposed[::-1, ::-1],  # transverse
        8: np.rot90(upright, -1),  # view by rotating 90 counter-clockwise
    }[orientation].copy()


def exif_oriented(orientation: int, format: str = "JPEG", height: int = 48, width: int = 80, seed: int = 1):
    """(stored bytes tagged with ``orientation``, upright reference bytes without EXIF).

    ``height`` x ``width`` is the upright size. JPEG sides should be multiples of 16 so
    the 8x8 blocks line up in both copies.
    """
    upright = photo_like_array(height, width, seed)
    stored = Image.fromarray(stored_from_upright(upright, orientation))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    options = {"quality": 95} if format == "JPEG" else {}
    oriented_bytes = encode(stored, format, exif=exif.tobytes(), **options)
    reference_bytes = encode(Image.fromarray(upright), format, **options)
    return oriented_bytes, reference_bytes


# --- animations -------------------------------------------------------------------------

ANIMATION_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def animated(format: str, colors=ANIMATION_COLORS, height: int = 16, width: int = 16) -> bytes:
    """GIF, PNG (APNG) or WEBP with one solid frame per colour; the first frame is colors[0]."""
    frames = [solid_image("RGB", color, height, width) for color in colors]
    options = {"lossless": True} if format == "WEBP" else {}
    return encode(frames[0], format, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)


# --- broken and hostile files -----------------------------------------------------------


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """[(chunk type, payload)] of a PNG, ignoring CRCs."""
    chunks, position = [], 8
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        chunk_type = data[position + 4 : position + 8]
        chunks.append((chunk_type, data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def png_from_chunks(chunks, bad_crc_for: bytes | None = None) -> bytes:
    """Reassemble a PNG; the chunk named ``bad_crc_for`` gets a wrong CRC."""
    out = [b"\x89PNG\r\n\x1a\n"]
    for chunk_type, payload in chunks:
        crc = zlib.crc32(chunk_type + payload)
        if chunk_type == bad_crc_for:
            crc ^= 0xFFFFFFFF
        out.append(struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", crc))
    return b"".join(out)


def png_with_bad_header_crc() -> bytes:
    return png_from_chunks(png_chunks(photo_bytes("PNG", 16, 16)), bad_crc_for=b"IHDR")


def png_with_corrupt_pixel_data() -> bytes:
    """IDAT payload scrambled mid-stream (with a matching CRC, so only the data is bad)."""
    chunks = png_chunks(photo_bytes("PNG", 32, 32))
    broken = []
    for chunk_type, payload in chunks:
        if chunk_type == b"IDAT":
            middle = len(payload) // 2
            scrambled = bytes(byte ^ 0x5A for byte in payload[middle : middle + 16])
            payload = payload[:middle] + scrambled + payload[middle + 16 :]
        broken.append((chunk_type, payload))
    return png_from_chunks(broken)


def png_declaring_size(height: int, width: int) -> bytes:
    """A fake decompression bomb: a tiny 1x1 PNG whose IHDR claims height x width (valid CRC)."""
    chunks = png_chunks(solid_bytes("L", 0, "PNG", 1, 1))
    patched = [
        (chunk_type, struct.pack(">II", width, height) + payload[8:] if chunk_type == b"IHDR" else payload)
        for chunk_type, payload in chunks
    ]
    return png_from_chunks(patched)


def eps_bytes() -> bytes:
    """A real EPS file as Pillow writes it (PostScript; opening it would need Ghostscript)."""
    return solid_bytes("RGB", (255, 0, 0), "EPS", 8, 8)


def pdf_bytes() -> bytes:
    return solid_bytes("RGB", (255, 0, 0), "PDF", 8, 8)


def psd_header_bytes(height: int = 8, width: int = 8) -> bytes:
    """The 26-byte header of an RGB Photoshop file followed by empty sections."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + b"\x00\x00"


HTML_ERROR_PAGE = b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body>Access denied</body></html>\n"


def real_photo_bytes() -> dict[str, bytes]:
    """Real camera JPEGs (scikit-learn ships china.jpg and flower.jpg, 640x427); {} without it."""
    try:
        import sklearn
    except ImportError:
        return {}
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.jpg"))}


# --- a directory of samples -------------------------------------------------------------


def valid_samples() -> dict[str, bytes]:
    """File name -> bytes of images every decoder should accept, one per format/mode."""
    return {
        "photo.jpg": photo_bytes("JPEG", quality=90),
        "photo.png": photo_bytes("PNG"),
        "photo.webp": photo_bytes("WEBP", quality=90),
        "photo.bmp": photo_bytes("BMP"),
        "photo.tiff": photo_bytes("TIFF"),
        "photo.gif": photo_bytes("GIF"),
        "rgba.png": solid_bytes("RGBA", (255, 0, 0, 128)),
        "la.png": solid_bytes("LA", (100, 200)),
        "palette_transparent.png": palette_png(transparent_index=0),
        "one_bit.png": one_bit_png(),
        "grey16.png": grey16_png([[0, 32768, 65535]]),
        "float.tiff": float_tiff([[0.0, 0.5, 1.0]]),
        "cmyk.jpg": cmyk_jpeg(),
        "animated.gif": animated("GIF"),
        "tiny_1x1.png": solid_bytes("RGB", (10, 20, 30), "PNG", 1, 1),
        "strip_1x4000.png": photo_bytes("PNG", 1, 4000),
    }


def broken_samples() -> dict[str, bytes]:
    """File name -> bytes every decoder must turn into an error (names lie on purpose)."""
    return {
        "empty.jpg": b"",
        "html_page.jpg": HTML_ERROR_PAGE,
        "truncated.jpg": truncated(photo_bytes("JPEG")),
        "truncated.png": truncated(photo_bytes("PNG")),
        "corrupt_data.png": png_with_corrupt_pixel_data(),
        "bad_header_crc.png": png_with_bad_header_crc(),
        "bomb.png": png_declaring_size(20_000, 10_000),
        "document.png": eps_bytes(),
        "document.jpg": pdf_bytes(),
    }


def write_samples(directory: str | Path, samples: dict[str, bytes] | None = None) -> dict[str, Path]:
    """Write ``samples`` (default: valid and broken ones) into ``directory``; name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    samples = samples if samples is not None else {**valid_samples(), **broken_samples()}
    paths = {}
    for name, data in samples.items():
        paths[name] = directory / name
        paths[name].write_bytes(data)
    return paths


# --- a task no pretrained network saw: digits scattered over photo clutter -----------------

CLUTTER_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def write_cluttered_digits(directory: Path, images_per_class: int, side: int = 160, seed: int = 0) -> list[Path]:
    """JPEGs in one folder per digit (digit_0 ... digit_9): a scikit-learn 8x8 digit scan, scaled, rotated and
    painted in the colour opposite to the photo under it, pasted at a random place on a random crop of a
    scikit-image photo. Neither the dog-breed network nor ImageNet saw this task."""
    import skimage.data
    from sklearn.datasets import load_digits

    digits = load_digits()
    photos = [getattr(skimage.data, name)()[..., :3] for name in CLUTTER_PHOTOS]
    rng = np.random.default_rng(seed)
    paths = []
    for label in range(10):
        folder = directory / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        scans = np.flatnonzero(digits.target == label)
        for index in range(images_per_class):
            canvas = photo_crop(photos[rng.integers(len(photos))], side, rng)
            paste_digit(canvas, digits.images[scans[index % len(scans)]], int(rng.integers(side // 3, side // 2)), rng)
            path = folder / f"{index:04d}.jpg"
            canvas.save(path, quality=90)
            paths.append(path)
    return paths


def photo_crop(photo: np.ndarray, side: int, rng: np.random.Generator) -> Image.Image:
    crop = int(rng.integers(side // 2, min(photo.shape[:2])))
    top, left = rng.integers(0, photo.shape[0] - crop + 1), rng.integers(0, photo.shape[1] - crop + 1)
    return Image.fromarray(photo[top:top + crop, left:left + crop]).resize((side, side), Image.BILINEAR)


def paste_digit(canvas: Image.Image, scan: np.ndarray, size: int, rng: np.random.Generator) -> None:
    mask = Image.fromarray((scan * (255.0 / 16.0)).astype(np.uint8), "L").resize((size, size), Image.BICUBIC)
    mask = mask.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    left, top = int(rng.integers(0, canvas.width - size)), int(rng.integers(0, canvas.height - size))
    under = np.asarray(canvas.crop((left, top, left + size, top + size)), dtype=np.float32).mean(axis=(0, 1))
    colour = tuple(int(value) for value in np.where(under > 127, rng.integers(0, 60, 3), rng.integers(195, 256, 3)))
    canvas.paste(Image.new("RGB", (size, size), colour), (left, top), mask=mask)
