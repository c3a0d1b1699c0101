"""The prepared GPU benchmark: resnet50 and mobilenetv2, bare model vs pipeline on one GPU (< 5 minutes).

    python jobs/gpu_benchmark.py [--output results/gpu-bench]

Reports images/s for each, the pipeline/bare ratio, and how many CPU cores of decode keep the GPU fed.
Skips the slow one-image-at-a-time loop and the camera-size figures (they measure the CPU, not the GPU).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402

from pipeline.tools.bench import BenchSettings, run_bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="results/gpu-bench")
    parser.add_argument("--images", type=int, default=2048)
    arguments = parser.parse_args()
    console = Console()
    summary = {}
    for backbone, batch_size in (("resnet50", 128), ("mobilenetv2", 256)):
        settings = BenchSettings(backbone=backbone, batch_size=batch_size, num_images=arguments.images,
                                 bare_images=arguments.images, loop_images=0, camera_images=0, gpus_per_actor=1,
                                 manifest_entries=0)
        result = run_bench(settings, Path(arguments.output) / backbone, console)
        summary[backbone] = {key: result[key] for key in (
            "runtime", "bare_model_images_per_second", "pipeline_over_bare", "cores_to_feed_bare_model",
            "cpu_count")}
        summary[backbone]["pipeline_images_per_second"] = result["pipeline"]["images_per_second"]
    (Path(arguments.output) / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print_json(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
