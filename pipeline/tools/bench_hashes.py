"""`featurize bench`'s figure for the content hashes (sha256, phash): the actor's work with and without them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def hash_cost(extractor, paths: list[Path], output: Path, pairs: int) -> dict:
    """What the content hashes cost: the actor's work (process_shard with the pipeline's model, no Ray around it)
    on the same images with `output.content_hashes` off and on, shard after shard, which goes first alternating, so
    a change in the shared machine's load hits both sides alike. Two ratios, pair by pair: wall-clock throughput,
    and CPU seconds of this process (decode threads and model), which other processes' load does not move: the
    throughput ratio wherever the work is CPU-bound. A decode thread a core, as a one-actor pipeline on this
    machine has them."""
    from pipeline.extract.items import DecodeSettings
    from pipeline.extract.worker import ShardSettings, ShardTask, process_shard

    uris = [str(path) for path in paths]
    task = ShardTask(0, 0, len(uris), uris=uris, labels=[None] * len(uris))
    spent: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for pair in range(pairs):
        for hashes in (False, True) if pair % 2 == 0 else (True, False):
            shard_settings = ShardSettings(output_uri=str(output), output_storage_options={},
                                           decode=DecodeSettings({}, content_hashes=hashes),
                                           decode_threads=os.cpu_count())
            wall, cpu = time.perf_counter(), time.process_time()
            process_shard(task, extractor, shard_settings)
            spent[hashes].append((time.perf_counter() - wall, time.process_time() - cpu))
    wall_ratios = [without[0] / with_hashes[0] for without, with_hashes in zip(spent[False], spent[True])]
    cpu_ratios = [without[1] / with_hashes[1] for without, with_hashes in zip(spent[False], spent[True])]
    return {"images": len(uris), "wall_ratios": wall_ratios, "cpu_ratios": cpu_ratios,
            "median_wall_ratio": float(np.median(wall_ratios)), "median_cpu_ratio": float(np.median(cpu_ratios)),
            "cpu_ms_per_image": {"with": 1000 * sum(cpu for _, cpu in spent[True]) / len(uris) / len(spent[True]),
                                 "without": 1000 * sum(cpu for _, cpu in spent[False]) / len(uris)
                                 / len(spent[False])}}
