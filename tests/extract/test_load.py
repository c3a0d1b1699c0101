"""Sustained load: thousands of small images through two actors, the memory of the whole process tree sampled."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests import images
from tests.helpers import GIB, MIB, TreeMemory, describe_memory, write_extract_config


def spilled_objects_so_far() -> tuple[int, int, int]:
    """(bytes, objects) the object store of this Ray cluster has spilled to disk since it started, across nodes,
    and the bytes it had to allocate on disk because shared memory was full (fallback allocation)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    address = ray.get_runtime_context().gcs_address  # this cluster's, even when other Rays run on the machine
    stats = get_memory_info_reply(get_state_from_address(address)).store_stats
    return stats.spilled_bytes_total, stats.spilled_objects_total, stats.object_store_bytes_fallback


@pytest.mark.slow
def test_8000_small_images_with_two_actors_bounded_memory_no_spilling_no_growth(tmp_path, ray_local, tiny_model):
    """40 shards of small images, as many commits as with 20,000 images in shards of 500 at 40% of the work: the
    driver's memory, spilling and each actor's growth over the last 75% of the commits are what is measured."""
    num_images, shard_size = 8_000, 200
    folder = tmp_path / "images"
    data = images.photo_bytes("PNG", 32, 32, seed=3)
    for index in range(num_images):
        if index % 1000 == 0:
            (folder / f"part_{index // 1000:02d}").mkdir(parents=True)
        (folder / f"part_{index // 1000:02d}" / f"image_{index:05d}.png").write_bytes(data)
    output = tmp_path / "features"
    config = write_extract_config(tmp_path / "config.yaml", folder, tiny_model, output,
                          run={"actors": 2, "cpus_per_actor": 1, "shard_size": shard_size, "batch_size": 64})
    spilled_before = spilled_objects_so_far()
    started = time.perf_counter()
    with TreeMemory(commits_dir=output / "_commits", interval=0.25, pss_every=4) as memory:
        assert main(["extract", "--config", str(config)]) == 0
    seconds = time.perf_counter() - started
    spilled_after = spilled_objects_so_far()
    success = json.loads((output / "_SUCCESS").read_text())
    uris = pq.ParquetDataset([str(output / path) for path in success["files"]]).read(columns=["uri"]).column("uri")

    num_shards = num_images // shard_size
    driver_at_start = memory.samples[0].driver
    growth = {}
    for pid in {pid for sample in memory.samples for pid in sample.actors}:
        series = [sample.actors[pid] for sample in memory.samples
                  if pid in sample.actors and sample.commits >= num_shards // 4]
        if len(series) >= 2:  # from 25% of the commits to the actor's last sample
            growth[pid] = (series[0], max(series[1:]))
    print(f"\nload: {num_images} images in {seconds:.1f} s ({num_images / seconds:.0f}/s); {describe_memory(memory)}; "
          f"job PSS {memory.peak_job_pss / MIB:.0f} MiB; "
          f"driver {driver_at_start / MIB:.0f} -> {memory.peak_driver / MIB:.0f} MiB; actor RSS at 25% -> end: "
          + ", ".join(f"{start / MIB:.0f} -> {end / MIB:.0f} MiB" for start, end in growth.values())
          + f"; spilled {spilled_after[0] - spilled_before[0]} bytes")

    assert success["rows"] == {"total": num_images, "ok": num_images, "error": 0}
    assert len(uris) == num_images and len(set(uris.to_pylist())) == num_images
    assert spilled_after == spilled_before  # nothing went to disk from the object store
    assert memory.peak_driver - driver_at_start < 256 * MIB
    assert memory.peak_actor < 1.5 * GIB
    # the job's own processes (RSS double counts TF's shared libraries), not what earlier tests left in this one
    assert memory.peak_job_pss < 3 * GIB, memory.breakdown_at_peak()
    assert len(growth) == 2, "both actors sampled from 25% to the end of the run"
    for at_quarter, at_end in growth.values():  # no memory growth per actor over the last 75% of the run
        assert at_end - at_quarter < max(64 * MIB, 0.1 * at_quarter), (at_quarter / MIB, at_end / MIB)
    assert seconds < 600  # generous: a run that stalls, not a speed
