"""Plain helpers shared by the tests: real files, configs, outputs, similarity and memory sampling.

Fixtures live in tests/conftest.py; a test module imports from here, never from another test module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import (
    ClassifierConfig,
    ExtractConfig,
    FeaturesConfig,
    SplitConfig,
    TrainConfig,
    TrainOutputConfig,
    load_config,
)
from pipeline.extract.plan import prepare
from pipeline.extract.rows import ShardRows, row_schema
from pipeline.io import storage
from pipeline.output import layout, ledger

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ROOT / "configs" / "labdog_classes.txt"
GIB = 1024**3
MIB = 1024**2

# Credentials of the loopback S3 server (moto): every S3 test looks for the secret where it must not be.
ACCESS_KEY_ID = "AKIAFEATURIZETESTKEY"
PLANTED_SECRET = "featurizePlantedSecret+9f3c1e7a5d42b0"  # AWS_SECRET_ACCESS_KEY of every test here


def plant_aws_credentials(patch, access_key_id: str, secret: str, nowhere: str) -> None:
    """AWS credentials as a user sets them on a pytest.MonkeyPatch: environment variables (no profile files, no
    instance metadata)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        patch.delenv(name, raising=False)
    patch.setenv("AWS_ACCESS_KEY_ID", access_key_id)
    patch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    patch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    patch.setenv("AWS_CONFIG_FILE", nowhere)


# --- input files ----------------------------------------------------------------------------------------


def write_labelled_images(root: Path, num_classes: int = 3, per_class: int = 10, size=(48, 40), seed: int = 0
                          ) -> list[Path]:
    """Real PNG/JPEG files in one folder per class; each class has its own colour so labels are learnable."""
    generator = np.random.default_rng(seed)
    paths = []
    for label in range(num_classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 31 + 160) % 256], np.float32)
        for index in range(per_class):
            noise = generator.normal(0, 25, (size[1], size[0], 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            path = folder / f"image_{index:03d}.{'png' if index % 2 else 'jpg'}"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


# --- configs and runs -----------------------------------------------------------------------------------


def write_extract_config(path: Path, images_uri: Path, model_path: Path, output_dir: Path, **sections) -> Path:
    """An extract config (JSON is YAML) at `path`; the dog model (.h5, not lambda.h5) gets its preprocessing and
    class names, other models run as saved. `sections` update the config's sections key by key."""
    is_dog_model = model_path.suffix == ".h5" and model_path.name != "lambda.h5"
    config = {
        "input": {"uri": str(images_uri)},
        "model": {"backbone": str(model_path), "weights": "none", "top_k": 3,
                  **({"preprocess": "tf", "class_names": str(CLASSES)} if is_dog_model else {})},
        "run": {"batch_size": 8, "shard_size": 16, "actors": 1},
        "output": {"uri": str(output_dir)},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(json.dumps(config))
    return path


def featurize_process(config: Path, **environment: str) -> subprocess.Popen:
    """`featurize extract` in a process group of its own, as a terminal runs a foreground command."""
    env = {**os.environ, **environment}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, cwd=ROOT)


def committed_shards(output: Path) -> int:
    commits = output / "_commits"
    return len(list(commits.glob("shard-*.json"))) if commits.exists() else 0


def wait_for_commits_beyond(count: int, output: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if committed_shards(output) > count:
            return
        time.sleep(0.1)
    raise AssertionError(f"no new commit (exit code {process.poll()}): {process.stderr.read()[-3000:]}")


# --- Ray heads a test starts itself (never `ray stop`: it kills every Ray on the machine) -------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ray_head(temp_dir: Path, *arguments: str, port: int | None = None, **environment: str) -> str:
    """`ray start --head` with its own temp dir and ports, token auth off (as a test cluster); returns the GCS
    address. Stop it with stop_ray_processes(temp_dir)."""
    port = port or free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **environment}
    env.pop("RAY_ADDRESS", None)
    command = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
               f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}", *arguments]
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
    return f"127.0.0.1:{port}"


def stop_ray_processes(temp_dir: Path) -> None:
    """Kill the processes of the Ray that runs under `temp_dir` (theirs alone: they name it)."""
    from pipeline.reaper import session_processes

    for _ in range(3):
        for pid in session_processes(str(temp_dir)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


# --- outputs --------------------------------------------------------------------------------------------


def read_rows(output: Path):
    """(every committed row of a local extract output as a DataFrame, its _SUCCESS document)."""
    success = json.loads((output / "_SUCCESS").read_text())
    table = pq.ParquetDataset([str(output / path) for path in success["files"]]).read()
    return table.to_pandas(), success


def make_rows(num_rows: int, dim: int) -> ShardRows:
    """Shard rows as the writer gets them: every third an error row."""
    rows = ShardRows()
    for index in range(num_rows):
        if index % 3 == 2:
            rows.add_error(f"img_{index}.jpg", None, "truncated image: cut short", 10, 20)
        else:
            rows.add_ok(f"img_{index}.jpg", "cat", 640, 480, np.full(dim, index, np.float32), ["a", "b"], [0.7, 0.2])
    return rows


def unfinished_output(tmp_path: Path) -> Path:
    """Plan of 3 shards over 9 real files; shard 0 committed with an error row, shard 1 only an orphan."""
    write_labelled_images(tmp_path / "images", num_classes=3, per_class=3)
    output = tmp_path / "out"
    config = load_config(ExtractConfig, None, [f"input.uri={tmp_path / 'images'}", f"output.uri={output}",
                                               "run.shard_size=3"])
    plan, _ = prepare(config)
    schema = row_schema(2, provenance={"backbone": "resnet50", "feature_dim": 2})
    name = layout.new_data_file_name(0)
    ledger.write_data_file(str(output), name, make_rows(3, 2).to_table(schema), 1024)
    ledger.write_data_file(str(output), layout.new_data_file_name(1), make_rows(3, 2).to_table(schema), 1024)
    ledger.write_commit(str(output), ledger.CommitRecord(0, [name], 3, 2, 1, errors_by_reason={"truncated image": 1}))
    return output


# --- train stage inputs: extract outputs in the writer's layout, without a backbone -------------------------

PROVENANCE = {
    "backbone": "mobilenetv2", "weights": "imagenet", "weights_sha256": "9f2d" * 16, "layer": "global_pool",
    "pooling": "avg", "input_size": "224", "preprocess": "tf", "feature_dim": "64", "keras": "3.15.1",
}
ERROR_REASON = "decode: truncated image"


@dataclasses.dataclass
class Digits:
    features: np.ndarray  # (n, 64) float32
    labels: list[str]
    uris: list[str]
    error_rows: frozenset[int]

    @property
    def ok(self) -> np.ndarray:
        return np.array([index not in self.error_rows for index in range(len(self.uris))])


def write_extract_output(output_uri: str, digits: Digits, rows=None, provenance=PROVENANCE, shard_size=400,
                         row_group_size=128, feature_dtype="float32", with_labels=True) -> str:
    """An extract output in the writer's layout: shard files, commit records, then `_SUCCESS`."""
    rows = range(len(digits.uris)) if rows is None else list(rows)
    schema = row_schema(digits.features.shape[1], feature_dtype, provenance)
    files, total_ok, total_error = [], 0, 0
    for shard, start in enumerate(range(0, len(rows), shard_size)):
        shard_rows = ShardRows()
        for index in rows[start:start + shard_size]:
            label = digits.labels[index] if with_labels else None
            if index in digits.error_rows:
                shard_rows.add_error(digits.uris[index], label, ERROR_REASON)
            else:
                shard_rows.add_ok(digits.uris[index], label, 8, 8, digits.features[index], [], [])
        path = layout.new_data_file_name(shard)
        ledger.write_data_file(output_uri, path, shard_rows.to_table(schema), row_group_size)
        num_error = shard_rows.status.count("error")
        ledger.write_commit(output_uri, ledger.CommitRecord(shard, [path], len(shard_rows),
                                                            len(shard_rows) - num_error, num_error))
        files.append(path)
        total_ok += len(shard_rows) - num_error
        total_error += num_error
    ledger.write_json(storage.join(output_uri, layout.SUCCESS_FILE), {
        "files": files, "rows": {"total": total_ok + total_error, "ok": total_ok, "error": total_error},
        "shards": {"total": len(files), "run": len(files)}, "fingerprint": "digits-test",
        "seconds": {"total": 1.0, "startup": 0.1}, "provenance": provenance,
    })
    return output_uri


def train_config(features_uri, output_uri, features=None, split=None, **classifier) -> TrainConfig:
    uris = (features_uri,) if isinstance(features_uri, str) else tuple(features_uri)
    return TrainConfig(features=FeaturesConfig(uri=uris, **(features or {})),
                       classifier=ClassifierConfig(**classifier), split=SplitConfig(**(split or {})),
                       output=TrainOutputConfig(uri=output_uri)).validate()



# --- similarity -----------------------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The cosine similarity of two arrays taken whole (as flat vectors)."""
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine similarity of each row of `a` with the same row of `b` (along the last axis)."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --- memory of a process tree ---------------------------------------------------------------------------


@dataclass
class MemorySample:
    seconds: float
    total: int  # sum of the RSS of every process in the tree (shared pages count once per process)
    total_pss: int | None  # sum of the PSS (shared pages split among their users): what the tree costs the
    # machine; None on ticks that read RSS only (PSS reads every process's smaps, slow for TensorFlow processes)
    driver: int  # RSS of the root process (the `featurize extract` driver)
    driver_pss: int | None  # PSS of the root process
    actors: dict[int, int]  # pid -> RSS of each ExtractorActor process
    commits: int  # shards committed so far (files under _commits)
    processes: list[tuple[str, int, int]]  # (name, RSS, PSS) of each process


@dataclass
class TreeMemory:
    """Samples the memory of this process and all its descendants (Ray's GCS, raylet, agents, workers, actors)."""

    commits_dir: Path | None = None
    interval: float = 0.2
    root_pid: int | None = None  # the process whose tree is sampled; None: this one
    pss_every: int = 1  # read PSS on every n-th tick; RSS (cheap) on every tick, so no actor goes unsampled
    samples: list[MemorySample] = field(default_factory=list)

    def __enter__(self) -> TreeMemory:
        import psutil  # ships with Ray (ray/thirdparty_files), importable once ray is imported

        self._psutil = psutil
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        psutil = self._psutil
        root = psutil.Process(self.root_pid)
        tick = 0
        while not self._stop.is_set():
            processes, actors = [], {}
            with_pss = tick % self.pss_every == 0
            tick += 1
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:  # the driver has exited
                break
            for process in tree:
                try:
                    memory = process.memory_full_info() if with_pss else process.memory_info()
                    name = " ".join(process.cmdline())[:80] or process.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                processes.append((name, memory.rss, memory.pss if with_pss else 0))
                if "ExtractorActor" in name:
                    actors[process.pid] = memory.rss
            commits = 0
            if self.commits_dir is not None and self.commits_dir.is_dir():
                commits = len(os.listdir(self.commits_dir))
            self.samples.append(MemorySample(
                time.perf_counter() - self._started, sum(rss for _, rss, _ in processes),
                sum(pss for _, _, pss in processes) if with_pss else None, processes[0][1] if processes else 0,
                processes[0][2] if processes and with_pss else None, actors, commits, processes))
            self._stop.wait(self.interval)

    @property
    def peak_total(self) -> int:
        return max(sample.total for sample in self.samples)

    @property
    def peak_total_pss(self) -> int:
        return max(sample.total_pss for sample in self.samples if sample.total_pss is not None)

    @property
    def peak_job_pss(self) -> int:
        """What the job costs the machine, whatever the root process held before it began: the PSS of every
        other process in the tree plus the root's growth since the first sample (the root is the test process
        when the job runs in-process, and earlier tests may have filled it)."""
        samples = [sample for sample in self.samples if sample.total_pss is not None]
        root_at_start = samples[0].driver_pss
        return max(sample.total_pss - root_at_start for sample in samples)

    @property
    def peak_driver(self) -> int:
        return max(sample.driver for sample in self.samples)

    @property
    def peak_actor(self) -> int:
        return max((rss for sample in self.samples for rss in sample.actors.values()), default=0)

    @property
    def num_actor_processes(self) -> int:
        return len({pid for sample in self.samples for pid in sample.actors})

    def breakdown_at_peak(self) -> str:
        peak = max(self.samples, key=lambda sample: sample.total)
        return "\n".join(f"  {rss / MIB:7.0f} MiB rss {pss / MIB:7.0f} MiB pss  {name}"
                         for name, rss, pss in sorted(peak.processes, key=lambda item: -item[1]))


def describe_memory(memory: TreeMemory) -> str:
    return (f"peak tree RSS {memory.peak_total / MIB:.0f} MiB (PSS {memory.peak_total_pss / MIB:.0f} MiB), "
            f"driver {memory.peak_driver / MIB:.0f} MiB, actor {memory.peak_actor / MIB:.0f} MiB, "
            f"{len(memory.samples)} samples")

