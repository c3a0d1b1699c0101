"""Labels for the train stage: where they come from, the labelled ok rows, the split column, class checks.

Labels come from a column of the rows (`features.label_column`) or from `features.labels_file` (CSV or Parquet
with `uri` and the label column, joined on uri); a `split.column` comes from the labels file when it has that
column, else from the rows. Rows with status=error and rows without a label are skipped and counted.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.config import FeaturesConfig, SplitConfig
from pipeline.errors import ConfigError
from pipeline.io import storage
from pipeline.output.features import features_matrix


class LabelSource:
    """Where labels (and the split column) come from: a column of the rows, or a labels file joined on uri."""

    def __init__(self, features: FeaturesConfig, split: SplitConfig, column_names: tuple[str, ...]):
        self.label_column = features.label_column
        self.split_column = split.column
        self.table: pa.Table | None = None
        columns = ["uri", "status", "features"]
        if features.labels_file:
            self.table = read_labels_file(features.labels_file, self.label_column, split.column,
                                          features.storage_options)
        elif self.label_column not in column_names:
            raise ConfigError(f"features.label_column {self.label_column!r} is not a column of the features "
                             f"(columns: {', '.join(column_names)}); name one of them, or set "
                             "features.labels_file to a CSV/Parquet file with `uri` and label columns")
        else:
            columns.append(self.label_column)
        self.split_from_file = self.table is not None and split.column in self.table.column_names
        if split.column and not self.split_from_file:
            if split.column not in column_names:
                where = f"features.labels_file or the features (columns: {', '.join(column_names)})"
                raise ConfigError(f"split.column {split.column!r} is in neither {where}; add a column with "
                                 "values train/test, or leave split.column empty for a stratified holdout")
            columns.append(split.column)
        self.feature_columns = columns

    def labels(self, table: pa.Table) -> pa.Array:
        return self._column(table, self.label_column, from_file=self.table is not None)

    def splits(self, table: pa.Table) -> pa.Array | None:
        if not self.split_column:
            return None
        return self._column(table, self.split_column, from_file=self.split_from_file)

    def _column(self, table: pa.Table, name: str, from_file: bool) -> pa.Array:
        if not from_file:
            return pc.cast(table[name], pa.string()).combine_chunks()
        positions = pc.index_in(table["uri"], value_set=self.table["uri"])
        return pc.take(self.table[name], positions).combine_chunks()


def read_labels_file(uri: str, label_column: str, split_column: str | None, storage_options: dict | None,
                     ) -> pa.Table:
    data = io.BytesIO(storage.read_bytes(uri, storage_options))
    text_columns = ["uri", label_column] + ([split_column] if split_column else [])
    if uri.lower().endswith((".csv", ".csv.gz")):
        options = pa_csv.ConvertOptions(column_types=dict.fromkeys(text_columns, pa.string()))
        table = pa_csv.read_csv(data, convert_options=options)
    elif uri.lower().endswith((".parquet", ".pq")):
        table = pq.read_table(data)
    else:
        raise ConfigError(f"features.labels_file {uri!r}: expected a .csv or .parquet file with columns "
                         f"uri and {label_column}")
    missing = [name for name in ("uri", label_column) if name not in table.column_names]
    if missing:
        raise ConfigError(f"features.labels_file {uri!r} lacks column(s) {', '.join(missing)} (it has "
                         f"{', '.join(table.column_names)}); it needs `uri` and the label column "
                         f"{label_column!r} (features.label_column)")
    keep = [name for name in text_columns if name in table.column_names]
    table = table.select(keep).cast(pa.schema([pa.field(name, pa.string()) for name in keep]))
    if pc.count_distinct(table["uri"]).as_py() != table.num_rows:
        counts = pc.value_counts(table["uri"]).to_pylist()
        duplicate = next(entry["values"] for entry in counts if entry["counts"] > 1)
        raise ConfigError(f"features.labels_file {uri!r} lists uri {duplicate!r} more than once; "
                         "keep one label per uri")
    return table


@dataclass
class Rows:
    """Labelled ok rows of some table, plus how many rows were skipped and why."""

    uris: list[str]
    features: np.ndarray  # float32 (n, dim)
    labels: np.ndarray  # str (n,)
    splits: np.ndarray | None  # str (n,) when split.column is set
    num_error: int
    num_unlabelled: int

    @classmethod
    def concat(cls, parts: list[Rows]) -> Rows:
        return cls([uri for part in parts for uri in part.uris],
                   np.concatenate([part.features for part in parts]),
                   np.concatenate([part.labels for part in parts]),
                   None if parts[0].splits is None else np.concatenate([part.splits for part in parts]),
                   sum(part.num_error for part in parts), sum(part.num_unlabelled for part in parts))


def labelled_rows(table: pa.Table, labels: LabelSource, feature_dim: int) -> Rows:
    ok = pc.equal(table["status"], "ok")
    num_error = table.num_rows - (pc.sum(ok).as_py() or 0)
    table = table.filter(ok)
    label_values = labels.labels(table)
    has_label = pc.is_valid(label_values)
    num_unlabelled = table.num_rows - (pc.sum(has_label).as_py() or 0)
    table = table.filter(has_label)
    label_values = label_values.filter(has_label)
    splits = labels.splits(table)
    return Rows(uris=table["uri"].to_pylist(),
                features=features_matrix(table["features"], feature_dim),
                labels=np.asarray(label_values.to_pylist(), dtype=object).astype(str),
                splits=None if splits is None else np.asarray(splits.to_pylist(), dtype=object),
                num_error=int(num_error), num_unlabelled=int(num_unlabelled))


def is_test_split(splits: np.ndarray, column: str) -> np.ndarray:
    """True for rows whose split value is "test"; anything but train/test is an error."""
    bad = sorted({str(value) for value in splits if value not in ("train", "test")})
    if bad:
        raise ConfigError(f"split.column {column!r} holds value(s) {', '.join(bad[:5])}; allowed: train, test")
    return splits == "test"


def check_classes(classes: list[str], train_counts: np.ndarray) -> None:
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "no labelled rows at all"
        raise ConfigError(f"training needs at least 2 classes, found {found}; check the labels "
                         "(features.label_column / features.labels_file)")
    missing = [name for name, count in zip(classes, train_counts) if count == 0]
    if missing:
        raise ConfigError(f"class(es) {', '.join(map(repr, missing))} have no rows in the train split; "
                         "add labelled rows for them, drop them, or change the split")


def encode_labels(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """Class indices of label strings; `classes` is sorted and holds every label."""
    return np.searchsorted(np.asarray(classes), labels).astype(np.int64)


def balanced_weights(counts: np.ndarray) -> np.ndarray:
    """sklearn's "balanced" class weights, n / (K * n_k), from per-class row counts."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts.sum() / (len(counts) * np.maximum(counts, 1))
