"""`featurize extract` on an autoscaling Ray cluster: Ray's fake multinode provider runs the real autoscaler on this
machine, whose GPU node type (1 CPU + 1 fake GPU) starts at zero nodes. The head is started here with its own temp
dir and ports and stopped by killing only the processes that name that dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.reaper import session_processes
from tests.helpers import (
    featurize_process,
    free_port,
    read_rows,
    start_ray_head,
    stop_ray_processes,
    write_extract_config,
    write_labelled_images,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's head; its GPU nodes count up from ...00001


def cluster_config(gcs_address: str) -> dict:
    """A `ray up` cluster config for the fake multinode provider: head 1 CPU, GPU nodes 0..3."""
    return {
        "cluster_name": "featurize-test", "max_workers": 3, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_node": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3},
        },
        "head_node_type": "ray.head.default", "auth": {"ssh_user": "ubuntu"}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling_cluster():
    temp_dir = Path(tempfile.mkdtemp(prefix="fzr"))  # short: Ray's socket paths live under it
    config = temp_dir / "cluster.json"
    port = free_port()
    config.write_text(json.dumps(cluster_config(f"127.0.0.1:{port}")))
    try:
        address = start_ray_head(temp_dir, "--num-cpus=1", "--include-dashboard=false",
                                 f"--autoscaling-config={config}", port=port,
                                 RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        yield address, temp_dir
    finally:
        stop_ray_processes(temp_dir)


def ray_status(address: str) -> str:
    """`ray status` of the cluster, as its operator reads it (nodes by type, pending demands)."""
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run([str(Path(sys.executable).with_name("ray")), "status", f"--address={address}"],
                          env=environment, capture_output=True, text=True, timeout=60, check=False).stdout


def wait_for_status(address: str, holds, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    while not holds(status := ray_status(address)) and time.time() < deadline:
        time.sleep(1)
    assert holds(status), status
    return status


def gpu_nodes_active(status: str) -> bool:
    return "gpu_node" in status.split("Pending:")[0]


def run_featurize(tmp_path: Path, model: Path, address: str, num_images: int, **run) -> tuple[int, str, float]:
    """featurize extract as a user runs it against the cluster; (exit code, stderr, seconds)."""
    config = write_config(tmp_path, model, address, num_images, **run)
    started = time.time()
    process = featurize_process(config, RAY_AUTH_MODE="disabled")  # as the cluster runs (see start_ray_head)
    _, stderr = process.communicate(timeout=400)
    return process.returncode, stderr, time.time() - started


def write_config(tmp_path: Path, model: Path, address: str, num_images: int, **run) -> Path:
    per_class = num_images // 4
    if not (tmp_path / "images").exists():
        write_labelled_images(tmp_path / "images", num_classes=4, per_class=per_class, size=(40, 30))
    return write_extract_config(tmp_path / "config.json", tmp_path / "images", model, tmp_path / "features",
                                run={"address": address, "actors": 0, "batch_size": 32, **run})


def test_defaults_run_on_the_head_and_say_how_to_use_the_gpu_nodes(tmp_path, tiny_model, autoscaling_cluster):
    address, _ = autoscaling_cluster
    wait_for_status(address, lambda status: not gpu_nodes_active(status))  # GPU nodes another test used are gone
    code, stderr, _ = run_featurize(tmp_path, tiny_model, address, 40, shard_size=20)
    assert code == 0, stderr[-3000:]
    text = " ".join(stderr.split())
    assert "a fixed pool of 1 actor(s), 1 CPUs each" in text and "an autoscaler runs" in text, text[-3000:]
    assert "to use GPU nodes the autoscaler can add, set run.gpus_per_actor: 1 and run.max_actors" in text
    rows, success = read_rows(tmp_path / "features")
    assert len(rows) == 40 and rows["uri"].is_unique
    assert [actor["accelerator_ids"] for actor in success["actors"]] == [[]]
    assert success["actors"][0]["node_id"] == HEAD_NODE_ID and success["actors"][0]["images"] == 40


def test_two_gpus_per_actor_where_nodes_have_one_exits_2_naming_the_key(tmp_path, tiny_model, autoscaling_cluster):
    address, _ = autoscaling_cluster
    code, stderr, seconds = run_featurize(tmp_path, tiny_model, address, 8, gpus_per_actor=2)
    assert code == 2, stderr[-3000:]
    assert seconds < 90
    text = " ".join(stderr.split())
    assert "run.gpus_per_actor: each actor asks for 1 CPUs + 2 GPUs" in text, text[-3000:]
    assert "its autoscaler launched no node for it" in text and "Traceback" not in text


def test_elastic_pool_grows_onto_gpu_nodes_and_a_lost_node_loses_nothing(tmp_path, tiny_model,
                                                                        autoscaling_cluster):
    """1,600 images on up to 3 GPU actors: work waits for 3 (min_actors), so each node does some; then one GPU
    node is killed mid-run (its raylet SIGKILLed, as a preempted machine): nothing is lost or duplicated."""
    address, temp_dir = autoscaling_cluster
    config = write_config(tmp_path, tiny_model, address, 1600, shard_size=25, gpus_per_actor=1, min_actors=3,
                          max_actors=3, shards_in_flight_per_actor=1)
    output = tmp_path / "features"
    process = featurize_process(config, RAY_AUTH_MODE="disabled")
    try:
        wait_for_commits_from_nodes(3, output, process, timeout=300)
        killed = kill_a_gpu_node(temp_dir)
        _, stderr = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-3000:]
    text = " ".join(stderr.split())
    assert "an elastic pool of 3..3 actor(s), 1 CPUs + 1 GPUs each (run.max_actors; no GPU" in text, text[-3000:]

    rows, success = read_rows(output)
    images = sorted(str(path) for path in (tmp_path / "images").rglob("*.*"))
    assert len(images) == 1600 and sorted(rows["uri"]) == images  # every image once
    assert success["rows"] == {"total": 1600, "ok": 1600, "error": 0}
    actors = success["actors"]
    assert sum(actor["images"] for actor in actors) == 1600
    gpu_nodes = {actor["node_id"] for actor in actors}
    assert len(gpu_nodes) >= 3 and HEAD_NODE_ID not in gpu_nodes and killed in gpu_nodes
    assert all(actor["accelerator_ids"] == ["0"] for actor in actors)  # one fake GPU a node
    assert "actor lost" in text  # the killed node's piece was retried
    # the request is cleared: the autoscaler is free to scale the GPU group down
    wait_for_status(address, lambda status: "From request_resources:\n (none)" in status, timeout=30)


def wait_for_commits_from_nodes(count: int, output: Path, process: subprocess.Popen, timeout: float) -> None:
    """Until committed shards were written on `count` nodes (the actors named in the commit records): on a loaded
    machine one node's first piece may come after the others' second."""
    deadline = time.time() + timeout
    nodes: set[str] = set()
    while time.time() < deadline and process.poll() is None:
        for path in (output / "_commits").glob("shard-*.json"):
            with contextlib.suppress(OSError, ValueError):  # a record being written
                nodes.update(piece["node_id"] for piece in json.loads(path.read_text())["actors"])
        if len(nodes) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"commits from {len(nodes)} of {count} nodes (exit code {process.poll()})")


def kill_a_gpu_node(temp_dir: Path) -> str:
    """SIGKILL the raylet of the first GPU node and the workers it started (its actor among them), as a preempted
    machine goes; returns the node's id."""
    for pid in session_processes(str(temp_dir)):
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        node_ids = [argument.split("=", 1)[1] for argument in arguments if argument.startswith("--node_id=")]
        if arguments[0].endswith("raylet") and node_ids and node_ids[0] != HEAD_NODE_ID:
            for child in children(pid):
                os.kill(child, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
            return node_ids[0]
    raise AssertionError("no GPU node's raylet found")


def children(parent: int) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(name))
    return found
