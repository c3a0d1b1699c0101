"""`featurize bench`: the pipeline side by side with the bare model and the loop users write.

In one invocation, for one backbone and batch size, on photo-like JPEGs generated here:
  (a) bare model: the compiled forward on pre-decoded uint8 tensors, on the same runtime (the ceiling);
  (b) full pipeline: listing to committed Parquet on a local Ray with one actor, steady state measured
      between the first and the last shard commit; startup (command to first commit) reported apart;
  (c) the Keras-docs loop: load_img, img_to_array, preprocess_input, predict, one image at a time.
Plus JPEG draft decoding on camera-size files (decode time with and without), and what the content hashes
(sha256, phash) cost: the actor's work on one shard with `output.content_hashes` off and on, alternately, as a
throughput ratio (a whole pipeline run per side would drown a few percent in Ray's start-up noise). Ratios b/a and b/c are
the figures to read: they hold on a noisy machine where absolute images/s do not. On Linux, (b) also
reports how many cores were busy in its steady state and how much time the hypervisor stole, and, on a
CPU, the b/a ceiling set by decode sharing the model's cores.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import charts
from pipeline.config import ExtractConfig, InputConfig, ModelConfig, OutputConfig, RunConfig
from pipeline.extract.decode import decode_image
from pipeline.tools.bench_hashes import hash_cost
from pipeline.tools.plan_memory import plan_memory


@dataclass(frozen=True)
class BenchSettings:
    backbone: str = "mobilenetv2"
    input_size: int = 224
    batch_size: int = 32
    num_images: int = 1024  # (b)'s steady state spans the last three quarters of these
    bare_images: int = 256  # pre-decoded images per pass of (a)
    loop_images: int = 48
    source_size: tuple[int, int] = (500, 375)
    camera_size: tuple[int, int] = (4000, 3000)
    camera_images: int = 16  # 0 skips the camera-size figures
    gpus_per_actor: float | None = None  # None: 1 on a GPU machine, 0 on CPU
    manifest_entries: int = 1_000_000  # driver memory to plan a manifest this long; 0 skips it
    runtime: str = "auto"  # model.runtime of (a) and (b)
    hash_pairs: int = 8  # shards without then with content hashes (order alternating), this many pairs; 0 skips
    hash_images: int = 256  # images a shard of the content-hash comparison


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients, blobs and grain: compresses and decodes like a photo, unlike flat noise."""
    generator = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = generator.uniform(0.5, 4, 2).tolist() + [generator.uniform(0, 6.28)]
        channels.append(127 + 60 * np.sin(fx * x / width * 6.28 + phase) * np.cos(fy * y / height * 6.28))
    pixels = np.stack(channels, -1)
    for _ in range(6):
        cx, cy = generator.uniform(0, width), generator.uniform(0, height)
        radius = generator.uniform(0.05, 0.25) * min(width, height)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < radius**2
        pixels[mask] = generator.uniform(0, 255, 3)
    pixels += generator.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_images(directory: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    base = [photo_like(*size, seed=seed + index) for index in range(min(count, 8))]
    paths = []
    for index in range(count):  # a few distinct photos, re-encoded at varied quality: cheap to generate
        path = directory / f"photo_{index:06d}.jpg"
        base[index % len(base)].save(path, quality=80 + index % 15)
        paths.append(path)
    return paths


def model_config(settings: BenchSettings, weights: str) -> ModelConfig:
    return ModelConfig(backbone=settings.backbone, weights=weights, input_size=settings.input_size, top_k=5,
                       runtime=settings.runtime)


def random_weights_file(settings: BenchSettings, directory: Path) -> str:
    """One random-init weights file for (a) and (b): the same model in both, so LiteRT converts it once."""
    from pipeline.models.loading import pull_weights

    path = str(directory / "weights.weights.h5")
    pull_weights(settings.backbone, path, weights=None)
    return path


def shard_size(image_dir: Path) -> int:
    """Four shards: the first (startup) is left out of the steady state, the other three measure it."""
    return max(1, len(list(image_dir.glob("*.jpg"))) // 4)


class BareModel:
    """(a) the forward alone on pre-decoded uint8 batches, in this process, on every core: the ceiling.

    Measured before and after the pipeline and the best pass kept, so a busy moment on a shared machine
    lowers neither side of b/a in our favour."""

    def __init__(self, settings: BenchSettings, weights: str, paths: list[Path]):
        from pipeline.models.extractor import FeatureExtractor

        self.extractor = FeatureExtractor(model_config(settings, weights), batch_size=settings.batch_size,
                                          num_threads=os.cpu_count())
        self.runtime = self.extractor.runtime  # the pipeline's actor resolves model.runtime the same way
        size = self.extractor.input_size
        self.images = np.stack([decode_image(path.read_bytes(), size).pixels for path in paths])
        self.extractor(self.images[: settings.batch_size])  # compile + warm up
        self.passes: list[float] = []

    def measure(self, passes: int = 2) -> float:
        for _ in range(passes):
            started = time.perf_counter()
            self.extractor(self.images)
            self.passes.append(len(self.images) / (time.perf_counter() - started))
        return max(self.passes)


class CpuMonitor:
    """Samples the machine's CPU counters (/proc/stat) while (b) runs, to tell a CPU-bound pipeline (every
    core busy) from a stalled one (cores idle), and to show time a busy neighbour on a shared VM stole.
    Linux only; elsewhere `between` returns None."""

    def __init__(self, interval_seconds: float = 0.2):
        self.interval_seconds = interval_seconds
        self.samples: list[tuple[float, list[int]]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, name="bench-cpu-monitor", daemon=True)

    def __enter__(self) -> CpuMonitor:
        if read_cpu_counters() is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
            self.samples.append((time.time(), read_cpu_counters()))  # so a window ending now is bracketed

    def sample(self) -> None:
        while True:
            self.samples.append((time.time(), read_cpu_counters()))
            if self.stopped.wait(self.interval_seconds):
                return

    def between(self, start: float, stop: float) -> dict | None:
        """Busy cores and stolen share over the samples that bracket [start, stop] (the window may widen by
        one sampling interval at each end)."""
        before = [sample for sample in self.samples if sample[0] <= start] or self.samples[:1]
        after = [sample for sample in self.samples if sample[0] >= stop] or self.samples[-1:]
        if not before or not after or after[0][0] <= before[-1][0]:
            return None
        (first_time, first), (last_time, last) = before[-1], after[0]
        ticks = [end - begin for begin, end in zip(first, last)]
        # /proc/stat cpu line: user nice system idle iowait irq softirq steal (guest time is inside user)
        busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]
        total = busy + ticks[3] + ticks[4] + ticks[7]
        per_second = os.sysconf("SC_CLK_TCK") * (last_time - first_time)
        return {"busy_cores": busy / per_second, "steal_share": ticks[7] / total if total else 0.0,
                "seconds": last_time - first_time}


def read_cpu_counters() -> list[int] | None:
    """The first eight fields of /proc/stat's aggregate `cpu` line, in clock ticks; None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    return [int(value) for value in fields[1:9]] if fields and fields[0] == "cpu" and len(fields) >= 9 else None


def cpu_ceiling(bare: float, decode_rate: float, cores: int) -> float:
    """b/a when decode shares the model's cores (a CPU actor): per image the model costs cores/bare
    core-seconds and decode 1/decode_rate, so the pipeline can reach at most
    cores / (cores/bare + 1/decode_rate) images/s."""
    return 1.0 / (1.0 + bare / (cores * decode_rate))


def full_pipeline(settings: BenchSettings, weights: str, image_dir: Path, output: Path) -> dict:
    """(b) listing -> committed Parquet on a local Ray with one actor; steady state between commits."""
    from pipeline.extract.driver import run_extract
    from pipeline.output import ledger

    gpus_per_actor = None if settings.gpus_per_actor is None else float(settings.gpus_per_actor)
    config = ExtractConfig(input=InputConfig(uri=(str(image_dir),)), model=model_config(settings, weights),
                           run=RunConfig(actors=1, batch_size=settings.batch_size, shard_size=shard_size(image_dir),
                                         gpus_per_actor=gpus_per_actor),
                           output=OutputConfig(uri=str(output), mode="overwrite")).validate()
    with CpuMonitor() as monitor:
        success = run_extract(config)
    commits = sorted(ledger.read_commits(str(output)).values(), key=lambda record: record.committed_at)
    steady_rows = sum(record.rows for record in commits[1:])
    steady_seconds = commits[-1].committed_at - commits[0].committed_at
    return {"images_per_second": steady_rows / steady_seconds if steady_seconds > 0 else float("nan"),
            "runtime": success["provenance"].get("runtime", "keras"),
            "startup_seconds": success["seconds"]["startup"], "total_seconds": success["seconds"]["total"],
            "rows": success["rows"], "timings": success["timings"],
            "cpu": monitor.between(commits[0].committed_at, commits[-1].committed_at)}


def keras_docs_loop(settings: BenchSettings, paths: list[Path]) -> float:
    """(c) the loop from the Keras docs: one image at a time through load_img and predict."""
    import keras

    from pipeline.models.zoo import get_backbone

    backbone = get_backbone(settings.backbone)
    side = settings.input_size
    model = backbone.constructor(weights=None, include_top=False, pooling="avg", input_shape=(side, side, 3))
    preprocess = keras.applications.imagenet_utils.preprocess_input
    mode = {"none": None}.get(backbone.preprocess, backbone.preprocess)
    model.predict(np.zeros((1, side, side, 3), np.float32), verbose=0)  # warm up, as a user's second call
    started = time.perf_counter()
    for path in paths:
        image = keras.utils.load_img(path, target_size=(side, side))
        batch = np.expand_dims(keras.utils.img_to_array(image), axis=0)
        if mode:
            batch = preprocess(batch, mode=mode)
        model.predict(batch, verbose=0)
    return len(paths) / (time.perf_counter() - started)


def draft_gain(settings: BenchSettings, paths: list[Path]) -> dict:
    """Decode time per camera-size JPEG to the model's input size: full decode vs draft margins."""
    from pipeline.extract.decode import DEFAULT_DRAFT_MARGIN

    size = (settings.input_size, settings.input_size)
    milliseconds = {}
    for margin in (0, DEFAULT_DRAFT_MARGIN, 1):
        started = time.perf_counter()
        for path in paths:
            decode_image(path.read_bytes(), size, draft_margin=margin)
        milliseconds[margin] = 1000 * (time.perf_counter() - started) / len(paths)
    return {"full_decode_ms": milliseconds[0], "draft_decode_ms": milliseconds[DEFAULT_DRAFT_MARGIN],
            "draft_margin": DEFAULT_DRAFT_MARGIN, "draft_margin_1_ms": milliseconds[1],
            "speedup": milliseconds[0] / milliseconds[DEFAULT_DRAFT_MARGIN]}


def decode_per_core(settings: BenchSettings, paths: list[Path], content_hashes: bool = False) -> float:
    """Images/s one core fetches and decodes to the input size, as a decode thread does it (with the content
    hashes when they are on): how many cores keep a model fed, and the `d` of the CPU ceiling."""
    from pipeline.extract.items import DecodeSettings, decode_fetched, image_decoder

    size = (settings.input_size, settings.input_size)
    decode = image_decoder(size, DecodeSettings({}, content_hashes=content_hashes))
    rates = []
    for _ in range(3):  # the best pass, like (a)'s: a busy moment never lowers the ceiling in (b)'s favour
        started = time.perf_counter()
        for path in paths:
            decode_fetched(str(path), None, path.read_bytes(), 0.0, decode, content_hashes)
        rates.append(len(paths) / (time.perf_counter() - started))
    return max(rates)


def run_bench(settings: BenchSettings, output_dir: Path, console) -> dict:
    from pipeline.models.runtimes import configure_tensorflow

    configure_tensorflow(os.cpu_count())  # before any TF op in this process (the weights file below is one)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="featurize-bench-") as scratch:
        scratch = Path(scratch)
        paths = write_images(scratch / "images", settings.num_images, settings.source_size)
        console.print(f"bench: {settings.backbone} at {settings.input_size}, batch {settings.batch_size}, "
                      f"{len(paths)} JPEGs of {settings.source_size[0]}x{settings.source_size[1]}")
        weights = random_weights_file(settings, scratch)
        bare_model = BareModel(settings, weights, paths[: settings.bare_images])
        bare_model.measure()
        pipeline = full_pipeline(settings, weights, scratch / "images", scratch / "out")
        bare = bare_model.measure()
        decode_rate = decode_per_core(settings, paths[:64])
        hashed_decode_rate = decode_per_core(settings, paths[:64], content_hashes=True)  # what (b)'s threads do
        hashes = (hash_cost(bare_model.extractor, paths[: settings.hash_images], scratch / "hash-cost",
                            settings.hash_pairs) if settings.hash_pairs else None)
        result = {
            "settings": asdict(settings),
            "runtime": bare_model.runtime,
            "bare_model_images_per_second": bare,
            "bare_model_passes": bare_model.passes,
            "pipeline": pipeline,
            "pipeline_over_bare": pipeline["images_per_second"] / bare,
            "decode_images_per_second_per_core": decode_rate,
            "decode_with_content_hashes_images_per_second_per_core": hashed_decode_rate,
            "cores_to_feed_bare_model": bare / decode_rate,
            "cpu_count": os.cpu_count(),
        }
        if hashes:
            result["content_hashes"] = hashes
        if not pipeline_on_gpu(settings):  # (b) runs with the content hashes on (the default): its decode is that
            result["cpu_ceiling_over_bare"] = cpu_ceiling(bare, hashed_decode_rate, os.cpu_count())
            result["pipeline_over_cpu_ceiling"] = result["pipeline_over_bare"] / result["cpu_ceiling_over_bare"]
            result["pipeline_over_cpu_ceiling_without_hashes"] = (result["pipeline_over_bare"]
                                                                  / cpu_ceiling(bare, decode_rate, os.cpu_count()))
        if settings.loop_images:
            loop = keras_docs_loop(settings, paths[: settings.loop_images])
            result["keras_loop_images_per_second"] = loop
            result["pipeline_over_keras_loop"] = pipeline["images_per_second"] / loop
        if settings.camera_images:
            camera = write_images(scratch / "camera", settings.camera_images, settings.camera_size, seed=100)
            result["camera_jpeg_draft"] = draft_gain(settings, camera)
            result["camera_pipeline"] = full_pipeline(settings, weights, scratch / "camera", scratch / "out-camera")
    if settings.manifest_entries:
        result["plan_memory"] = plan_memory(settings.manifest_entries)
    (output_dir / "bench.json").write_text(json.dumps(result, indent=2))
    (output_dir / "bench.png").write_bytes(plot(result))
    print_bench(result, console)
    return result


def pipeline_on_gpu(settings: BenchSettings) -> bool:
    if settings.gpus_per_actor is not None:
        return settings.gpus_per_actor > 0
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def plot(result: dict) -> bytes:
    """The three rates side by side as a PNG, with the CPU ceiling for (b) where there is one."""
    from matplotlib.figure import Figure  # Figure without pyplot renders with Agg: no GUI, no global state

    names = ["bare model (a)", "pipeline (b)", "Keras loop (c)"]
    values = [result["bare_model_images_per_second"], result["pipeline"]["images_per_second"],
              result.get("keras_loop_images_per_second", 0.0)]
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    bars = axis.bar(names, values, color=["#888888", "#2a7ab0", "#c0504d"])
    axis.bar_label(bars, fmt="%.0f")
    if "cpu_ceiling_over_bare" in result:  # what (b) could reach with decode sharing the model's cores
        ceiling = values[0] * result["cpu_ceiling_over_bare"]
        axis.hlines(ceiling, 0.6, 1.4, colors="black", linestyles="dashed", label="CPU ceiling for (b)")
        axis.legend()
    settings = result["settings"]
    axis.set_ylabel("images / s")
    axis.set_title(f"{settings['backbone']} @ {settings['input_size']}, batch {settings['batch_size']}, "
                   f"{result['runtime']}: "
                   f"b/a = {result['pipeline_over_bare']:.2f}, b/c = {result.get('pipeline_over_keras_loop', 0):.1f}")
    figure.tight_layout()
    return charts.figure_png(figure, dpi=110)


def print_bench(result: dict, console) -> None:
    from pipeline.tools.report import stage_split

    pipeline, cores = result["pipeline"], result["cpu_count"]
    lines = [("(a) bare model", f"{result['bare_model_images_per_second']:.1f} images/s (runtime {result['runtime']})"),
             ("(b) pipeline, steady state", f"{pipeline['images_per_second']:.1f} images/s"),
             ("b / a", f"{result['pipeline_over_bare']:.3f}")]
    if "cpu_ceiling_over_bare" in result:
        lines.append(("b / a ceiling on this CPU",
                      f"{result['cpu_ceiling_over_bare']:.3f} (decode with the content hashes shares the model's "
                      f"{cores} cores)"))
        lines.append(("pipeline / ceiling", f"{result['pipeline_over_cpu_ceiling']:.3f} "
                                            f"({result['pipeline_over_cpu_ceiling_without_hashes']:.3f} against the "
                                            "ceiling of a decode without the hashes)"))
    if pipeline.get("cpu"):
        cpu = pipeline["cpu"]
        lines.append(("cores busy during (b)",
                      f"{cpu['busy_cores']:.2f} of {cores}; {cpu['steal_share']:.0%} stolen by the host"))
    if "keras_loop_images_per_second" in result:
        lines.append(("(c) Keras-docs loop", f"{result['keras_loop_images_per_second']:.1f} images/s"))
        lines.append(("b / c", f"{result['pipeline_over_keras_loop']:.1f}"))
    lines.append(("startup (command to first commit)", f"{pipeline['startup_seconds']:.1f} s"))
    lines += stage_split(pipeline["timings"])
    if "content_hashes" in result:
        hashes = result["content_hashes"]
        lines.append(("worker with / without content hashes",
                      f"{hashes['median_cpu_ratio']:.3f} by CPU time, {hashes['median_wall_ratio']:.3f} by wall clock "
                      f"(medians of {len(hashes['cpu_ratios'])} pairs of {hashes['images']} images)"))
    lines.append(("decode per core", f"{result['decode_images_per_second_per_core']:.0f} images/s "
                                     f"({result['decode_with_content_hashes_images_per_second_per_core']:.0f} with the "
                                     f"content hashes); {result['cores_to_feed_bare_model']:.1f} cores feed the bare "
                                     "model"))
    if "camera_jpeg_draft" in result:
        draft = result["camera_jpeg_draft"]
        lines.append(("camera JPEG decode",
                      f"{draft['full_decode_ms']:.0f} ms full, {draft['draft_decode_ms']:.0f} ms draft margin "
                      f"{draft['draft_margin']} ({draft['speedup']:.1f}x), {draft['draft_margin_1_ms']:.0f} ms margin 1"))
        lines.append(("camera JPEG pipeline", f"{result['camera_pipeline']['images_per_second']:.1f} images/s"))
    if "plan_memory" in result:
        memory = result["plan_memory"]
        lines.append(("driver memory to plan",
                      f"{memory['entries']:,} entries: peak RSS {memory['peak_rss_bytes'] / 2**20:.0f} MiB"))
    console.print(charts.key_value_table("featurize bench", lines))
