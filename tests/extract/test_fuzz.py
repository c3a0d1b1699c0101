"""Fuzzing the decoder with mutated files of every allowed format (more formats than test_decode.py mutates):
it returns an error, never raises."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.extract.decode import decode_image
from tests import images

FUZZ_SEEDS = [
    images.photo_bytes("GIF", 12, 16),
    images.animated("GIF", height=6, width=6),
    images.photo_bytes("TIFF", 12, 16),
    images.grey16_big_endian_tiff([[0, 1000, 65535], [5, 6, 7]]),
    images.float_tiff([[0.0, 0.5, 2.0]]),
    images.photo_bytes("WEBP", 12, 16, quality=80),
    images.animated("WEBP", height=6, width=6),
    images.photo_bytes("BMP", 12, 16),
    images.palette_png(transparent_index=1),
    images.grey16_png([[0, 32768, 65535]]),
    images.exif_oriented(8, "PNG", 8, 12)[0],
    images.cmyk_jpeg(height=8, width=8),
    images.animated("PNG", height=6, width=6),
]


@st.composite
def mutated_seed(draw):
    data = bytearray(draw(st.sampled_from(FUZZ_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "big"]))
        if action == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set":
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "big":  # a size or offset field pushed to an extreme
            data[position:position + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff",
                                                                b"\x00\x00\x00\x00", b"\x00\x01\x00\x00"]))
        else:
            del data[position:position + draw(st.integers(1, 32))]
    return bytes(data)


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(data=mutated_seed())
def test_fuzzed_files_of_every_allowed_format_never_raise(data):
    result = decode_image(data, (8, 8))
    if result.error is None:
        assert result.pixels.shape == (8, 8, 3) and result.width > 0 and result.height > 0
    else:
        assert result.pixels is None and isinstance(result.error, str) and result.error
