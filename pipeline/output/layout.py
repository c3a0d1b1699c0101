"""Names inside an output directory, shared by every stage that writes one (extract, predict) and its readers.

Layout of an output directory (paths relative to it):
    _plan.json                  fingerprint and what the stage needs to resume; written once, reused on resume
    _manifest.parquet           extract only: the frozen listing (uri, label); shard i is rows [i*size, (i+1)*size)
    data/shard-00042-<id>.parquet   one uniquely named file per attempt (never overwritten)
    _commits/shard-00042.json   the commit record naming the data file(s) of shard 42
    _SUCCESS                    JSON summary written after every shard committed
    _LEASE                      the lease of the run writing the output now (pipeline/output/lease.py)
"""

from __future__ import annotations

import uuid

DATA_DIR = "data"
COMMITS_DIR = "_commits"
SUCCESS_FILE = "_SUCCESS"
PLAN_FILE = "_plan.json"
MANIFEST_FILE = "_manifest.parquet"
METRICS_FILE = "metrics.json"  # what `featurize train` writes last: its output is complete


def new_data_file_name(shard_index: int, run_tag: str = "") -> str:
    """Unique per attempt, so two attempts of one shard never touch the same object. `run_tag` (the lease's
    short run id) marks the files of one run, which ledger.remove_orphans may delete however new they are."""
    attempt = f"{run_tag}-{uuid.uuid4().hex[:12]}" if run_tag else uuid.uuid4().hex[:12]
    return f"{DATA_DIR}/shard-{shard_index:05d}-{attempt}.parquet"


def commit_path(shard_index: int) -> str:
    return f"{COMMITS_DIR}/shard-{shard_index:05d}.json"
