"""Peak driver memory to list and plan a manifest, measured in a process of its own (`featurize bench`).

    python -m pipeline.tools.plan_memory NUM_ENTRIES

prints the peak RSS in bytes before and after planning a Parquet manifest of NUM_ENTRIES URIs. A fresh
interpreter, so that nothing the caller holds (TensorFlow, Ray, the bench's images) counts towards the peak.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq


def plan_memory(num_entries: int) -> dict:
    """Peak driver memory (RSS, whole process) to list and plan a manifest of `num_entries` URIs."""
    done = subprocess.run([sys.executable, "-m", "pipeline.tools.plan_memory", str(num_entries)], capture_output=True, text=True,
                          check=True)
    before, peak = (int(value) for value in done.stdout.split())
    return {"entries": num_entries, "peak_rss_bytes": peak, "peak_rss_before_plan_bytes": before}


def peak_rss_bytes() -> int:
    """This process's peak RSS from /proc (VmHWM): getrusage's ru_maxrss survives exec, so a child started from
    a large parent would report the parent's peak."""
    with open("/proc/self/status") as status:
        return 1024 * int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1))


def write_manifest(path: str, num_entries: int) -> None:
    """A manifest shaped like a large archive's: zero-padded object keys in folders of 1,000, 1,000 labels."""
    uris = pa.array([f"s3://archive/images/{index // 1000:05d}/{index:09d}.jpg" for index in range(num_entries)])
    labels = pa.array([str(index % 1000) for index in range(num_entries)])
    pq.write_table(pa.table({"uri": uris, "label": labels}), path)


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


if __name__ == "__main__":
    print(*measure(int(sys.argv[1])))
