"""The rows of an extract output: the Arrow row schema and column buffers for one shard (read back with
`output.features`)."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.extract.archives import member_key
from pipeline.io import redaction
from pipeline.output.ledger import CommitRecord

# Data-file metadata naming the actor that wrote the file (accelerator_ids as a JSON list), beside the provenance.
WRITER_KEYS = ("actor", "node_id", "accelerator_ids")


def success_extras(provenance: dict | None, run_ledger, max_error_rate: float) -> dict:
    """What an extract output's `_SUCCESS` adds to the ledger's: the model's provenance (from an actor's
    description; a finished job rerun built none, so it is read back from a data file, less the writer's keys),
    and run.max_error_rate (the actors that wrote its rows are the ledger's, from the commit records)."""
    if provenance:
        provenance = {key: redaction.redact(value) for key, value in provenance.items()}
    else:
        provenance = run_ledger.first_file_metadata(without=WRITER_KEYS)
    return {"provenance": provenance, "max_error_rate": max_error_rate}


def commit_record(shard: int, results: list) -> CommitRecord:
    """The commit record of a shard whose pieces are all back: their files in row order, counts and timings summed,
    and the actors that wrote them (node, accelerators, images, seconds); `results` are worker.ShardResults."""
    results = sorted(results, key=lambda result: result.start)
    timings, reasons = collections.Counter(), collections.Counter()
    for result in results:
        timings.update(result.timings)
        reasons.update(result.errors_by_reason)
    return CommitRecord(
        shard=shard, files=[result.file for result in results], rows=sum(r.rows for r in results),
        ok=sum(r.ok for r in results), error=sum(r.error for r in results), timings=dict(timings),
        errors_by_reason=dict(reasons), committed_at=time.time(),
        actors=[{**result.writer, "images": result.rows, "seconds": round(result.seconds, 3)}
                for result in results if result.writer])


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
        pa.field("key", pa.string()),  # the WebDataset sample key of an archive member; null for a loose file
        pa.field("sha256", pa.string()),  # hex of the bytes as fetched (an archive member's own); null for errors
        pa.field("phash", pa.string()),  # imagehash's 64-bit phash of the upright picture, 16 hex digits
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
    key: list = field(default_factory=list)
    sha256: list = field(default_factory=list)
    phash: list = field(default_factory=list)

    def add_ok(self, uri, label, width, height, features: np.ndarray, labels: list[str], scores: list[float],
               sha256: str | None = None, phash: str | None = None):
        self._add(uri, label, "ok", None, width, height, features, labels, scores)
        self.sha256.append(sha256)
        self.phash.append(phash)

    def add_error(self, uri, label, reason: str, width=None, height=None):
        self._add(uri, label, "error", reason, width, height, None, [], [])
        self.sha256.append(None)
        self.phash.append(None)

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
        self.key.append(member_key(uri))  # a function of the member URL: rows of every kind get it alike

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
