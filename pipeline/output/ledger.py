"""The output ledger: plan file, commit records, orphans and `_SUCCESS`, one code path for every stage that writes.

Extract and predict write the same way (names in pipeline/output/layout.py): the plan file is written once, after
what it names, and a rerun resumes from it unless its fingerprint differs; each attempt at a shard writes a uniquely
named data file; a shard counts only once its commit record names the file; data files no record names are orphans,
removed at the end; `_SUCCESS` is written last, with the file list readers take. Commit records are written by the
run holding the output's lease alone, one object write each, so the protocol needs no rename and works the same on
object stores.

Compaction keeps a resume or finish over 100k shards to a few reads: every COMPACT_EVERY commits the run writes
the records since the last compaction as one `compacted-*.json` object, then deletes their single records (one bulk
request on object stores); when MAX_COMPACTED objects pile up, or at finish with more than FINISH_COMPACTS_ABOVE
objects, everything is folded into one. The compacted object is written before anything it replaces is deleted, so
a crash in between leaves the same record twice, which readers merge.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.io import redaction, storage
from pipeline.output import lease
from pipeline.output.layout import (
    COMMITS_DIR,
    DATA_DIR,
    PLAN_FILE,
    SUCCESS_FILE,
    commit_path,
    compacted_commits_path,
    new_data_file_name,
)

COMPACT_EVERY = 1000  # single commit records folded into one compacted object
MAX_COMPACTED = 16  # compacted objects before they are folded into one
FINISH_COMPACTS_ABOVE = 64  # commit objects above which finish folds them all into one
READ_THREADS = 16  # single commit records read at once


@dataclass
class CommitRecord:
    shard: int
    files: list[str]
    rows: int
    ok: int
    error: int
    timings: dict = field(default_factory=dict)  # seconds per stage: fetch, decode, forward, write (extract)
    errors_by_reason: dict = field(default_factory=dict)
    committed_at: float = 0.0  # the committing run's wall clock (epoch seconds): steady-state throughput in benchmarks
    actors: list = field(default_factory=list)  # per piece: actor, node_id, accelerator_ids, images, seconds


def write_commit(output_uri: str, record: CommitRecord, storage_options: dict | None = None) -> None:
    data = json.dumps(asdict(record), sort_keys=True).encode()
    storage.write_bytes(storage.join(output_uri, commit_path(record.shard)), data, storage_options)


def read_commits(output_uri: str, storage_options: dict | None = None) -> dict[int, CommitRecord]:
    """Every commit record in the output, by shard index."""
    return read_commit_objects(output_uri, storage_options).records


@dataclass
class CommitObjects:
    records: dict[int, CommitRecord]
    compacted: list[str]  # compacted objects, relative to the output
    singles: list[int]  # shards whose single record object exists


def read_commit_objects(output_uri: str, storage_options: dict | None = None) -> CommitObjects:
    """The compacted objects, then only the single records they do not already hold (read in parallel)."""
    names = storage.list_names(storage.join(output_uri, COMMITS_DIR), storage_options)
    compacted = [f"{COMMITS_DIR}/{name}" for name in names if name.startswith("compacted-") and name.endswith(".json")]
    records = {}
    for path in compacted:
        for data in read_json(storage.join(output_uri, path), storage_options)["records"]:
            records[data["shard"]] = CommitRecord(**data)
    singles = [int(name[len("shard-"):-len(".json")]) for name in names
               if name.startswith("shard-") and name.endswith(".json")]
    unread = [shard for shard in singles if shard not in records]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for data in pool.map(lambda shard: read_json(storage.join(output_uri, commit_path(shard)), storage_options),
                             unread):
            records[data["shard"]] = CommitRecord(**data)
    return CommitObjects(records, compacted, singles)


def remove_orphans(output_uri: str, commits: dict[int, CommitRecord], storage_options: dict | None = None,
                   written_before: float | None = None, run_tag: str = "") -> int:
    """Delete data files no commit record names (left by crashed or duplicate attempts).

    Under the output's lease (pipeline/output/lease.py), `written_before` is the lease's own modification time on the
    store's clock: only files no newer than that, or named with this run's `run_tag`, are deleted, so a file that
    an actor of another run (one that lost the lease, but whose workers still write) wrote since is never touched.
    Without it every file no record names is deleted."""
    named = {path for record in commits.values() for path in record.files}
    directory = storage.join(output_uri, DATA_DIR)
    fenced = written_before is not None or bool(run_tag)
    if fenced:
        candidates = storage.modified_times(directory, storage_options)
    else:
        candidates = dict.fromkeys(storage.list_names(directory, storage_options))

    def removable(name: str, modified: float | None) -> bool:
        if f"{DATA_DIR}/{name}" in named:
            return False
        ours = bool(run_tag) and f"-{run_tag}-" in name
        older = written_before is not None and modified is not None and modified <= written_before
        return not fenced or ours or older

    orphans = [name for name, modified in candidates.items() if removable(name, modified)]
    for name in orphans:
        storage.remove(storage.join(output_uri, DATA_DIR, name), storage_options)
    return len(orphans)


def write_json(uri: str, document: dict, storage_options: dict | None = None) -> None:
    storage.write_bytes(uri, json.dumps(document, indent=2, sort_keys=True).encode(), storage_options)


def read_json(uri: str, storage_options: dict | None = None) -> dict:
    return json.loads(storage.read_bytes(uri, storage_options))


def write_data_file(output_uri: str, relative_path: str, table: pa.Table, row_group_size: int,
                    storage_options: dict | None = None) -> int:
    """Write one Parquet file in a single object write; returns its size in bytes."""
    buffer = io.BytesIO()
    # no statistics for the features column: no reader prunes on them, and their min/max cost a fifth of the write
    statistics = [name for name in table.column_names if name != "features"]
    pq.write_table(table, buffer, row_group_size=row_group_size, use_dictionary=["uri", "label", "status"],
                   compression="zstd", write_statistics=statistics)
    data = buffer.getvalue()
    storage.write_bytes(storage.join(output_uri, relative_path), data, storage_options)
    return len(data)


def read_file_schema(output_uri: str, relative_path: str, storage_options: dict | None = None) -> pa.Schema:
    """Schema of one data file, reading only its footer."""
    fs, path = storage.filesystem(storage.join(output_uri, relative_path), storage_options)
    with fs.open(path, "rb") as handle:
        return pq.read_schema(handle)


def read_file_metadata(output_uri: str, relative_path: str, storage_options: dict | None = None) -> dict[str, str]:
    """The provenance key-value metadata of one data file."""
    metadata = read_file_schema(output_uri, relative_path, storage_options).metadata or {}
    return {key.decode(): value.decode() for key, value in metadata.items()}


def success_if_finished(output_uri: str, storage_options: dict | None = None) -> dict | None:
    """The `_SUCCESS` of any featurize output, or None while there is none (unfinished, or no output at all)."""
    uri = storage.join(output_uri, SUCCESS_FILE)
    return read_json(uri, storage_options) if storage.exists(uri, storage_options) else None


def read_success(output_uri: str, storage_options: dict | None = None, key: str = "features.uri") -> dict:
    """The `_SUCCESS` of a finished extract output; a ConfigError naming `key` says why there is none:
    nothing at that URI, something that is not a featurize output, or a run that has not finished."""
    uri = storage.join(output_uri, SUCCESS_FILE)
    if storage.exists(uri, storage_options):
        return read_json(uri, storage_options)
    shown = redaction.redact(output_uri)
    if storage.exists(storage.join(output_uri, PLAN_FILE), storage_options):
        raise ConfigError(f"{key}: {shown} has no {SUCCESS_FILE}: its extract job has not finished (run the same "
                          "`featurize extract` again to resume it)")
    if storage.exists(output_uri, storage_options):
        raise ConfigError(f"{key}: {shown} is not a featurize extract output (no {PLAN_FILE}); give the "
                          "output.uri of a `featurize extract` run")
    raise ConfigError(f"{key}: {shown} does not exist; give the output.uri of a finished `featurize extract` run")


def read_provenance(output_uri: str, storage_options: dict | None = None) -> dict[str, str]:
    """The provenance recorded in `_SUCCESS` (the same key-value metadata every data file carries)."""
    return dict(read_success(output_uri, storage_options).get("provenance", {}))


def fingerprint_differences(frozen: dict, fingerprint: str, inputs: dict) -> list[str]:
    """'key: old -> new' for every fingerprint input that changed since the plan was frozen; a plan that
    records only its digest is compared by digest."""
    recorded = frozen.get("fingerprint_inputs")
    if recorded is None:
        planned = frozen.get("fingerprint")
        return [] if planned == fingerprint else [f"fingerprint: {planned!r} -> {fingerprint!r}"]
    # A key the frozen plan lacks was added by a later featurize: the older run did not record it.
    return [f"{key}: {recorded[key]!r} -> {value!r}" for key, value in inputs.items()
            if key in recorded and recorded[key] != value]


class Ledger:
    """The ledger of one output for one run: open (mode, fingerprint), commit shard by shard, finish (`_SUCCESS`).

    With a lease (see `held`), every commit, the orphan removal and `_SUCCESS` are fenced by it; without one
    (planning in tests and tools) nothing is fenced."""

    def __init__(self, output_uri: str, storage_options: dict | None = None,
                 output_lease: lease.Lease | None = None, started: float | None = None, key: str = "output.uri"):
        self.output = output_uri
        self.options = storage_options
        self.lease = output_lease
        self.key = key  # the config key or option that named the output, for messages
        self.started = started if started is not None else time.time()
        self.commits: dict[int, CommitRecord] = {}
        self.compacted: list[str] = []  # compacted commit objects in the output
        self.singles: list[int] = []  # shards whose single commit record object is in the output
        self.first_commit_at: float | None = None
        self.shards_run = 0  # shards this run committed (a resume does only some)
        self.rows_run = 0
        self.timings: collections.Counter = collections.Counter()

    @property
    def run_tag(self) -> str:
        return self.lease.tag if self.lease else ""

    def uri(self, relative_path: str) -> str:
        return storage.join(self.output, relative_path)

    def check(self) -> None:
        """Fencing: a run that lost the output's lease writes nothing more."""
        if self.lease is not None:
            self.lease.check()

    # --- the plan ----------------------------------------------------------------------------------

    def open(self, mode: str, fingerprint: str, inputs: dict, what: str, remedy: str) -> dict | None:
        """Honour the output mode (`resume` | `overwrite` | `error` | `append`) and read the commits. Returns the
        frozen plan to resume (or, for `append`, to grow), or None for a new output, whose plan the caller writes
        with `write_plan` once what it names is written. A plan frozen with other inputs is refused naming what
        differs: resuming or appending would mix `what`."""
        shown = redaction.redact(self.output)
        exists = storage.exists(self.uri(PLAN_FILE), self.options)
        if exists and mode == "error":
            raise ConfigError(f"{self.key}: {shown} already holds a featurize output and output.mode is 'error'; "
                              "use output.mode: resume to finish it or overwrite to start again")
        if exists and mode == "overwrite":
            for name in storage.list_names(self.output, self.options):  # everything but the lease this run holds
                if name != lease.LEASE_FILE:
                    storage.remove(self.uri(name), self.options, recursive=True)
            exists = False
        frozen = read_json(self.uri(PLAN_FILE), self.options) if exists else None
        differences = fingerprint_differences(frozen, fingerprint, inputs) if frozen else []
        if differences:
            action = "appending to it" if mode == "append" else "resuming"
            raise ConfigError(f"{self.key}: {shown} was written with a different configuration, so {action} would mix "
                              f"{what}. Differences: {'; '.join(differences)}. {remedy}")
        found = read_commit_objects(self.output, self.options)
        self.commits, self.compacted, self.singles = found.records, found.compacted, found.singles
        return frozen

    def write_plan(self, document: dict) -> None:
        """Write (or, for an append, replace) the plan file: fenced, since it decides what every shard means."""
        self.check()
        storage.make_dirs(self.output, self.options)
        write_json(self.uri(PLAN_FILE), document, self.options)

    def pending(self, num_shards: int) -> list[int]:
        return [index for index in range(num_shards) if index not in self.commits]

    def first_file_metadata(self, without: tuple[str, ...] = ()) -> dict[str, str]:
        """The metadata of the first committed data file ({} without one), less the keys `without`: what a rerun
        of a finished job records as its provenance, having built no model."""
        first = self.commits[min(self.commits)] if self.commits else None
        if first is None or not first.files:
            return {}
        metadata = read_file_metadata(self.output, first.files[0], self.options)
        return {key: value for key, value in metadata.items() if key not in without}

    # --- shards --------------------------------------------------------------------------------------

    def write_data(self, shard: int, table: pa.Table, row_group_size: int) -> str:
        """A new uniquely named data file of `shard` (not counted until a commit names it); its relative path."""
        relative_path = new_data_file_name(shard, self.run_tag)
        write_data_file(self.output, relative_path, table, row_group_size, self.options)
        return relative_path

    def commit(self, record: CommitRecord) -> None:
        self.check()
        write_commit(self.output, record, self.options)
        self.commits[record.shard] = record
        self.singles.append(record.shard)
        if len(self.singles) >= COMPACT_EVERY:
            self.compact(everything=len(self.compacted) + 1 >= MAX_COMPACTED)
        self.shards_run += 1
        self.rows_run += record.rows
        self.timings.update(record.timings)
        if self.first_commit_at is None:
            self.first_commit_at = time.time()

    def compact(self, everything: bool) -> None:
        """Fold the single records (or, with `everything`, every record) into one new object, then delete what it
        replaces."""
        self.check()
        shards = sorted(self.commits) if everything else self.singles
        path = compacted_commits_path()
        document = {"records": [asdict(self.commits[shard]) for shard in shards]}
        storage.write_bytes(self.uri(path), json.dumps(document, sort_keys=True).encode(), self.options)
        replaced = [commit_path(shard) for shard in self.singles] + (self.compacted if everything else [])
        storage.remove_many([self.uri(relative) for relative in replaced], self.options)
        self.compacted = [path] if everything else [*self.compacted, path]
        self.singles = []

    # --- the end ---------------------------------------------------------------------------------

    def finish(self, num_shards: int, fingerprint: str, extras: dict) -> dict:
        """Remove orphans, then write `_SUCCESS`: the contract's fields, then the stage's own `extras`."""
        self.check()
        if len(self.singles) + len(self.compacted) > FINISH_COMPACTS_ABOVE:
            self.compact(everything=True)
        written_before = self.lease.started_on_store if self.lease else None
        remove_orphans(self.output, self.commits, self.options, written_before=written_before, run_tag=self.run_tag)
        ordered = [self.commits[index] for index in sorted(self.commits)]
        reasons = collections.Counter()
        for record in ordered:
            reasons.update(record.errors_by_reason)
        rows = {"total": sum(r.rows for r in ordered), "ok": sum(r.ok for r in ordered),
                "error": sum(r.error for r in ordered)}
        finished = time.time()
        success = {
            "files": [path for record in ordered for path in record.files],
            "rows": rows,
            "errors_by_reason": dict(reasons),
            "shards": {"total": num_shards, "run": self.shards_run, "committed": len(self.commits)},
            "fingerprint": fingerprint,
            "seconds": {"total": round(finished - self.started, 3),
                        "startup": round((self.first_commit_at or finished) - self.started, 3)},
            "timings": {key: round(value, 3) for key, value in self.timings.items()},
            "images_per_second": round(self.rows_run / max(finished - self.started, 1e-9), 2),
            "error_rate": rows["error"] / rows["total"] if rows["total"] else 0.0,
            "output": redaction.redact(self.output),
            "actors": actors_table(ordered),
            **extras,
        }
        self.check()
        write_json(self.uri(SUCCESS_FILE), success, self.options)
        return success


def actors_table(records) -> list[dict]:
    """`_SUCCESS.actors`: one entry per actor that wrote committed rows (in any run), from the commit records: the
    shards it wrote rows of, the pieces (a shard is one, or more once bisected), images and seconds; pieces the
    driver wrote itself (quarantined images) name no actor."""
    table: dict[str, dict] = {}
    shards: dict[str, set[int]] = collections.defaultdict(set)
    for record in records:
        for piece in record.actors:
            entry = table.setdefault(piece["actor"], {
                "actor": piece["actor"], "node_id": piece["node_id"], "accelerator_ids": piece["accelerator_ids"],
                "shards": 0, "pieces": 0, "images": 0, "seconds": 0.0})
            shards[piece["actor"]].add(record.shard)
            entry["shards"] = len(shards[piece["actor"]])
            entry["pieces"] += 1
            entry["images"] += piece["images"]
            entry["seconds"] = round(entry["seconds"] + piece["seconds"], 3)
    return sorted(table.values(), key=lambda entry: (entry["node_id"], entry["actor"]))


@contextlib.contextmanager
def held(output_uri: str, storage_options: dict | None = None, stage: str = "extract", key: str = "output.uri",
         started: float | None = None) -> Iterator[Ledger]:
    """The ledger of an output for a run holding its lease, for the duration of a `with` block."""
    with lease.held(output_uri, storage_options, stage, key=key) as output_lease:
        yield Ledger(output_uri, storage_options, output_lease, started, key)
