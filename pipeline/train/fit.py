"""The train stage: committed Parquet features -> classifier -> metrics.json, plots; and `predict` with it.

Inputs are one or more finished extract outputs (`features.uri`). Only committed data files are read: the
file list comes from each output's `_SUCCESS`. Several outputs are concatenated when their provenance agrees
on every key of `PROVENANCE_KEYS`. Rows with status=error and rows without a label are skipped and counted.
Labels come from a column of the rows (`features.label_column`) or from `features.labels_file` (CSV or
Parquet with `uri` and the label column, joined on uri); a `split.column` comes from the labels file when it
has that column, else from the rows.

Two ways to train, chosen in `train()` before any data is read:

- in memory (row count <= `classifier.max_in_memory_rows`; rows counted from `_SUCCESS` `rows.total`,
  error rows included): all rows are read with `rows.read_features` (pipeline/extract); stratified holdout with
  `train_test_split`; "logistic" = StandardScaler + LogisticRegression (lbfgs, softmax); "mlp" = a small
  Keras head fitted on arrays.
- streaming (more rows than that): the data files are read one Parquet row group at a time, never all at
  once. The holdout is a deterministic hash of the uri, `crc32(uri) % 1000 < test_fraction * 1000`
  (or `split.column`), so no materialisation is needed. A first pass fits the scaler
  (`StandardScaler.partial_fit`) and counts classes; then "logistic" = SGDClassifier(loss="log_loss",
  one-vs-rest) with `partial_fit` over shuffled row groups, "mlp" = the same Keras head fitted from a
  `keras.utils.PyDataset` over row groups. A last pass scores the test rows.

Both ways write the same outputs (paths relative to `output.uri`, any fsspec URI):
    classifier.json     kind, classes, feature provenance and dim, config, training summary
    classifier.npz      logistic: mean, scale, coef (K x D), intercept (K) -- loads with allow_pickle=False
    classifier.keras    mlp: the Keras model (standardisation inside), loads with safe_mode=True
    metrics.json        accuracy, balanced_accuracy, macro_f1, per_class, confusion_matrix, classes, counts...
    confusion_matrix.png, per_class_f1.png

Early stopping (mlp both ways, logistic when streaming) watches the loss on a validation slice of the train
split (`classifier.validation_fraction`): stratified when in memory, a second uri hash when streaming.
Nothing here unpickles: saved classifiers are plain arrays, JSON and Keras files.

`predict` applies a saved classifier to another extract output after checking that the features were
extracted the same way (PROVENANCE_KEYS). It writes rows (uri, label, status, error, predicted_label,
predicted_score, scores) with the extract commit protocol, one shard per input data file, then `_SUCCESS`;
a rerun resumes (committed shards are kept), and an output made by another classifier is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline import charts
from pipeline.config import ClassifierConfig, FeaturesConfig, SplitConfig, TrainConfig, to_dict
from pipeline.errors import ConfigError
from pipeline.extract.rows import read_features
from pipeline.io import faults, redaction, storage
from pipeline.output import layout, lease, ledger

# The provenance keys that must agree between features and a classifier (and among concatenated outputs).
PROVENANCE_KEYS = ("backbone", "weights", "weights_sha256", "layer", "pooling", "input_size", "preprocess")

CLASSIFIER_FILE = "classifier.json"
LOGISTIC_WEIGHTS_FILE = "classifier.npz"
MLP_WEIGHTS_FILE = "classifier.keras"
METRICS_FILE = layout.METRICS_FILE
CONFUSION_PLOT_FILE = "confusion_matrix.png"
F1_PLOT_FILE = "per_class_f1.png"
FORMAT_VERSION = 1

TRAIN, VALIDATION, TEST = 0, 1, 2  # row bands
HASH_BUCKETS = 1000
LOGISTIC_MAX_ITER = 5000
STREAMING_LOSS_TOLERANCE = 1e-4  # smaller validation-loss gains count as no improvement


# ---------------------------------------------------------------------------------------------- features


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
                             f"comparable: {'; '.join(differences)}. Train on outputs of one extraction setup.")
    if len(set(dims.values())) > 1:
        raise ConfigError(f"features.uri lists outputs with different feature dims: {dims}. "
                         "Train on outputs of one extraction setup.")
    if not dims:
        raise ConfigError(f"features.uri {list(uris)} holds no committed data files; nothing to train on")
    return FeatureSet(tuple(uris), tuple(files), num_rows, next(iter(dims.values())), column_names,
                      provenances[0][1])


def normalise_provenance_value(value):
    """Provenance may come as JSON values or as Parquet metadata strings; compare both as text."""
    return None if value in (None, "None", "null") else str(value)


def provenance_differences(expected: dict, actual: dict, expected_name: str, actual_name: str) -> list[str]:
    """One line per key of PROVENANCE_KEYS on which the two disagree, with both values."""
    return [f"{key}: {expected.get(key)!r} ({expected_name}) vs {actual.get(key)!r} ({actual_name})"
            for key in PROVENANCE_KEYS
            if normalise_provenance_value(expected.get(key)) != normalise_provenance_value(actual.get(key))]


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


# ------------------------------------------------------------------------------------------------ labels


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


# ------------------------------------------------------------------------------------------------ models


@dataclass
class LinearModel:
    """Standardise, then a linear map to K class scores: softmax (multinomial) or normalised sigmoids (ovr)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (K, dim)
    intercept: np.ndarray  # (K,)
    link: str  # softmax | ovr
    kind = "logistic"
    weights_file = LOGISTIC_WEIGHTS_FILE

    @classmethod
    def from_fitted(cls, mean, scale, coef, intercept, link: str) -> LinearModel:
        coef, intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
        if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2]), so store the two-row form
            coef, intercept, link = np.vstack([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2, "softmax"
        return cls(np.asarray(mean, np.float64), np.asarray(scale, np.float64), coef, intercept, link)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        from scipy.special import expit, softmax

        logits = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept
        if self.link == "softmax":
            return softmax(logits, axis=1)
        probabilities = expit(logits)
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept)
        return buffer.getvalue()

    def save(self, output_uri: str, storage_options: dict | None) -> None:
        storage.write_bytes(storage.join(output_uri, self.weights_file), self.to_bytes(), storage_options)

    def document(self) -> dict:
        return {"link": self.link}

    @classmethod
    def load(cls, data: bytes, document: dict) -> LinearModel:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return cls(arrays["mean"], arrays["scale"], arrays["coef"], arrays["intercept"], document["link"])


class MlpModel:
    """A small Keras head; standardisation is its first layer, so the saved file is self-contained."""

    kind = "mlp"
    weights_file = MLP_WEIGHTS_FILE

    def __init__(self, model):
        self.model = model

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros((0, self.model.output_shape[-1]), dtype=np.float32)
        return self.model.predict(features, batch_size=4096, verbose=0)

    def save(self, output_uri: str, storage_options: dict | None) -> None:
        with tempfile.TemporaryDirectory(prefix="featurize-train-") as directory:
            path = os.path.join(directory, self.weights_file)
            self.model.save(path)
            storage.upload_file(path, storage.join(output_uri, self.weights_file), storage_options)

    def document(self) -> dict:
        return {}

    @classmethod
    def load(cls, path: str) -> MlpModel:
        import keras

        return cls(keras.saving.load_model(path, compile=False, safe_mode=True))


def build_mlp(feature_dim: int, num_classes: int, mean: np.ndarray, scale: np.ndarray, config: ClassifierConfig,
              seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(feature_dim,), name="features")
    hidden = keras.layers.Normalization(mean=mean, variance=np.square(scale), name="standardize")(inputs)
    hidden = keras.layers.Dense(config.hidden_units, activation="relu", name="hidden")(hidden)
    hidden = keras.layers.Dropout(config.dropout, name="dropout")(hidden)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="scores")(hidden)
    model = keras.Model(inputs, outputs, name="featurize_mlp_head")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss="sparse_categorical_crossentropy")
    return model


def fit_mlp(model, train_data: dict, validation_data, config: ClassifierConfig, class_weight: np.ndarray | None):
    """Keras fit with early stopping on the validation loss (restoring the best weights)."""
    import keras

    monitor = "val_loss" if validation_data is not None else "loss"
    stopper = keras.callbacks.EarlyStopping(monitor=monitor, patience=config.patience, restore_best_weights=True)
    history = model.fit(**train_data, validation_data=validation_data, epochs=config.epochs, verbose=0,
                        callbacks=[stopper],
                        class_weight=None if class_weight is None else dict(enumerate(class_weight.tolist())))
    return len(history.history.get("loss", []))


def load_classifier(model_uri: str, storage_options: dict | None = None) -> tuple[dict, LinearModel | MlpModel, str]:
    """(classifier.json, model, sha256 of the weights file); nothing is unpickled."""
    document_uri = storage.join(model_uri, CLASSIFIER_FILE)
    if not storage.exists(document_uri, storage_options):
        raise ConfigError(f"--model: {redaction.redact(model_uri)} holds no {CLASSIFIER_FILE}; give the output.uri of "
                          "a finished `featurize train` run")
    document = ledger.read_json(document_uri, storage_options)
    weights_uri = storage.join(model_uri, document["weights_file"])
    if document["kind"] == "logistic":
        data = storage.read_bytes(weights_uri, storage_options)
        return document, LinearModel.load(data, document), hashlib.sha256(data).hexdigest()
    if document["kind"] == "mlp":
        with storage.local_copy(weights_uri, storage_options) as path:
            return document, MlpModel.load(path), storage.sha256_of_file(path)
    raise ConfigError(f"{model_uri}/{CLASSIFIER_FILE}: unknown classifier kind {document['kind']!r}; "
                     "expected logistic or mlp")


# -------------------------------------------------------------------------------------------------- train


@dataclass
class Outcome:
    """What either training way hands to the reporting code."""

    model: LinearModel | MlpModel
    classes: list[str]
    true_test: np.ndarray  # class indices
    predicted_test: np.ndarray
    num_train: int  # rows of the train split (the validation slice included)
    num_validation: int
    num_test: int
    skipped_error_rows: int
    skipped_unlabelled_rows: int
    split_method: str  # stratified | column | uri_hash
    epochs: int | None


def train(config: TrainConfig, console=None) -> dict:
    """Fit the configured classifier on committed features and write it, metrics.json and plots."""
    config.validate()
    # One writer per output (pipeline/output/lease.py): a second train on the same output stops before fitting.
    with lease.held(config.output.uri, config.output.storage_options, "train") as output_lease:
        return fit_and_write(config, console, output_lease)


def fit_and_write(config: TrainConfig, console, output_lease: lease.Lease) -> dict:
    started = time.perf_counter()
    log = console.log if console is not None else (lambda *args, **kwargs: None)
    features = open_features(config.features.uri, config.features.storage_options)
    labels = LabelSource(config.features, config.split, features.column_names)
    streaming = features.num_rows > config.classifier.max_in_memory_rows
    mode = "streaming" if streaming else "in_memory"
    log(f"training {config.classifier.kind} on {features.num_rows} rows ({mode}) of {', '.join(features.uris)}")
    outcome = (train_streaming if streaming else train_in_memory)(config, features, labels, log)
    fitted = time.perf_counter()

    metrics = {
        **classification_metrics(outcome.true_test, outcome.predicted_test, outcome.classes),
        "num_train": outcome.num_train,
        "num_validation": outcome.num_validation,
        "num_test": outcome.num_test,
        "skipped_error_rows": outcome.skipped_error_rows,
        "skipped_unlabelled_rows": outcome.skipped_unlabelled_rows,
        "classifier": {**asdict(config.classifier), "mode": mode},
        "split": {**asdict(config.split), "method": outcome.split_method},
        "features_uri": list(features.uris),
        "provenance": features.provenance,
        "feature_dim": features.feature_dim,
    }
    document = {
        "format_version": FORMAT_VERSION,
        "kind": outcome.model.kind,
        "classes": outcome.classes,
        "feature_dim": features.feature_dim,
        "provenance": features.provenance,
        "weights_file": outcome.model.weights_file,
        **outcome.model.document(),
        "features_uri": list(features.uris),
        "config": to_dict(config),
        "training": {"mode": mode, "epochs": outcome.epochs, "num_train": outcome.num_train,
                     "num_validation": outcome.num_validation, "num_test": outcome.num_test,
                     "seconds": {"fit": round(fitted - started, 3)}},
    }
    output_uri, options = config.output.uri, config.output.storage_options
    output_lease.check()
    storage.make_dirs(output_uri, options)
    outcome.model.save(output_uri, options)
    ledger.write_json(storage.join(output_uri, CLASSIFIER_FILE), document, options)
    storage.write_bytes(storage.join(output_uri, CONFUSION_PLOT_FILE),
                        confusion_matrix_png(metrics["confusion_matrix"], outcome.classes), options)
    storage.write_bytes(storage.join(output_uri, F1_PLOT_FILE), per_class_f1_png(metrics["per_class"]), options)
    output_lease.check()
    ledger.write_json(storage.join(output_uri, METRICS_FILE), metrics, options)  # last: marks the output done
    log(f"wrote classifier and metrics to {output_uri} in {time.perf_counter() - started:.1f}s")
    if console is not None:
        print_summary(metrics, console)
    return metrics


def train_in_memory(config: TrainConfig, features: FeatureSet, labels: LabelSource, log) -> Outcome:
    from sklearn.model_selection import train_test_split

    options = config.features.storage_options
    rows = Rows.concat([labelled_rows(read_features(uri, options, columns=labels.feature_columns),
                                      labels, features.feature_dim) for uri in features.uris])
    classes = sorted(set(rows.labels.tolist()))
    targets = encode_labels(rows.labels, classes)
    counts = np.bincount(targets, minlength=len(classes))
    check_classes(classes, counts)
    positions = np.arange(len(targets))
    if config.split.column:
        is_test = is_test_split(rows.splits, config.split.column)
        train_positions, test_positions, method = positions[~is_test], positions[is_test], "column"
    else:
        too_few = {name: count for name, count in zip(classes, counts.tolist()) if count < 2}
        if too_few:
            raise ConfigError(f"a stratified split needs at least 2 labelled rows per class; {too_few} have fewer. "
                             "Add rows for them, drop them from the labels, or set split.column")
        try:
            train_positions, test_positions = train_test_split(
                positions, test_size=config.split.test_fraction, stratify=targets, random_state=config.split.seed)
        except ValueError as error:
            raise ConfigError(f"stratified holdout of {len(targets)} rows in {len(classes)} classes with "
                             f"split.test_fraction={config.split.test_fraction} failed: {error}. Use a larger "
                             "test_fraction, more rows per class, or split.column") from error
        method = "stratified"
    check_classes(classes, np.bincount(targets[train_positions], minlength=len(classes)))
    log(f"{len(train_positions)} train / {len(test_positions)} test rows, {len(classes)} classes; skipped "
        f"{rows.num_error} error and {rows.num_unlabelled} unlabelled rows")

    features_train, targets_train = rows.features[train_positions], targets[train_positions]
    classifier = config.classifier
    num_validation, epochs = 0, None
    if classifier.kind == "logistic":
        model = fit_logistic(features_train, targets_train, classifier, config.split.seed)
    else:
        model, num_validation, epochs = fit_mlp_in_memory(features_train, targets_train, len(classes), classifier,
                                                          config.split.seed)
    predicted = model.predict_proba(rows.features[test_positions]).argmax(axis=1)
    return Outcome(model, classes, targets[test_positions], predicted, len(train_positions), num_validation,
                   len(test_positions), rows.num_error, rows.num_unlabelled, method, epochs)


def fit_mlp_in_memory(features: np.ndarray, targets: np.ndarray, num_classes: int, config: ClassifierConfig,
                      seed: int) -> tuple[MlpModel, int, int]:
    """The Keras head on arrays, early-stopped on a stratified validation slice; (model, validation rows, epochs)."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(targets))
    try:
        fit_part, validation_part = train_test_split(positions, test_size=config.validation_fraction,
                                                     stratify=targets, random_state=seed)
    except ValueError:  # a class too small to stratify the validation slice: take a plain random slice
        fit_part, validation_part = train_test_split(positions, test_size=config.validation_fraction,
                                                     random_state=seed)
    scaler = standard_scaler().fit(features[fit_part])
    network = build_mlp(features.shape[1], num_classes, scaler.mean_, scaler.scale_, config, seed)
    weights = (balanced_weights(np.bincount(targets[fit_part], minlength=num_classes))
               if config.class_weight == "balanced" else None)
    epochs = fit_mlp(network, {"x": features[fit_part], "y": targets[fit_part], "batch_size": config.batch_size,
                               "shuffle": True},
                     (features[validation_part], targets[validation_part]), config, weights)
    return MlpModel(network), len(validation_part), epochs


def standard_scaler():
    from sklearn.preprocessing import StandardScaler

    return StandardScaler()


def fit_logistic(features: np.ndarray, targets: np.ndarray, config: ClassifierConfig, seed: int) -> LinearModel:
    from sklearn.linear_model import LogisticRegression

    scaler = standard_scaler().fit(features)
    regression = LogisticRegression(C=config.regularization, max_iter=LOGISTIC_MAX_ITER, random_state=seed,
                                    class_weight="balanced" if config.class_weight == "balanced" else None)
    regression.fit(scaler.transform(features), targets)
    return LinearModel.from_fitted(scaler.mean_, scaler.scale_, regression.coef_, regression.intercept_, "softmax")


# ------------------------------------------------------------------------------------- streaming training


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int


@dataclass
class Scan:
    """What the first streaming pass learns: row groups with their band counts, classes, scaler, skips."""

    groups: list[tuple[RowGroup, np.ndarray]]  # counts per band (TRAIN, VALIDATION, TEST)
    classes: list[str]
    band_class_counts: np.ndarray  # (3, K)
    scaler: object
    num_error: int
    num_unlabelled: int


def hash_below(uri: str, fraction: float, salt: str = "") -> bool:
    return zlib.crc32((salt + uri).encode("utf-8")) % HASH_BUCKETS < round(fraction * HASH_BUCKETS)


def streaming_bands(rows: Rows, split: SplitConfig, validation_fraction: float) -> np.ndarray:
    """TEST by split column or uri hash; VALIDATION by a second, salted uri hash among the rest; else TRAIN."""
    if split.column:
        is_test = is_test_split(rows.splits, split.column)
    else:
        is_test = np.array([hash_below(uri, split.test_fraction) for uri in rows.uris], dtype=bool)
    is_validation = np.array([hash_below(uri, validation_fraction, "validation:") for uri in rows.uris], dtype=bool)
    bands = np.full(len(rows.uris), TRAIN, dtype=np.int8)
    bands[is_validation] = VALIDATION
    bands[is_test] = TEST
    return bands


class StreamingReader:
    """Reads the labelled rows of one row group: (features, class indices, bands); `classes` is set by `scan`."""

    def __init__(self, config: TrainConfig, features: FeatureSet, labels: LabelSource):
        self.config, self.features, self.labels = config, features, labels
        self.classes: list[str] = []

    def row_groups(self) -> Iterator[RowGroup]:
        for file in self.features.files:
            with parquet_file(file, self.config.features.storage_options) as parquet:
                num_row_groups = parquet.num_row_groups
            yield from (RowGroup(file, index) for index in range(num_row_groups))

    def rows(self, group: RowGroup) -> tuple[Rows, np.ndarray]:
        with parquet_file(group.file, self.config.features.storage_options) as parquet:
            table = parquet.read_row_group(group.index, columns=self.labels.feature_columns)
        rows = labelled_rows(table, self.labels, self.features.feature_dim)
        return rows, streaming_bands(rows, self.config.split, self.config.classifier.validation_fraction)

    def read(self, group: RowGroup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, bands = self.rows(group)
        return rows.features, encode_labels(rows.labels, self.classes), bands


def scan(reader: StreamingReader) -> Scan:
    scaler = standard_scaler()
    groups, label_counts = [], [Counter(), Counter(), Counter()]  # per band: rows per label
    num_error = num_unlabelled = 0
    for group in reader.row_groups():
        rows, bands = reader.rows(group)
        num_error += rows.num_error
        num_unlabelled += rows.num_unlabelled
        for band in (TRAIN, VALIDATION, TEST):
            label_counts[band].update(rows.labels[bands == band].tolist())
        if (bands == TRAIN).any():
            scaler.partial_fit(rows.features[bands == TRAIN])
        counts = np.bincount(bands, minlength=3)
        if counts.any():
            groups.append((group, counts))
    classes = sorted(set().union(*label_counts))
    band_class_counts = np.array([[label_counts[band][name] for name in classes] for band in range(3)],
                                 dtype=np.int64).reshape(3, len(classes))
    reader.classes = classes
    return Scan(groups, classes, band_class_counts, scaler, num_error, num_unlabelled)


def train_streaming(config: TrainConfig, features: FeatureSet, labels: LabelSource, log) -> Outcome:
    reader = StreamingReader(config, features, labels)
    scanned = scan(reader)
    check_classes(scanned.classes, scanned.band_class_counts[TRAIN])
    num_train, num_validation, num_test = (int(count) for count in scanned.band_class_counts.sum(axis=1))
    log(f"scanned {len(scanned.groups)} row groups: {num_train + num_validation} train ({num_validation} of them "
        f"validation) / {num_test} test rows, {len(scanned.classes)} classes; skipped {scanned.num_error} error "
        f"and {scanned.num_unlabelled} unlabelled rows")
    classifier = config.classifier
    weights = balanced_weights(scanned.band_class_counts[TRAIN]) if classifier.class_weight == "balanced" else None
    if classifier.kind == "logistic":
        model, epochs = fit_logistic_streaming(reader, scanned, classifier, config.split.seed, weights)
    else:
        model, epochs = fit_mlp_streaming(reader, scanned, classifier, config.split.seed, weights)
    true_test, predicted_test = [], []
    for group, counts in scanned.groups:
        if counts[TEST]:
            group_features, targets, bands = reader.read(group)
            true_test.append(targets[bands == TEST])
            predicted_test.append(model.predict_proba(group_features[bands == TEST]).argmax(axis=1))
    empty = [np.zeros(0, dtype=np.int64)]
    method = "column" if config.split.column else "uri_hash"
    return Outcome(model, scanned.classes, np.concatenate(true_test or empty),
                   np.concatenate(predicted_test or empty), num_train + num_validation, num_validation, num_test,
                   scanned.num_error, scanned.num_unlabelled, method, epochs)


def fit_logistic_streaming(reader: StreamingReader, scanned: Scan, config: ClassifierConfig, seed: int,
                           weights: np.ndarray | None) -> tuple[LinearModel, int]:
    """SGD log-loss over shuffled row groups; stops when the validation loss stops improving.

    The validation rows of each row group are scored just before the group's train rows update the model, so
    every epoch reads the data once (the loss is that of a model moving during the epoch, as in progressive
    validation). Without validation rows the train rows are scored the same way.
    """
    from sklearn.linear_model import SGDClassifier

    num_classes = len(scanned.classes)
    all_classes = np.arange(num_classes)
    class_weights = np.ones(num_classes) if weights is None else weights
    num_fit = max(int(scanned.band_class_counts[TRAIN].sum()), 1)
    sgd = SGDClassifier(loss="log_loss", alpha=1.0 / (config.regularization * num_fit), random_state=seed)
    monitor_band = VALIDATION if scanned.band_class_counts[VALIDATION].sum() else TRAIN
    groups = [group for group, counts in scanned.groups if counts[TRAIN] or counts[VALIDATION]]
    rng = np.random.default_rng(seed)
    best_loss, best, epochs_without_gain, epoch = math.inf, None, 0, 0
    for epoch in range(1, config.epochs + 1):
        loss_sum, loss_rows = 0.0, 0
        for position in rng.permutation(len(groups)):
            group_features, targets, bands = reader.read(groups[position])
            standardized = scanned.scaler.transform(group_features)
            monitored = bands == monitor_band
            if hasattr(sgd, "coef_") and monitored.any():
                probabilities = sgd.predict_proba(standardized[monitored])
                loss_sum -= np.log(np.clip(probabilities[np.arange(monitored.sum()), targets[monitored]],
                                           1e-15, None)).sum()
                loss_rows += int(monitored.sum())
            order = rng.permutation(np.flatnonzero(bands == TRAIN))
            if len(order):
                sgd.partial_fit(standardized[order], targets[order], classes=all_classes,
                                sample_weight=class_weights[targets[order]])
        loss = loss_sum / loss_rows if loss_rows else math.inf
        if best is None or loss < best_loss - STREAMING_LOSS_TOLERANCE:
            best_loss, best, epochs_without_gain = loss, (sgd.coef_.copy(), sgd.intercept_.copy()), 0
        else:
            epochs_without_gain += 1
            if epochs_without_gain >= config.patience:
                break
    coef, intercept = best
    return LinearModel.from_fitted(scanned.scaler.mean_, scanned.scaler.scale_, coef, intercept, "ovr"), epoch


def row_group_batches(reader: StreamingReader, groups: list[RowGroup], counts: list[int], band: int,
                      batch_size: int, seed: int, shuffle: bool):
    """A keras PyDataset over the rows of one band: batches never span row groups, one group read per group."""
    import keras

    class RowGroupBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.rng = np.random.default_rng(seed)
            self.cached: tuple[int, np.ndarray, np.ndarray] | None = None
            self.on_epoch_end()

        def on_epoch_end(self):
            order = self.rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
            self.batches = [(int(position), start) for position in order
                            for start in range(0, counts[position], batch_size)]
            self.cached = None

        def __len__(self):
            return len(self.batches)

        def __getitem__(self, index):
            position, start = self.batches[index]
            if self.cached is None or self.cached[0] != position:
                group_features, targets, bands = reader.read(groups[position])
                selected = np.flatnonzero(bands == band)
                if shuffle:
                    selected = self.rng.permutation(selected)
                self.cached = (position, group_features[selected], targets[selected])
            _, group_features, targets = self.cached
            return group_features[start:start + batch_size], targets[start:start + batch_size]

    return RowGroupBatches()


def fit_mlp_streaming(reader: StreamingReader, scanned: Scan, config: ClassifierConfig, seed: int,
                      weights: np.ndarray | None) -> tuple[MlpModel, int]:
    network = build_mlp(reader.features.feature_dim, len(scanned.classes), scanned.scaler.mean_,
                        scanned.scaler.scale_, config, seed)

    def band_data(band: int, shuffle: bool):
        selected = [(group, int(counts[band])) for group, counts in scanned.groups if counts[band]]
        if not selected:
            return None
        groups, counts = zip(*selected)
        return row_group_batches(reader, list(groups), list(counts), band, config.batch_size, seed, shuffle)

    validation = band_data(VALIDATION, shuffle=False)
    epochs = fit_mlp(network, {"x": band_data(TRAIN, shuffle=True), "shuffle": False}, validation, config, weights)
    return MlpModel(network), epochs


# ----------------------------------------------------------------------------------------------- metrics


def classification_metrics(true: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    if len(true) == 0:
        raise ConfigError("the test split is empty: nothing to measure; raise split.test_fraction or add rows")
    indices = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=indices,
                                                                     zero_division=0)
    return {
        "accuracy": float(accuracy_score(true, predicted)),
        # mean recall over the classes the test split holds (sklearn's balanced_accuracy_score, minus its warning)
        "balanced_accuracy": float(recall[np.unique(true)].mean()),
        "macro_f1": float(f1_score(true, predicted, labels=indices, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(precision[index]), "recall": float(recall[index]),
                             "f1": float(f1[index]), "support": int(support[index])}
                      for index, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(true, predicted, labels=indices).tolist(),
        "classes": list(classes),
    }


def confusion_matrix_png(matrix: list[list[int]], classes: list[str]) -> bytes:
    from matplotlib.figure import Figure  # Figure without pyplot renders with Agg: no GUI, no global state

    counts = np.asarray(matrix)
    side = min(max(4.0, 0.45 * len(classes) + 2.0), 30.0)
    figure = Figure(figsize=(side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    if len(classes) <= 50:
        axes.set_xticks(range(len(classes)), labels=classes, rotation=90)
        axes.set_yticks(range(len(classes)), labels=classes)
    if len(classes) <= 30:
        threshold = counts.max() / 2 if counts.size else 0
        for (row, column), value in np.ndenumerate(counts):
            axes.text(column, row, str(value), ha="center", va="center", fontsize=8,
                      color="white" if value > threshold else "black")
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion matrix (test split)")
    figure.tight_layout()
    return charts.figure_png(figure)


def per_class_f1_png(per_class: dict) -> bytes:
    from matplotlib.figure import Figure

    names = list(per_class)
    figure = Figure(figsize=(7.0, min(max(3.0, 0.3 * len(names) + 1.5), 40.0)))
    axes = figure.add_subplot()
    axes.barh(range(len(names)), [per_class[name]["f1"] for name in names], color="tab:blue")
    axes.set_yticks(range(len(names)), labels=names if len(names) <= 100 else [""] * len(names))
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("F1 (test split)")
    axes.set_title("Per-class F1")
    figure.tight_layout()
    return charts.figure_png(figure)


def print_summary(metrics: dict, console) -> None:
    """Overall metrics and a per-class table, with rich."""
    from rich.table import Table

    classifier = metrics.get("classifier", {})
    overall = Table(title=f"Classifier {classifier.get('kind', '?')} ({classifier.get('mode', '?')})")
    overall.add_column("metric")
    overall.add_column("value", justify="right")
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        overall.add_row(key, f"{metrics[key]:.4f}")
    for key in ("num_train", "num_validation", "num_test", "skipped_error_rows", "skipped_unlabelled_rows"):
        if key in metrics:
            overall.add_row(key, str(metrics[key]))
    console.print(overall)
    per_class = Table(title="Per class (test split)")
    for name, justify in (("class", "left"), ("precision", "right"), ("recall", "right"), ("f1", "right"),
                          ("support", "right")):
        per_class.add_column(name, justify=justify)
    for name, values in metrics["per_class"].items():
        per_class.add_row(name, f"{values['precision']:.3f}", f"{values['recall']:.3f}", f"{values['f1']:.3f}",
                          str(values["support"]))
    console.print(per_class)
