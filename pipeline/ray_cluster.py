"""Joining or starting Ray, for every stage that runs on it (extract's actor pool, analyse's kNN actors).

Below the stages in the import order: it knows Ray and redaction, nothing of extract or analyse.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import ray

from pipeline.io import redaction


@dataclass(frozen=True)
class Connection:
    description: str  # what was done, for the progress display
    private: bool  # a Ray this process started: no autoscaler, what it holds now is all it will hold


def connect(address: str, verbose: bool = False) -> Connection:
    """Join the cluster `run.address` or the Ray job names; otherwise start a private local Ray. Never
    `ray.init()` without an address: it attaches to whatever Ray already runs on the machine. Returns what
    it did. Ray's and the actors' logs stay in Ray's log files unless `verbose`.

    A private Ray's processes share the driver's fate (pipeline/reaper.py), a killed driver's included."""
    if ray.is_initialized():
        return Connection("using the Ray already initialised in this process", private=False)
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
    if address:
        ray.init(address=address, **quiet)
        return Connection(f"joined the Ray cluster at {redaction.redact(address)}", private=False)
    if os.environ.get("RAY_ADDRESS"):  # set by `ray job submit`: the job's own cluster
        ray.init(**quiet)
        return Connection(f"joined this Ray job's cluster ({redaction.redact(os.environ['RAY_ADDRESS'])})",
                          private=False)
    ray.init(address="local", include_dashboard=False, **quiet)
    reap_with_this_process(ray._private.worker.global_worker.node.get_session_dir_path())
    return Connection(f"started a private local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)",
                      private=True)


def forwarded_environment() -> dict:
    """The driver's FEATURIZE_* variables (settings such as FEATURIZE_CACHE_DIR), for the runtime_env of the actors
    every stage starts, so they reach actors on every node."""
    variables = {key: value for key, value in os.environ.items() if key.startswith("FEATURIZE_")}
    return {"env_vars": variables} if variables else {}


REAPERS: list[subprocess.Popen] = []  # held for the life of the process: their pipes close only when it ends


def reap_with_this_process(session_dir: str) -> None:
    """Start the reaper of a private Ray's session: it kills what is left of it once this process is gone."""
    if not os.path.isdir("/proc"):  # Linux only; elsewhere Ray's own fate sharing is what there is
        return
    reaper = subprocess.Popen([sys.executable, "-m", "pipeline.reaper", session_dir], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, start_new_session=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
    reaper.stdout.readline()  # it has noted Ray's processes
    REAPERS.append(reaper)
