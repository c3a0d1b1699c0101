"""One decode feeding several models (extract's `models:`) against one extract per model, on the same JPEGs.

    python -m pipeline.tools.bench_models [--images 600] [--gpus-per-actor 1] [--output DIR]

Each network is a zoo backbone at its own input size and resize mode, with random weights saved once to a file
(so every run loads the same ones: no download, and features comparable across runs). The one-model extracts run
one after the other, then one extract over `models:`; every run has one actor and is timed end to end (Ray start,
model build and conversion included, as a user waits for it). Reported: each run's wall seconds, the `models:` run
over the sum of the one-model runs, and per model the smallest cosine between its rows in the two outputs (the
same images must give the same features). jobs/gpu_benchmark.py runs it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import ExtractConfig, InputConfig, ModelConfig, NamedModelConfig, OutputConfig, RunConfig
from pipeline.tools.bench import write_images

# (zoo backbone, input side, resize mode): three architectures, three sizes, three resize modes
NETWORKS = (("mobilenetv2", 160, "stretch"), ("mobilenetv3small", 128, "center_crop"), ("efficientnetb0", 96, "pad"))


@dataclass(frozen=True)
class ModelsBenchSettings:
    networks: tuple[tuple[str, int, str], ...] = NETWORKS
    num_images: int = 600
    source_size: tuple[int, int] = (1600, 1200)  # (width, height) of the generated JPEGs
    batch_size: int = 32
    shard_size: int = 100
    gpus_per_actor: float | None = None  # None: 1 on a GPU machine, 0 on CPU


def network_name(backbone: str, side: int) -> str:
    return f"{backbone}-{side}"


def weights_files(settings: ModelsBenchSettings, directory: Path) -> dict[str, str]:
    """One random-init weights file per backbone, seeded, shared by every run."""
    import keras

    from pipeline.models.loading import pull_weights

    files = {}
    for backbone in dict.fromkeys(backbone for backbone, _, _ in settings.networks):
        keras.utils.set_random_seed(0)
        files[backbone] = str(directory / f"{backbone}.weights.h5")
        if not os.path.exists(files[backbone]):
            pull_weights(backbone, files[backbone], weights=None)
    return files


def timed_extract(config: ExtractConfig) -> tuple[float, dict]:
    from pipeline.extract.driver import run_extract

    started = time.perf_counter()
    success = run_extract(config)
    return time.perf_counter() - started, success


def features_by_uri(output: Path) -> dict[str, np.ndarray]:
    success = json.loads((output / "_SUCCESS").read_text())
    table = pq.ParquetDataset([str(output / path) for path in success["files"]]).read(columns=["uri", "features"])
    return {uri: np.asarray(features, np.float32) for uri, features in zip(
        table.column("uri").to_pylist(), table.column("features").to_pylist()) if features is not None}


def smallest_cosine(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> float:
    if set(first) != set(second):
        return float("nan")  # not the same ok rows: no figure hides that
    uris = sorted(first)
    a, b = np.stack([first[uri] for uri in uris]), np.stack([second[uri] for uri in uris])
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(axis=1).min())


def run_models_bench(settings: ModelsBenchSettings, output_dir: Path, say=print) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    image_dir = output_dir / "images"
    if len(list(image_dir.glob("*.jpg"))) != settings.num_images:
        write_images(image_dir, settings.num_images, settings.source_size)
    weights = weights_files(settings, output_dir)
    gpus = settings.gpus_per_actor
    common = {"input": InputConfig(uri=(str(image_dir),)),
              "run": RunConfig(actors=1, batch_size=settings.batch_size, shard_size=settings.shard_size,
                               gpus_per_actor=gpus)}
    models = {network_name(backbone, side): ModelConfig(backbone=backbone, weights=weights[backbone],
                                                        input_size=side, resize=resize, top_k=5)
              for backbone, side, resize in settings.networks}
    single_seconds = {}
    for name, model in models.items():
        say(f"one-model extract: {name}")
        single_seconds[name], _ = timed_extract(ExtractConfig(
            **common, model=model, output=OutputConfig(uri=str(output_dir / "single" / name), mode="overwrite")))
    say(f"one extract over {len(models)} models")
    named = tuple(NamedModelConfig(**asdict(model), name=name) for name, model in models.items())
    multi_seconds, success = timed_extract(ExtractConfig(
        **common, models=named, output=OutputConfig(uri=str(output_dir / "multi"), mode="overwrite")))
    cosines = {name: smallest_cosine(features_by_uri(output_dir / "single" / name),
                                     features_by_uri(output_dir / "multi" / name)) for name in models}
    result = {
        "settings": asdict(settings),
        "single_seconds": {name: round(seconds, 2) for name, seconds in single_seconds.items()},
        "single_seconds_total": round(sum(single_seconds.values()), 2),
        "models_seconds": round(multi_seconds, 2),
        "models_over_singles": round(multi_seconds / sum(single_seconds.values()), 3),
        "smallest_cosine": cosines,
        "rows": {name: model_success["rows"] for name, model_success in success["models"].items()},
        "timings": {name: model_success["timings"] for name, model_success in success["models"].items()},
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(value, 2) for value in os.getloadavg()],
    }
    (output_dir / "models_bench.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="results/models-bench")
    parser.add_argument("--images", type=int, default=ModelsBenchSettings.num_images)
    parser.add_argument("--width", type=int, default=ModelsBenchSettings.source_size[0])
    parser.add_argument("--height", type=int, default=ModelsBenchSettings.source_size[1])
    parser.add_argument("--batch-size", type=int, default=ModelsBenchSettings.batch_size)
    parser.add_argument("--shard-size", type=int, default=ModelsBenchSettings.shard_size)
    parser.add_argument("--gpus-per-actor", type=float, default=None)
    arguments = parser.parse_args(argv)
    settings = ModelsBenchSettings(num_images=arguments.images, source_size=(arguments.width, arguments.height),
                                   batch_size=arguments.batch_size, shard_size=arguments.shard_size,
                                   gpus_per_actor=arguments.gpus_per_actor)
    result = run_models_bench(settings, Path(arguments.output))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
