"""Names inside an output directory, shared by every stage that writes one (extract, predict) and its readers.

Layout of an output directory (paths relative to it):
    _plan.json                  fingerprint and what the stage needs to resume; written once, reused on resume
                                (extract: rewritten once per `output.mode: append`, adding a generation)
    _manifest.parquet           extract only: the frozen listing (uri, label) of generation 0
    _manifest-g0001.parquet     extract only: the images generation 1 (the first append) added, and so on
    _manifest-p00001.parquet    extract only: a generation's further parts (`_manifest-g0001-p00001.parquet`...):
                                a listing is frozen as it streams, in parts of whole shards (extract/parts.py)
    data/shard-00042-<id>.parquet   one uniquely named file per attempt (never overwritten)
    _commits/shard-00042.json   the commit record naming the data file(s) of shard 42
    _commits/compacted-<id>.json  many commit records in one object (output/ledger.py compacts them)
    _SUCCESS                    JSON summary written after every shard committed
    _LEASE                      the lease of the run writing the output now (pipeline/output/lease.py)

Generations (extract). `output.mode: append` lists the input again and freezes the images no earlier generation
holds (by uri) as a new generation: its manifest file, then `_plan.json` rewritten with one more entry in
`generations` (last, so a generation exists once the plan names it; a manifest file the plan does not name is
left by a crash and overwritten by the next append). `_plan.json`:
    fingerprint, fingerprint_inputs, shard_size   shared by every generation (an append must match them)
    num_images                  generation 0's count, as before generations existed (an older featurize resumes it)
    generations                 [{manifest, num_images, shard_offset, created}], in order; absent in outputs written
                                before append existed, which read as one generation 0 of `num_images`
Shard numbers continue across generations: generation g's shard j is shard `shard_offset + j`, its rows are rows
[j*size, (j+1)*size) of that generation's manifest, so data files and commit records keep their names and form,
and `_SUCCESS` lists the files of every generation (readers still see one dataset).
"""

from __future__ import annotations

import time
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


def manifest_file(generation: int) -> str:
    """The frozen listing of one generation: generation 0 keeps the name it had before generations existed."""
    return MANIFEST_FILE if generation == 0 else f"_manifest-g{generation:04d}.parquet"


def manifest_part_file(generation: int, part: int) -> str:
    """Part `part` of a generation's frozen listing: part 0 is the generation's manifest file itself."""
    first = manifest_file(generation)
    return first if part == 0 else first.removesuffix(".parquet") + f"-p{part:05d}.parquet"


def compacted_commits_path() -> str:
    """A new object of compacted commit records (unique: a crash between writing it and removing what it replaced
    leaves two objects holding the same records, which readers merge)."""
    return f"{COMMITS_DIR}/compacted-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"


def commit_path(shard_index: int) -> str:
    return f"{COMMITS_DIR}/shard-{shard_index:05d}.json"
