"""`ray job stop` through the real Jobs CLI, on a local head with its dashboard (the Jobs API): the stopped extract
ends STOPPED with its commits kept, and the same job submitted again does only the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import (
    ROOT,
    committed_shards,
    free_port,
    read_rows,
    start_ray_head,
    stop_ray_processes,
    write_extract_config,
    write_labelled_images,
)
from tests.readers import reading

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))


def ray_job(address: str, *arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The Jobs CLI as a user runs it (token auth off, as on the test head)."""
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run([RAY, "job", *arguments[:1], "--address", address, *arguments[1:]], env=environment,
                          check=False, capture_output=True, text=True, timeout=timeout)


def job_status(address: str, submission_id: str) -> str:
    """`ray job status`'s verdict line ("Job 'x' was stopped", "... succeeded", "... failed")."""
    answer = ray_job(address, "status", submission_id)
    return (answer.stdout + answer.stderr).lower()


@pytest.fixture
def head_with_dashboard():
    temp_dir = Path(tempfile.mkdtemp(prefix="fzj"))
    port = free_port()
    try:
        start_ray_head(temp_dir, "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={port}")
        address = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while ray_job(address, "list").returncode != 0 and time.time() < deadline:  # the Jobs API is up
            time.sleep(1)
        yield address
    finally:
        stop_ray_processes(temp_dir)


def test_ray_job_stop_keeps_commits_and_the_resubmitted_job_does_the_rest(tmp_path, tiny_model,
                                                                          head_with_dashboard):
    address = head_with_dashboard
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=12)
    output = tmp_path / "features"
    config = write_extract_config(tmp_path / "config.json", tmp_path / "images", tiny_model, output,
                                  input=reading("Slow", seconds=0.5), run={"shard_size": 3, "actors": 0})
    # the job's code: featurize is installed; the test's reader comes from this checkout
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}})
    entrypoint = ["--runtime-env-json", runtime_env, "--", sys.executable, "-m", "pipeline.cli", "extract",
                  "--config", str(config)]

    submitted = ray_job(address, "submit", "--no-wait", "--submission-id", "extract-1", *entrypoint)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    deadline = time.time() + 240
    while committed_shards(output) < 1 and time.time() < deadline:
        assert "failed" not in job_status(address, "extract-1")
        time.sleep(0.2)
    stopped = ray_job(address, "stop", "extract-1")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "was stopped" in job_status(address, "extract-1")
    committed = committed_shards(output)
    assert 0 < committed < 8 and not (output / "_SUCCESS").exists()

    resubmitted = ray_job(address, "submit", "--submission-id", "extract-2", *entrypoint)
    assert resubmitted.returncode == 0, resubmitted.stdout[-3000:]
    assert "succeeded" in job_status(address, "extract-2")
    rows, success = read_rows(output)
    assert sorted(rows["uri"]) == sorted(map(str, paths))  # every image once
    assert success["shards"] == {"total": 8, "run": 8 - committed, "committed": 8}
