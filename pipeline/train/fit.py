"""The train stage: committed Parquet features -> classifier -> classifier files, metrics.json, plots.

Inputs are one or more finished extract outputs (`features.uri`, see features.py); labels and the split column
come from the rows or a labels file (labels.py). Two ways to train, chosen in `train()` before any data is read:

- in memory (row count <= `classifier.max_in_memory_rows`; rows counted from `_SUCCESS` `rows.total`, error
  rows included): all rows are read with `output.features.read_features`; stratified holdout with `train_test_split`;
  "logistic" = StandardScaler + LogisticRegression (lbfgs, softmax); "mlp" = a small Keras head fitted on arrays,
  early-stopped on a stratified validation slice of the train split (`classifier.validation_fraction`).
- streaming (more rows than that): row group by row group, see streaming.py.

Both ways write the same outputs under `output.uri` (any fsspec URI): the classifier (classifiers.py), then its
plots and, last, metrics.json (metrics.py), whose presence marks the output done. `train()` returns the metrics
and logs its progress; printing a summary is the caller's choice (`metrics.print_summary`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np

from pipeline.config import ClassifierConfig, SplitConfig, TrainConfig, to_dict
from pipeline.errors import ConfigError
from pipeline.io import storage
from pipeline.output import lease, ledger
from pipeline.output.features import FeatureSet, open_features, read_features
from pipeline.train.classifiers import CLASSIFIER_FILE, LinearModel, MlpModel, build_mlp, fit_mlp, standard_scaler
from pipeline.train.labels import (
    LabelSource,
    Rows,
    balanced_weights,
    check_classes,
    encode_labels,
    is_test_split,
    labelled_rows,
)
from pipeline.train.metrics import METRICS_FILE, Outcome, classification_metrics, plots
from pipeline.train.streaming import train_streaming

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LOGISTIC_MAX_ITER = 5000


def train(config: TrainConfig) -> dict:
    """Fit the configured classifier on committed features, write it, metrics.json and plots; return the metrics."""
    config.validate()
    # One writer per output (pipeline/output/lease.py): a second train on the same output stops before fitting.
    with lease.held(config.output.uri, config.output.storage_options, "train") as output_lease:
        return fit_and_write(config, output_lease)


def fit_and_write(config: TrainConfig, output_lease: lease.Lease) -> dict:
    started = time.perf_counter()
    features = open_features(config.features.uri, config.features.storage_options)
    label_source = LabelSource(config.features, config.split, features.column_names)
    streaming = features.num_rows > config.classifier.max_in_memory_rows
    mode = "streaming" if streaming else "in_memory"
    log.info("training %s on %d rows (%s) of %s", config.classifier.kind, features.num_rows, mode,
             ", ".join(features.uris))
    outcome = (train_streaming if streaming else train_in_memory)(config, features, label_source)
    seconds = {"fit": round(time.perf_counter() - started, 3)}
    metrics = metrics_document(config, features, mode, outcome)
    document = classifier_document(config, features, mode, outcome, seconds)

    output_uri, options = config.output.uri, config.output.storage_options
    output_lease.check()
    storage.make_dirs(output_uri, options)
    outcome.model.save(output_uri, options)
    ledger.write_json(storage.join(output_uri, CLASSIFIER_FILE), document, options)
    for name, image in plots(metrics).items():
        storage.write_bytes(storage.join(output_uri, name), image, options)
    output_lease.check()
    ledger.write_json(storage.join(output_uri, METRICS_FILE), metrics, options)  # last: marks the output done
    log.info("wrote classifier and metrics to %s in %.1fs", output_uri, time.perf_counter() - started)
    return metrics


def metrics_document(config: TrainConfig, features: FeatureSet, mode: str, outcome: Outcome) -> dict:
    """metrics.json: the test-split metrics plus what was trained on, and how."""
    return {
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


def classifier_document(config: TrainConfig, features: FeatureSet, mode: str, outcome: Outcome,
                        seconds: dict) -> dict:
    """classifier.json: what `load_classifier` and `predict` need, and the training summary."""
    return {
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
                     "num_validation": outcome.num_validation, "num_test": outcome.num_test, "seconds": seconds},
    }


def train_in_memory(config: TrainConfig, features: FeatureSet, label_source: LabelSource) -> Outcome:
    options = config.features.storage_options
    rows = Rows.concat([labelled_rows(read_features(uri, options, columns=label_source.feature_columns),
                                      label_source, features.feature_dim) for uri in features.uris])
    classes = sorted(set(rows.labels.tolist()))
    targets = encode_labels(rows.labels, classes)
    check_classes(classes, np.bincount(targets, minlength=len(classes)))
    train_positions, test_positions, method = holdout(rows, targets, classes, config.split)
    check_classes(classes, np.bincount(targets[train_positions], minlength=len(classes)))
    log.info("%d train / %d test rows, %d classes; skipped %d error and %d unlabelled rows", len(train_positions),
             len(test_positions), len(classes), rows.num_error, rows.num_unlabelled)

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


def holdout(rows: Rows, targets: np.ndarray, classes: list[str], split: SplitConfig,
            ) -> tuple[np.ndarray, np.ndarray, str]:
    """(train positions, test positions, split method): by `split.column`, else a stratified random holdout."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(targets))
    if split.column:
        is_test = is_test_split(rows.splits, split.column)
        return positions[~is_test], positions[is_test], "column"
    counts = np.bincount(targets, minlength=len(classes))
    too_few = {name: count for name, count in zip(classes, counts.tolist()) if count < 2}
    if too_few:
        raise ConfigError(f"a stratified split needs at least 2 labelled rows per class; {too_few} have fewer. "
                         "Add rows for them, drop them from the labels, or set split.column")
    try:
        train_positions, test_positions = train_test_split(positions, test_size=split.test_fraction,
                                                           stratify=targets, random_state=split.seed)
    except ValueError as error:
        raise ConfigError(f"stratified holdout of {len(targets)} rows in {len(classes)} classes with "
                         f"split.test_fraction={split.test_fraction} failed: {error}. Use a larger "
                         "test_fraction, more rows per class, or split.column") from error
    return train_positions, test_positions, "stratified"


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


def fit_logistic(features: np.ndarray, targets: np.ndarray, config: ClassifierConfig, seed: int) -> LinearModel:
    from sklearn.linear_model import LogisticRegression

    scaler = standard_scaler().fit(features)
    regression = LogisticRegression(C=config.regularization, max_iter=LOGISTIC_MAX_ITER, random_state=seed,
                                    class_weight="balanced" if config.class_weight == "balanced" else None)
    regression.fit(scaler.transform(features), targets)
    return LinearModel.from_fitted(scaler.mean_, scaler.scale_, regression.coef_, regression.intercept_, "softmax")
