"""Arrow row schema, shard data files, and the commit protocol.

Layout of an output directory (paths relative to it):
    _plan.json                  fingerprint, shard size, provenance; written once, reused on resume
    _manifest.parquet           the frozen listing (uri, label): shard i is rows [i*size, (i+1)*size)
    data/shard-00042-<id>.parquet   one uniquely named file per attempt (never overwritten)
    _commits/shard-00042.json   the commit record naming the data file(s) of shard 42
    _SUCCESS                    JSON summary written by the driver after every shard committed

A data file counts only once a commit record names it. Commit records are written by the driver alone,
in one object write each, so the protocol needs no rename and works the same on object stores.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.io import redaction, storage

DATA_DIR = "data"
COMMITS_DIR = "_commits"
SUCCESS_FILE = "_SUCCESS"
PLAN_FILE = "_plan.json"
MANIFEST_FILE = "_manifest.parquet"
METRICS_FILE = "metrics.json"  # what `featurize train` writes last: its output is complete


def row_schema(feature_dim: int, feature_dtype: str = "float32", provenance: dict | None = None) -> pa.Schema:
    value_type = pa.float16() if feature_dtype == "float16" else pa.float32()
    schema = pa.schema([
        pa.field("uri", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("features", pa.list_(value_type, feature_dim)),
        pa.field("top_k_labels", pa.list_(pa.string())),
        pa.field("top_k_scores", pa.list_(pa.float32())),
    ])
    metadata = {key: redaction.redact(str(value)) for key, value in (provenance or {}).items()}  # URIs: no secrets
    return schema.with_metadata(metadata)


@dataclass
class ShardRows:
    """Column buffers for one shard, appended row by row in manifest order."""

    uri: list = field(default_factory=list)
    label: list = field(default_factory=list)
    status: list = field(default_factory=list)
    error: list = field(default_factory=list)
    width: list = field(default_factory=list)
    height: list = field(default_factory=list)
    features: list = field(default_factory=list)
    top_k_labels: list = field(default_factory=list)
    top_k_scores: list = field(default_factory=list)

    def add_ok(self, uri, label, width, height, features: np.ndarray, labels: list[str], scores: list[float]):
        self._add(uri, label, "ok", None, width, height, features, labels, scores)

    def add_error(self, uri, label, reason: str, width=None, height=None):
        self._add(uri, label, "error", reason, width, height, None, [], [])

    def _add(self, uri, label, status, error, width, height, features, labels, scores):
        self.uri.append(redaction.redact_uri(uri))  # a signed URL's signature or user info stays out of rows
        self.label.append(label)
        self.status.append(status)
        self.error.append(error)
        self.width.append(width)
        self.height.append(height)
        self.features.append(features)
        self.top_k_labels.append(labels)
        self.top_k_scores.append(scores)

    def __len__(self) -> int:
        return len(self.uri)

    def to_table(self, schema: pa.Schema) -> pa.Table:
        feature_type = schema.field("features").type
        columns = {name: getattr(self, name) for name in schema.names if name != "features"}
        arrays = [pa.array(columns[name], type=schema.field(name).type) if name != "features"
                  else features_array(self.features, feature_type) for name in schema.names]
        return pa.Table.from_arrays(arrays, schema=schema)


def features_array(rows: list, feature_type: pa.FixedSizeListType) -> pa.FixedSizeListArray:
    """FixedSizeList column from per-row vectors (None for error rows), built without Python floats."""
    dim = feature_type.list_size
    value_dtype = np.float16 if feature_type.value_type == pa.float16() else np.float32
    values = np.zeros((len(rows), dim), dtype=value_dtype)
    valid = np.zeros(len(rows), dtype=bool)
    for index, row in enumerate(rows):
        if row is not None:
            values[index] = row
            valid[index] = True
    flat = pa.array(values.reshape(-1), type=feature_type.value_type)
    mask = pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, type=feature_type, mask=mask)


def new_data_file_name(shard_index: int, run_tag: str = "") -> str:
    """Unique per attempt, so two attempts of one shard never touch the same object. `run_tag` (the lease's
    short run id) marks the files of one run, which remove_orphans may delete however new they are."""
    attempt = f"{run_tag}-{uuid.uuid4().hex[:12]}" if run_tag else uuid.uuid4().hex[:12]
    return f"{DATA_DIR}/shard-{shard_index:05d}-{attempt}.parquet"


def write_data_file(output_uri: str, relative_path: str, table: pa.Table, row_group_size: int,
                    storage_options: dict | None = None) -> int:
    """Write one Parquet file in a single object write; returns its size in bytes."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size, use_dictionary=["uri", "label", "status"],
                   compression="zstd")
    data = buffer.getvalue()
    storage.write_bytes(storage.join(output_uri, relative_path), data, storage_options)
    return len(data)


@dataclass
class CommitRecord:
    shard: int
    files: list[str]
    rows: int
    ok: int
    error: int
    timings: dict = field(default_factory=dict)  # seconds per stage: fetch, decode, forward, write
    errors_by_reason: dict = field(default_factory=dict)
    committed_at: float = 0.0  # driver wall clock (epoch seconds): steady-state throughput in benchmarks


def commit_path(shard_index: int) -> str:
    return f"{COMMITS_DIR}/shard-{shard_index:05d}.json"


def write_commit(output_uri: str, record: CommitRecord, storage_options: dict | None = None) -> None:
    data = json.dumps(asdict(record), sort_keys=True).encode()
    storage.write_bytes(storage.join(output_uri, commit_path(record.shard)), data, storage_options)


def read_commits(output_uri: str, storage_options: dict | None = None) -> dict[int, CommitRecord]:
    """Every commit record in the output, by shard index."""
    records = {}
    for name in storage.list_names(storage.join(output_uri, COMMITS_DIR), storage_options):
        if not (name.startswith("shard-") and name.endswith(".json")):
            continue
        data = json.loads(storage.read_bytes(storage.join(output_uri, COMMITS_DIR, name), storage_options))
        records[data["shard"]] = CommitRecord(**data)
    return records


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


def read_features(output_uri: str, storage_options: dict | None = None, columns: list[str] | None = None,
                  ) -> pa.Table:
    """All committed rows of a finished extract output, with the files taken from `_SUCCESS`."""
    success = read_success(output_uri, storage_options)
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output_uri, path), storage_options)),
                            columns=columns) for path in success["files"]]
    if not tables:
        return row_schema(1).empty_table()
    return pa.concat_tables(tables)


def read_provenance(output_uri: str, storage_options: dict | None = None) -> dict[str, str]:
    """The provenance recorded in `_SUCCESS` (the same key-value metadata every data file carries)."""
    return dict(read_success(output_uri, storage_options).get("provenance", {}))


def read_file_schema(output_uri: str, relative_path: str, storage_options: dict | None = None) -> pa.Schema:
    """Schema of one data file, reading only its footer."""
    fs, path = storage.filesystem(storage.join(output_uri, relative_path), storage_options)
    with fs.open(path, "rb") as handle:
        return pq.read_schema(handle)


def read_file_metadata(output_uri: str, relative_path: str, storage_options: dict | None = None) -> dict[str, str]:
    """The provenance key-value metadata of one data file."""
    metadata = read_file_schema(output_uri, relative_path, storage_options).metadata or {}
    return {key.decode(): value.decode() for key, value in metadata.items()}
