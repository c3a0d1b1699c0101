"""The engine under failure on real Ray clusters: lost nodes, a SIGKILLed driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.config import ExtractConfig, load_config
from pipeline.extract.driver import run_extract
from tests.helpers import write_labelled_images
from tests.readers import reading

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def extract_config(tmp_path: Path, model: Path, **run) -> dict:
    return {
        "input": {"uri": str(tmp_path / "images"), "labels": "from_dirs"},
        "model": {"backbone": str(model), "weights": "none", "top_k": 2},
        "run": {"batch_size": 16, "shard_size": 20, "decode_threads": 2, **run},
        "output": {"uri": str(tmp_path / "features")},
    }


def committed_rows(output: Path):
    success = json.loads((output / "_SUCCESS").read_text())
    table = pq.ParquetDataset([str(output / path) for path in success["files"]]).read()
    return table, success


def wait_for_commits(output: Path, count: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        commits = output / "_commits"
        if commits.exists() and len(list(commits.glob("shard-*.json"))) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {count} commits after {timeout} s")


@pytest.fixture
def three_node_cluster():
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_worker_node_removed_mid_run_loses_and_duplicates_nothing(tmp_path, tiny_model, three_node_cluster):
    cluster, workers = three_node_cluster
    paths = write_labelled_images(tmp_path / "images", num_classes=4, per_class=100, size=(40, 30))
    raw = extract_config(tmp_path, tiny_model, actors=3, cpus_per_actor=1, address=cluster.address)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps(raw))
    config = load_config(ExtractConfig, config_path)

    removed = []

    def remove_a_worker():
        wait_for_commits(tmp_path / "features", 2)
        cluster.remove_node(workers[0])
        removed.append(time.time())

    remover = threading.Thread(target=remove_a_worker, daemon=True)
    remover.start()
    success = run_extract(config)
    remover.join(timeout=60)
    assert removed, "the worker node was never removed"
    assert success["shards"]["run"] == 20

    table, success = committed_rows(tmp_path / "features")
    uris = table.column("uri").to_pylist()
    assert len(uris) == 400 and len(set(uris)) == 400
    assert set(uris) == {str(path) for path in paths}
    assert success["rows"] == {"total": 400, "ok": 400, "error": 0}
    assert success["shards"]["committed"] == success["shards"]["total"] == 20


def test_driver_sigkill_then_resume_does_only_the_rest(tmp_path, tiny_model):
    write_labelled_images(tmp_path / "images", num_classes=4, per_class=50, size=(40, 30))
    config_path = tmp_path / "config.yaml"
    config = extract_config(tmp_path, tiny_model, shard_size=10, actors=1)
    config["input"].update(reading("Slow", seconds=0.06))  # keep the run going long enough (2 threads, 10 images)
    config_path.write_text(json.dumps(config))
    output = tmp_path / "features"
    command = [sys.executable, "-m", "pipeline.cli", "extract", "--config", str(config_path)]
    ray.shutdown()
    driver = subprocess.Popen(command, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_commits(output, 1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (output / "_SUCCESS").exists()
    committed_before = len(list((output / "_commits").glob("shard-*.json")))
    assert committed_before < 20

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    table, success = committed_rows(output)
    uris = table.column("uri").to_pylist()
    assert len(uris) == 200 and len(set(uris)) == 200
    assert 0 < success["shards"]["run"] < success["shards"]["total"] == 20
    assert success["shards"]["run"] == 20 - committed_before

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert committed_rows(output)[1]["shards"]["run"] == 0
