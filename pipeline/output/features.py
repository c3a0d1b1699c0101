"""The one reader of finished extract outputs, for every stage that reads features (train, predict, index, search,
dedup, compare): through their `_SUCCESS`.

Only committed data files are read: the file list comes from each output's `_SUCCESS`. Several outputs are
combined only when their provenance agrees on every key of the features contract (`contract.PROVENANCE_KEYS`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.contract import provenance_differences
from pipeline.errors import ConfigError
from pipeline.io import faults, storage
from pipeline.output import ledger


@dataclass(frozen=True)
class FeatureSet:
    """One or more finished extract outputs that agree on provenance, seen through their `_SUCCESS`."""

    uris: tuple[str, ...]
    files: tuple[str, ...]  # every committed data file, as full URIs, in `_SUCCESS` order
    num_rows: int
    feature_dim: int
    column_names: tuple[str, ...]
    provenance: dict


def open_features(uris: tuple[str, ...], storage_options: dict | None = None) -> FeatureSet:
    files: list[str] = []
    num_rows = 0
    dims: dict[str, int] = {}
    column_names: tuple[str, ...] = ()
    provenances = []
    for uri in uris:
        success = ledger.read_success(uri, storage_options)
        output_files = [storage.join(uri, path) for path in success["files"]]
        files.extend(output_files)
        provenances.append((uri, ledger.read_provenance(uri, storage_options)))
        if output_files:
            with parquet_file(output_files[0], storage_options) as first:
                dims[uri] = first.schema_arrow.field("features").type.list_size
                column_names = column_names or tuple(first.schema_arrow.names)
        rows_total = success.get("rows", {}).get("total")
        if rows_total is None:
            rows_total = sum(count_rows(file, storage_options) for file in output_files)
        num_rows += int(rows_total)
    for uri, provenance in provenances[1:]:
        differences = provenance_differences(provenances[0][1], provenance, provenances[0][0], uri)
        if differences:
            raise ConfigError("features.uri lists outputs with different provenance, so their features are not "
                             f"comparable: {'; '.join(differences)}. Use outputs of one extraction setup.")
    if len(set(dims.values())) > 1:
        raise ConfigError(f"features.uri lists outputs with different feature dims: {dims}. "
                         "Use outputs of one extraction setup.")
    if not dims:
        raise ConfigError(f"features.uri {list(uris)} holds no committed data files; nothing to read")
    return FeatureSet(tuple(uris), tuple(files), num_rows, next(iter(dims.values())), column_names,
                      provenances[0][1])


@contextlib.contextmanager
def parquet_file(file_uri: str, storage_options: dict | None = None) -> Iterator[pq.ParquetFile]:
    """A lazily read Parquet file: footer now, row groups on demand (ranged reads on object stores)."""
    fs, path = storage.filesystem(file_uri, storage_options)
    with faults.with_retries(lambda: fs.open(path, "rb")) as handle:
        yield pq.ParquetFile(handle)


def count_rows(file_uri: str, storage_options: dict | None = None) -> int:
    with parquet_file(file_uri, storage_options) as parquet:
        return parquet.metadata.num_rows


def features_matrix(column: pa.Array | pa.ChunkedArray, feature_dim: int) -> np.ndarray:
    """(rows, dim) float32 from a FixedSizeList column without nulls (float16 features are widened)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, feature_dim).astype(np.float32, copy=False)


def read_features(output_uri: str, storage_options: dict | None = None, columns: list[str] | None = None,
                  ) -> pa.Table:
    """All committed rows of one finished extract output, with the files taken from `_SUCCESS`."""
    paths = ledger.read_success(output_uri, storage_options)["files"]
    if not paths:
        raise ConfigError(f"features.uri {output_uri} holds no committed data files; nothing to read")
    tables = []
    for path in paths:
        with parquet_file(storage.join(output_uri, path), storage_options) as parquet:
            tables.append(parquet.read(columns=columns))
    # files written before the `key`, `sha256` and `phash` columns: nulls
    return pa.concat_tables(tables, promote_options="default")


def shared_bytes(output_uri: str, files: list[str], storage_options: dict | None = None) -> dict | None:
    """How many ok rows share their bytes (sha256) with another row, and in how many distinct contents; None when
    the files predate the sha256 column (or were written with output.content_hashes: false)."""
    digests = []
    for path in files:
        with parquet_file(storage.join(output_uri, path), storage_options) as parquet:
            if "sha256" not in parquet.schema_arrow.names:
                return None
            table = parquet.read(columns=["status", "sha256"])
        digests.append(pc.utf8_slice_codeunits(table.filter(pc.equal(table.column("status"), "ok")).column("sha256"),
                                               0, 16))  # 64 bits of the digest: a quarter of the memory
    values = pa.chunked_array(digests, pa.string())
    if values.null_count:
        return None
    counts = values.value_counts().field("counts").to_numpy() if len(values) else np.zeros(0, np.int64)
    return {"images": int(counts[counts > 1].sum()), "contents": int((counts > 1).sum())}
