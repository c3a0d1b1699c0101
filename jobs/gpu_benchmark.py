"""The prepared GPU benchmark (< 10 minutes on one GPU):

1. backbones: resnet50 and mobilenetv2, bare model vs pipeline (images/s, the pipeline/bare ratio, and how many
   CPU cores of decode keep the GPU fed);
2. models: one decode feeding two models (extract's `models:`: resnet50 at 224 and mobilenetv2 at 160) against
   one extract per model, on 1600x1200 JPEGs: wall seconds of each, their ratio, and the smallest cosine between
   each model's features in the two outputs (pipeline/tools/bench_models.py).

    python jobs/gpu_benchmark.py [--output results/gpu-bench] [--part all|backbones|models]
    python jobs/gpu_benchmark.py --dry-run     # where no GPU is: the models part on CPU, on a few small images

Skips the slow one-image-at-a-time loop and the camera-size figures of `featurize bench` (they measure the CPU).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402

from pipeline.tools.bench import BenchSettings, run_bench  # noqa: E402
from pipeline.tools.bench_models import ModelsBenchSettings, run_models_bench  # noqa: E402

TWO_MODELS = (("resnet50", 224, "stretch"), ("mobilenetv2", 160, "center_crop"))


def backbones(images: int, output: Path, console: Console) -> dict:
    summary = {}
    for backbone, batch_size in (("resnet50", 128), ("mobilenetv2", 256)):
        settings = BenchSettings(backbone=backbone, batch_size=batch_size, num_images=images, bare_images=images,
                                 loop_images=0, camera_images=0, gpus_per_actor=1, manifest_entries=0)
        result = run_bench(settings, output / backbone, console)
        summary[backbone] = {key: result[key] for key in (
            "runtime", "bare_model_images_per_second", "pipeline_over_bare", "cores_to_feed_bare_model",
            "cpu_count")}
        summary[backbone]["pipeline_images_per_second"] = result["pipeline"]["images_per_second"]
    return summary


def models(settings: ModelsBenchSettings, output: Path, console: Console) -> dict:
    result = run_models_bench(settings, output / "models", console.log)
    return {key: result[key] for key in ("single_seconds", "single_seconds_total", "models_seconds",
                                         "models_over_singles", "smallest_cosine", "load_average_1_5_15")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="results/gpu-bench")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--part", choices=("all", "backbones", "models"), default="all")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: the models part on CPU with 8 small images (checks the script's code paths)")
    arguments = parser.parse_args()
    console = Console()
    output = Path(arguments.output)
    summary = {}
    if arguments.dry_run:
        settings = ModelsBenchSettings(networks=(("mobilenetv2", 96, "stretch"), ("mobilenetv2", 64, "center_crop")),
                                       num_images=8, source_size=(320, 240), batch_size=8, shard_size=4,
                                       gpus_per_actor=0)
        summary["models"] = models(settings, output, console)
    else:
        if arguments.part in ("all", "backbones"):
            summary["backbones"] = backbones(arguments.images, output, console)
        if arguments.part in ("all", "models"):
            settings = ModelsBenchSettings(networks=TWO_MODELS, num_images=min(arguments.images, 1024),
                                           batch_size=128, shard_size=256, gpus_per_actor=1)
            summary["models"] = models(settings, output, console)
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print_json(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
