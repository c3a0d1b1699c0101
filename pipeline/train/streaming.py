"""Training on more rows than memory holds: Parquet row groups are read one at a time, never all at once.

Chosen by the train stage when `_SUCCESS` counts more rows (error rows included) than
`classifier.max_in_memory_rows`. The holdout is a deterministic hash of the uri,
`crc32(uri) % 1000 < test_fraction * 1000` (or `split.column`), so no materialisation is needed; the validation
slice that early stopping watches is a second, salted uri hash among the rest. A first pass fits the scaler
(`StandardScaler.partial_fit`) and counts classes; then "logistic" = SGDClassifier(loss="log_loss", one-vs-rest)
with `partial_fit` over shuffled row groups, "mlp" = the Keras head fitted from a `keras.utils.PyDataset` over row
groups. A last pass scores the test rows.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import ClassifierConfig, SplitConfig, TrainConfig
from pipeline.output.features import FeatureSet, parquet_file
from pipeline.train import labels
from pipeline.train.classifiers import LinearModel, MlpModel, build_mlp, fit_mlp, standard_scaler
from pipeline.train.metrics import Outcome

log = logging.getLogger(__name__)

TRAIN, VALIDATION, TEST = 0, 1, 2  # row bands
HASH_BUCKETS = 1000
STREAMING_LOSS_TOLERANCE = 1e-4  # smaller validation-loss gains count as no improvement


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


def streaming_bands(rows: labels.Rows, split: SplitConfig, validation_fraction: float) -> np.ndarray:
    """TEST by split column or uri hash; VALIDATION by a second, salted uri hash among the rest; else TRAIN."""
    if split.column:
        is_test = labels.is_test_split(rows.splits, split.column)
    else:
        is_test = np.array([hash_below(uri, split.test_fraction) for uri in rows.uris], dtype=bool)
    is_validation = np.array([hash_below(uri, validation_fraction, "validation:") for uri in rows.uris], dtype=bool)
    bands = np.full(len(rows.uris), TRAIN, dtype=np.int8)
    bands[is_validation] = VALIDATION
    bands[is_test] = TEST
    return bands


class StreamingReader:
    """Reads the labelled rows of one row group: (features, class indices, bands); `classes` is set by `scan`."""

    def __init__(self, config: TrainConfig, features: FeatureSet, label_source: labels.LabelSource):
        self.config, self.features, self.label_source = config, features, label_source
        self.classes: list[str] = []

    def row_groups(self) -> Iterator[RowGroup]:
        for file in self.features.files:
            with parquet_file(file, self.config.features.storage_options) as parquet:
                num_row_groups = parquet.num_row_groups
            yield from (RowGroup(file, index) for index in range(num_row_groups))

    def rows(self, group: RowGroup) -> tuple[labels.Rows, np.ndarray]:
        with parquet_file(group.file, self.config.features.storage_options) as parquet:
            table = parquet.read_row_group(group.index, columns=self.label_source.feature_columns)
        rows = labels.labelled_rows(table, self.label_source, self.features.feature_dim)
        return rows, streaming_bands(rows, self.config.split, self.config.classifier.validation_fraction)

    def read(self, group: RowGroup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, bands = self.rows(group)
        return rows.features, labels.encode_labels(rows.labels, self.classes), bands


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


def train_streaming(config: TrainConfig, features: FeatureSet, label_source: labels.LabelSource) -> Outcome:
    reader = StreamingReader(config, features, label_source)
    scanned = scan(reader)
    labels.check_classes(scanned.classes, scanned.band_class_counts[TRAIN])
    num_train, num_validation, num_test = (int(count) for count in scanned.band_class_counts.sum(axis=1))
    log.info("scanned %d row groups: %d train (%d of them validation) / %d test rows, %d classes; skipped %d error "
             "and %d unlabelled rows", len(scanned.groups), num_train + num_validation, num_validation, num_test,
             len(scanned.classes), scanned.num_error, scanned.num_unlabelled)
    classifier = config.classifier
    train_counts = scanned.band_class_counts[TRAIN]
    weights = labels.balanced_weights(train_counts) if classifier.class_weight == "balanced" else None
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


