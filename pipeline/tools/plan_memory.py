"""Peak driver memory to plan a manifest, and to run one up to its first commit, each measured in a process of its
own (`featurize bench`, `featurize bench --scale`).

    python -m pipeline.tools.plan_memory NUM_ENTRIES
    python -m pipeline.tools.plan_memory first-commit MANIFEST MODEL OUTPUT SHARD_SIZE

The first prints the peak RSS in bytes before and after planning a Parquet manifest of NUM_ENTRIES URIs; the second
prints, as JSON, the driver's peak RSS and the seconds from the start of `run_extract` to its first commit (the run
is stopped there). A fresh interpreter, so that nothing the caller holds (TensorFlow, Ray, the bench's images)
counts towards the peak.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MANIFEST_BATCH = 1_000_000  # entries generated at a time: writing a 10M-entry manifest stays small too


def plan_memory(num_entries: int) -> dict:
    """Peak driver memory (RSS, whole process) to list and plan a manifest of `num_entries` URIs."""
    done = subprocess.run([sys.executable, "-m", "pipeline.tools.plan_memory", str(num_entries)], capture_output=True,
                          text=True, check=True)
    before, peak = (int(value) for value in done.stdout.split())
    return {"entries": num_entries, "peak_rss_bytes": peak, "peak_rss_before_plan_bytes": before}


def first_commit(manifest: str, model: str, output: str, shard_size: int) -> dict:
    """Driver peak RSS and seconds to the first commit of an extract over `manifest`, in a fresh process."""
    done = subprocess.run([sys.executable, "-m", "pipeline.tools.plan_memory", "first-commit", manifest, model,
                           output, str(shard_size)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the first-commit measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak RSS from /proc (VmHWM): getrusage's ru_maxrss survives exec, so a child started from
    a large parent would report the parent's peak."""
    with open("/proc/self/status") as status:
        return 1024 * int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))


def write_manifest(path: str, num_entries: int, real_uris: list[str] = ()) -> None:
    """A manifest shaped like a large archive's: zero-padded object keys in folders of 1,000, 1,000 labels; the
    first entries are `real_uris`, the others name objects that need not exist. Written a batch at a time."""
    schema = pa.schema([("uri", pa.string()), ("label", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(0, num_entries, MANIFEST_BATCH):
            indices = pa.array(range(first, min(first + MANIFEST_BATCH, num_entries)), pa.int64())
            padded = pc.utf8_lpad(pc.cast(indices, pa.string()), 9, "0")
            folders = pc.utf8_slice_codeunits(padded, 0, 5)
            uris = pc.binary_join_element_wise("s3://archive/images/", folders, "/", padded, ".jpg", "")
            if first < len(real_uris):
                real = pa.array(list(real_uris[first:first + len(indices)]), pa.string())
                uris = pa.concat_arrays([real, uris.slice(len(real))])
            remainders = pc.subtract(indices, pc.multiply(pc.divide(indices, 1000), 1000))  # integer division
            labels = pc.cast(remainders, pa.string())
            writer.write_table(pa.table({"uri": uris, "label": labels}, schema=schema))


def measure(num_entries: int) -> tuple[int, int]:
    """(peak RSS before planning, peak RSS after planning) of this process, in bytes."""
    from pipeline.config import ExtractConfig, InputConfig, ModelConfig, OutputConfig
    from pipeline.extract.plan import prepare_plan
    from pipeline.output.ledger import Ledger

    with tempfile.TemporaryDirectory() as scratch:
        write_manifest(f"{scratch}/manifest.parquet", num_entries)
        before = peak_rss_bytes()
        config = ExtractConfig(input=InputConfig(uri=(f"{scratch}/manifest.parquet",), labels="label"),
                               model=ModelConfig(weights="none"), output=OutputConfig(uri=f"{scratch}/out"))
        plan = prepare_plan(config.validate(), Ledger(config.output.uri))
        if plan.num_images != num_entries:
            raise AssertionError(f"planned {plan.num_images} images of {num_entries} manifest entries")
        return before, peak_rss_bytes()


class FirstCommit(Exception):  # noqa: N818 - not an error: the measurement's end
    """Raised from the progress reporter at the first commit: the measurement stops the run there."""


def measure_first_commit(manifest: str, model: str, output: str, shard_size: int) -> dict:
    from pipeline.config import ExtractConfig, InputConfig, ModelConfig, OutputConfig, RunConfig
    from pipeline.extract.driver import run_extract
    from pipeline.extract.progress import ProgressReporter

    phases: dict[str, float] = {}

    class StopAtFirstCommit(ProgressReporter):
        def phase(self, message: str) -> None:
            phases.setdefault(message.split(" ", 1)[0], time.time())
            super().phase(message)

        def shard_committed(self) -> None:
            raise FirstCommit

    config = ExtractConfig(input=InputConfig(uri=(manifest,), labels="label"),
                           model=ModelConfig(backbone=model, weights="none", top_k=0),
                           run=RunConfig(actors=1, shard_size=shard_size, batch_size=64),
                           output=OutputConfig(uri=output, mode="overwrite")).validate()
    started = time.time()
    try:
        run_extract(config, StopAtFirstCommit(False))
    except FirstCommit:
        pass
    else:
        raise AssertionError("the run ended without a commit")
    seconds = time.time() - started
    return {"peak_rss_bytes": peak_rss_bytes(), "seconds_to_first_commit": seconds,
            "planning_seconds": phases.get("starting", started) - started}


if __name__ == "__main__":
    if sys.argv[1] == "first-commit":
        print(json.dumps(measure_first_commit(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    else:
        print(*measure(int(sys.argv[1])))
