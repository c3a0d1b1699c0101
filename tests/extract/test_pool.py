"""The actor pool on plain Ray: requests a private Ray can never meet, its processes' lifetime, actors accounted for
(two fake GPUs on one node), and features that are not finite."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from pipeline.cli import main
from pipeline.output import ledger
from tests.helpers import featurize_process, read_rows, write_extract_config, write_labelled_images

pytestmark = pytest.mark.ray


def test_a_fixed_and_an_elastic_pool_together_are_a_config_error(tmp_path, tiny_model, capsys):
    write_labelled_images(tmp_path / "images", num_classes=1, per_class=2)
    config = write_extract_config(tmp_path / "config.json", tmp_path / "images", tiny_model, tmp_path / "out",
                                  run={"actors": 2, "max_actors": 4})
    assert main(["extract", "--config", str(config)]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "run.actors: 2 asks for a fixed pool and run.max_actors: 4 for an elastic one" in message


# --- a private Ray: what can never be placed, and nothing of it outlives the driver -------------------------


def marked_processes(marker: str) -> list[int]:
    """Processes whose environment carries `marker`: the driver started with it and every Ray process it started
    (environments are inherited)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{name}/environ").read_bytes():
                found.append(int(name))
        except OSError:
            continue
    return found


def wait_until_gone(marker: str, timeout: float = 15.0) -> list[int]:
    deadline = time.time() + timeout
    while (left := marked_processes(marker)) and time.time() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_a_gpu_on_a_private_cpu_ray_exits_2_at_once_and_a_killed_driver_leaves_no_ray(tmp_path, tiny_model):
    write_labelled_images(tmp_path / "images", num_classes=1, per_class=4)
    marker = f"FEATURIZE_PROCESS_MARK={uuid.uuid4().hex}"  # names this test's processes; featurize ignores it
    name, value = marker.split("=")
    config = write_extract_config(tmp_path / "gpu.json", tmp_path / "images", tiny_model, tmp_path / "out",
                                  run={"actors": 0, "gpus_per_actor": 1})
    started = time.time()
    process = featurize_process(config, **{name: value})
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr[-3000:]
    assert time.time() - started < 30
    text = " ".join(stderr.split())
    assert "run.gpus_per_actor: each actor asks for" in text and "no autoscaler adds nodes" in text, text[-2000:]
    assert wait_until_gone(marker) == []

    # SIGKILL the driver alone while its actor loads the model: its private Ray goes with it
    config = write_extract_config(tmp_path / "cpu.json", tmp_path / "images", tiny_model, tmp_path / "out")
    process = featurize_process(config, **{name: value})
    deadline = time.time() + 120
    while "loading the model" not in (line := process.stderr.readline()) and time.time() < deadline:
        assert line, "the driver ended before loading the model"
    assert len(marked_processes(marker)) > 3  # the driver, Ray's GCS, raylet, agents, the actor
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert wait_until_gone(marker) == []


# --- two actors on one node with two fake GPUs --------------------------------------------------------------


@pytest.fixture
def two_gpu_node():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_two_actors_on_two_fake_gpus_record_different_accelerator_ids(tmp_path, tiny_model, two_gpu_node, capsys):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=20)
    output = tmp_path / "out"
    config = write_extract_config(tmp_path / "config.json", tmp_path / "images", tiny_model, output,
                                  run={"address": two_gpu_node.address, "actors": 0, "shard_size": 5,
                                       "cpus_per_actor": 1, "gpus_per_actor": 1, "min_actors": 2,
                                       "max_actors": 2})  # work starts once both are ready: both get some
    assert main(["extract", "--config", str(config)]) == 0
    rows, success = read_rows(output)
    assert sorted(rows["uri"]) == sorted(map(str, paths))
    actors = success["actors"]
    assert len(actors) == 2 and len({actor["node_id"] for actor in actors}) == 1
    assert sorted(tuple(actor["accelerator_ids"]) for actor in actors) == [("0",), ("1",)]
    assert sum(actor["images"] for actor in actors) == 40 and sum(actor["shards"] for actor in actors) == 8

    writers = {actor["actor"]: actor for actor in actors}
    for path in success["files"]:  # each data file names the node and the GPUs of the actor that wrote it
        metadata = ledger.read_file_metadata(str(output), path)
        writer = writers[metadata["actor"]]
        assert metadata["node_id"] == writer["node_id"]
        assert json.loads(metadata["accelerator_ids"]) == writer["accelerator_ids"]
    assert "node_id" not in success["provenance"]

    # three actors of one GPU each where two fit: feasible but never placed, so run.start_timeout ends it (exit 3)
    config = write_extract_config(tmp_path / "three.json", tmp_path / "images", tiny_model, tmp_path / "three",
                                  run={"address": two_gpu_node.address, "actors": 0, "cpus_per_actor": 1,
                                       "gpus_per_actor": 1, "min_actors": 3, "max_actors": 3, "start_timeout": 40})
    capsys.readouterr()
    assert main(["extract", "--config", str(config)]) == 3
    message = " ".join(capsys.readouterr().err.split())
    assert "2 of the 3 actor(s) needed were placed and ready within run.start_timeout (40 s)" in message, \
        message[-2000:]
    assert re.search(r"waiting 3\d s for 1 more actor\(s\) of 1 CPUs \+ 1 GPUs to be placed", message)  # every 30 s
    assert "pending demand: 1 more actor(s) of 1 CPUs + 1 GPUs" in message

    console = Console(record=True, width=200)
    from pipeline.tools.report import inspect_output

    summary = inspect_output(str(output), console)
    assert summary["actors"] == actors
    shown = console.export_text()
    assert "accelerator_ids" in shown and writers[actors[0]["actor"]]["node_id"][:12] in shown


# --- non-finite features --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exponential_model(tmp_path_factory) -> Path:
    """A saved model whose features are exp(mean pixel) per channel: finite for dark images, beyond float16 for
    dim ones (exp(20)), inf for bright ones (exp(200)). Built-in layers only, so safe mode loads it."""
    import keras

    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1.0)(inputs))
    features = keras.layers.Activation("exponential", name="features")(pooled)
    outputs = keras.layers.Dense(2, activation="softmax")(features)
    path = tmp_path_factory.mktemp("models") / "exponential.keras"
    keras.Model(inputs, outputs).save(path)
    return path


def write_flat_images(folder: Path, value: int, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{value:03d}_{index}.png" for index in range(count)]
    for path in paths:
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
    return paths


@pytest.mark.slow
def test_non_finite_features_become_error_rows_and_an_all_non_finite_shard_fails(tmp_path, ray_local,
                                                                                 exponential_model, capsys):
    images = tmp_path / "images"
    _, dim, bright = (write_flat_images(images / name, value, 3)
                         for name, value in (("dark", 5), ("dim", 20), ("bright", 200)))
    model = {"layer": "features", "preprocess": "none", "top_k": 1}
    for dtype, expected_errors in (("float32", bright), ("float16", dim + bright)):
        output = tmp_path / dtype
        config = write_extract_config(tmp_path / f"{dtype}.json", images, exponential_model, output, model=model,
                                      run={"shard_size": 9, "max_error_rate": 1.0},
                                      output={"feature_dtype": dtype})
        assert main(["extract", "--config", str(config)]) == 0
        rows, success = read_rows(output)
        assert len(rows) == 9 and rows["uri"].is_unique
        errors = rows[rows["status"] == "error"]
        assert sorted(errors["uri"]) == sorted(map(str, expected_errors))
        assert all(reason.startswith("non-finite features") for reason in errors["error"])
        assert success["errors_by_reason"] == {"non-finite features": len(expected_errors)}
        ok = np.stack(rows[rows["status"] == "ok"]["features"].to_numpy()).astype(np.float64)
        assert np.isfinite(ok).all() and np.allclose(ok[:3], np.exp(5.0), rtol=1e-2)

    config = write_extract_config(tmp_path / "bright.json", images / "bright", exponential_model,
                                  tmp_path / "bright", model=model, run={"max_attempts": 2})
    capsys.readouterr()
    assert main(["extract", "--config", str(config)]) == 3  # a broken model or GPU is a failure, not bad input
    message = " ".join(capsys.readouterr().err.split())
    assert "failed 2 times" in message and "gave non-finite features" in message
    assert not (tmp_path / "bright" / "_SUCCESS").exists()
