"""Trained classifiers, one class per `classifier.kind`, each with the same small interface.

A kind is a class with `kind` and `weights_file` names, `predict_proba`, `save`, `document` (its extra keys for
`classifier.json`) and `load`; `KINDS` lists them, so `load_classifier` and the train stage's writer need no
change for a new kind. Nothing here unpickles: saved classifiers are plain arrays, JSON and Keras files.

    classifier.json     kind, classes, feature provenance and dim, config, training summary
    classifier.npz      logistic: mean, scale, coef (K x D), intercept (K) -- loads with allow_pickle=False
    classifier.keras    mlp: the Keras model (standardisation inside), loads with safe_mode=True
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from pipeline.config import ClassifierConfig
from pipeline.errors import ConfigError
from pipeline.io import redaction, storage
from pipeline.output import ledger

CLASSIFIER_FILE = "classifier.json"
LOGISTIC_WEIGHTS_FILE = "classifier.npz"
MLP_WEIGHTS_FILE = "classifier.keras"


class Classifier(Protocol):
    """What the train stage writes and `predict` applies, whatever the kind."""

    kind: ClassVar[str]  # the `classifier.kind` it implements
    weights_file: ClassVar[str]  # its file, relative to the train output

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(rows, K) class probabilities of (rows, dim) float32 features."""

    def save(self, output_uri: str, storage_options: dict | None) -> None:
        """Writes `weights_file` under `output_uri`."""

    def document(self) -> dict:
        """Keys `classifier.json` needs besides the common ones to load it again."""

    @classmethod
    def load(cls, weights_uri: str, document: dict, storage_options: dict | None) -> tuple[Classifier, str]:
        """(the classifier, sha256 of its weights file)."""


@dataclass
class LinearModel:
    """Standardise, then a linear map to K class scores: softmax (multinomial) or normalised sigmoids (ovr)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (K, dim)
    intercept: np.ndarray  # (K,)
    link: str  # softmax | ovr
    kind: ClassVar[str] = "logistic"
    weights_file: ClassVar[str] = LOGISTIC_WEIGHTS_FILE

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
    def load(cls, weights_uri: str, document: dict, storage_options: dict | None) -> tuple[LinearModel, str]:
        data = storage.read_bytes(weights_uri, storage_options)
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            model = cls(arrays["mean"], arrays["scale"], arrays["coef"], arrays["intercept"], document["link"])
        return model, hashlib.sha256(data).hexdigest()


class MlpModel:
    """A small Keras head; standardisation is its first layer, so the saved file is self-contained."""

    kind: ClassVar[str] = "mlp"
    weights_file: ClassVar[str] = MLP_WEIGHTS_FILE

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
    def load(cls, weights_uri: str, document: dict, storage_options: dict | None) -> tuple[MlpModel, str]:
        import keras

        with storage.local_copy(weights_uri, storage_options) as path:
            model = cls(keras.saving.load_model(path, compile=False, safe_mode=True))
            return model, storage.sha256_of_file(path)


KINDS: dict[str, type[Classifier]] = {kind.kind: kind for kind in (LinearModel, MlpModel)}


def load_classifier(model_uri: str, storage_options: dict | None = None) -> tuple[dict, Classifier, str]:
    """(classifier.json, model, sha256 of the weights file); nothing is unpickled."""
    document_uri = storage.join(model_uri, CLASSIFIER_FILE)
    if not storage.exists(document_uri, storage_options):
        raise ConfigError(f"--model: {redaction.redact(model_uri)} holds no {CLASSIFIER_FILE}; give the output.uri of "
                          "a finished `featurize train` run")
    document = ledger.read_json(document_uri, storage_options)
    kind = KINDS.get(document["kind"])
    if kind is None:
        raise ConfigError(f"{model_uri}/{CLASSIFIER_FILE}: unknown classifier kind {document['kind']!r}; "
                         f"expected {' or '.join(KINDS)}")
    model, weights_sha256 = kind.load(storage.join(model_uri, document["weights_file"]), document, storage_options)
    return document, model, weights_sha256


def standard_scaler():
    from sklearn.preprocessing import StandardScaler

    return StandardScaler()


def build_mlp(feature_dim: int, num_classes: int, mean: np.ndarray, scale: np.ndarray, config: ClassifierConfig,
              seed: int):
    """The mlp kind's Keras head, compiled; standardisation (mean, scale) is its first layer."""
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
    """Keras fit with early stopping on the validation loss (restoring the best weights); returns the epochs run."""
    import keras

    monitor = "val_loss" if validation_data is not None else "loss"
    stopper = keras.callbacks.EarlyStopping(monitor=monitor, patience=config.patience, restore_best_weights=True)
    history = model.fit(**train_data, validation_data=validation_data, epochs=config.epochs, verbose=0,
                        callbacks=[stopper],
                        class_weight=None if class_weight is None else dict(enumerate(class_weight.tolist())))
    return len(history.history.get("loss", []))
