"""Features as the analyse stages read them: ok rows only, streamed batch by batch from committed files, and the
vector conventions every stage shares (cosine = inner product of L2-normalised vectors)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.features import FeatureSet, features_matrix, open_features, parquet_file


def ok_batches(feature_set: FeatureSet, storage_options: dict | None, batch_rows: int,
               uris: pa.Array | None = None) -> Iterator[tuple[pa.Array, np.ndarray]]:
    """(uris, float32 matrix) of the ok rows, `batch_rows` at a time, in `_SUCCESS` file order (the row ids of
    an index). With `uris`, only rows whose uri is among them."""
    for file_uri in feature_set.files:
        with parquet_file(file_uri, storage_options) as parquet:
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=["uri", "status", "features"]):
                keep = pc.equal(batch.column("status"), "ok")
                if uris is not None:
                    keep = pc.and_(keep, pc.is_in(batch.column("uri"), value_set=uris))
                batch = batch.filter(keep)
                if batch.num_rows:
                    yield batch.column("uri"), features_matrix(batch.column("features"), feature_set.feature_dim)


def as_metric_space(matrix: np.ndarray, metric: str) -> np.ndarray:
    """float32 C-contiguous rows as faiss takes them; for cosine, L2-normalised (a zero vector stays zero)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if metric == "cosine":
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix = matrix / np.maximum(norms, np.finfo(np.float32).tiny)
    return matrix


def num_ok_rows(feature_set: FeatureSet, storage_options: dict | None) -> int:
    """ok rows of every output (from `_SUCCESS` counts; counted from the files where an output lacks them)."""
    from pipeline.output import ledger

    total = 0
    for uri in feature_set.uris:
        ok = ledger.read_success(uri, storage_options).get("rows", {}).get("ok")
        if ok is None:
            return sum(len(batch_uris) for batch_uris, _ in ok_batches(feature_set, storage_options, 65536))
        total += int(ok)
    return total


def sources_document(feature_set: FeatureSet, storage_options: dict | None) -> list[dict]:
    """What an analyse output was computed from: each extract output's uri and fingerprint, in order."""
    from pipeline.output import ledger

    return [{"uri": uri, "fingerprint": ledger.read_success(uri, storage_options).get("fingerprint")}
            for uri in feature_set.uris]


def fingerprint_of(document: dict) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["FeatureSet", "as_metric_space", "fingerprint_of", "num_ok_rows",
           "ok_batches", "open_features", "sources_document"]
