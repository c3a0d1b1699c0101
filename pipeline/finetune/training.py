"""The training loop of one worker: the linear probe on the frozen network, then phase 1 (the new head alone) and
phase 2 (the top of the network too), an epoch at a time, each finished epoch checkpointed to the output; then
the best epoch's classifier on the held-out test split. No Ray: pipeline/finetune/workers.py runs it in an actor.

An epoch is one `fit` over a fresh stream of the train split (a new shuffle), then `evaluate` on the validation
slice. A phase stops early after `finetune.patience` epochs without a lower validation loss; the model kept is the
epoch with the lowest validation loss over both phases. A rerun resumes after the last finished epoch: its weights,
optimizer state and history come back from the checkpoint, and the same seeds give the same shuffles.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.config import ClassifierConfig, FinetuneConfig, FinetuneOptions
from pipeline.finetune import network
from pipeline.finetune.checkpoints import BEST_FILE, LAST_FILE, Checkpoints, State
from pipeline.finetune.data import Part, Splits, Stream

log = logging.getLogger(__name__)

PHASES = ("head", "network")


@dataclass(frozen=True)
class Job:
    """What a worker needs: the settings, the split, and the fingerprint its checkpoints carry."""

    config: FinetuneConfig
    splits: Splits
    fingerprint: str


@dataclass
class Outcome:
    """What the driver writes the outputs from."""

    state: State
    true_test: np.ndarray
    predicted_test: np.ndarray
    left_out: dict[str, str]  # images that could not be decoded, with the reason
    base_checksums: dict
    input_size: tuple[int, int]
    preprocess: str
    seconds: float


def phase_plan(config: FinetuneConfig) -> list[tuple[str, int, float]]:
    """(phase, epochs, learning rate) in order; phase 2 only when it has epochs."""
    options = config.finetune
    plan = [("head", options.head_epochs, options.head_learning_rate)]
    if options.epochs:
        plan.append(("network", options.epochs, options.learning_rate))
    return plan


def phase_of(epoch: int, plan: list[tuple[str, int, float]]) -> tuple[str, float, int]:
    """(phase, learning rate, the epoch that phase ends at) of epoch index `epoch` (0-based)."""
    end = 0
    for phase, epochs, learning_rate in plan:
        end += epochs
        if epoch < end:
            return phase, learning_rate, end
    raise ValueError(f"epoch {epoch} is past the plan's {end} epochs")


def fit_epoch(training_model, stream: Stream, part: Part, options: FinetuneOptions, seed: int, phase: str,
              learning_rate: float) -> dict:
    """One worker's epoch: one `fit` over a fresh shuffle of `part`; its training loss and accuracy."""
    with warnings.catch_warnings():  # an epoch is one pass over a generator: Keras warns when it ends
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        fitted = training_model.fit(stream.batches(part, options.batch_size, seed), epochs=1, shuffle=False,
                                    verbose=0)
    return {"loss": float(fitted.history["loss"][-1]), "accuracy": float(fitted.history["accuracy"][-1])}


def new_training_model(base, splits: Splits, config: FinetuneConfig):
    classifier = network.build_classifier(base, len(splits.classes), config.model, config.finetune)
    return network.build_training_model(classifier, config.finetune)


def run_training(job: Job, checkpoints: Checkpoints, decode_threads: int, fit=fit_epoch) -> Outcome:
    """The whole run on this worker; `fit` trains an epoch (here, or over several workers: workers.py)."""
    started = time.perf_counter()
    config, splits = job.config, job.splits
    state = checkpoints.read_state(job.fingerprint)
    state.starts.append(state.epoch)
    base = network.load_base(config.model, config.input.storage_options)
    stream = Stream(config.input.storage_options, config.model, base.core.input_size, decode_threads)
    if state.epoch and checkpoints.has(LAST_FILE):
        training_model = checkpoints.load_model(LAST_FILE, compile=True)
        log.info("resuming after epoch %d (%s)", state.epoch, checkpoints.uri(LAST_FILE))
    else:
        state = State(job.fingerprint, starts=[0], probe=state.probe)  # no epoch finished yet: start afresh
        training_model = new_training_model(base, splits, config)
    if state.probe is None:
        state.probe = linear_probe(network.classifier_of(training_model), stream, splits, config)
        checkpoints.write_state(state)
    train_epochs(training_model, stream, splits, config, checkpoints, state, fit)
    best = checkpoints.load_model(BEST_FILE, compile=False)
    true_test, predicted_test = predict(best, stream, splits.test, config.finetune.batch_size)
    return Outcome(state, true_test, predicted_test, dict(stream.left_out), asdict(base.checksums),
                   base.core.input_size, base.preprocess, time.perf_counter() - started)


def train_epochs(training_model, stream: Stream, splits: Splits, config: FinetuneConfig, checkpoints: Checkpoints,
                 state: State, fit=fit_epoch) -> None:
    options = config.finetune
    plan = phase_plan(config)
    total = sum(epochs for _, epochs, _ in plan)
    classifier = network.classifier_of(training_model)
    while state.epoch < total:
        phase, learning_rate, phase_end = phase_of(state.epoch, plan)
        if phase in state.phase_done:
            state.epoch = phase_end
            continue
        if state.compiled_phase != phase:
            network.set_phase(classifier, phase, options)
            network.compile_for(training_model, learning_rate)
            state.compiled_phase, state.epochs_since_best = phase, 0
        started = time.perf_counter()
        fitted = fit(training_model, stream, splits.train, options, options.seed + state.epoch, phase, learning_rate)
        validation = training_model.evaluate(stream.batches(splits.validation, options.batch_size), verbose=0,
                                             return_dict=True)
        state.epoch += 1
        record = {"epoch": state.epoch, "phase": phase, "loss": fitted.pop("loss"), "accuracy": fitted.pop("accuracy"),
                  "val_loss": float(validation["loss"]), "val_accuracy": float(validation["accuracy"]),
                  "seconds": round(time.perf_counter() - started, 2), **fitted}  # data-parallel: what each worker did
        state.history.append(record)
        log.info(describe_epoch(record))
        if state.best_val_loss is None or record["val_loss"] < state.best_val_loss:
            state.best_val_loss, state.best_epoch, state.epochs_since_best = record["val_loss"], state.epoch, 0
            checkpoints.save_model(classifier, BEST_FILE)
        else:
            state.epochs_since_best += 1
            if state.epochs_since_best >= options.patience and state.epoch < phase_end:
                log.info("phase %s stops early: %d epochs without a lower validation loss", phase, options.patience)
                state.phase_done.append(phase)
        checkpoints.save_model(training_model, LAST_FILE)
        checkpoints.write_state(state)  # last: the state names only what is written


def describe_epoch(record: dict) -> str:
    replaced = f", {record['workers_replaced']} lost worker(s) replaced" if record.get("workers_replaced") else ""
    return (f"epoch {record['epoch']} ({record['phase']}): loss {record['loss']:.4f} accuracy "
            f"{record['accuracy']:.4f}, validation loss {record['val_loss']:.4f} accuracy "
            f"{record['val_accuracy']:.4f}, {record['seconds']:.1f} s{replaced}")


def predict(classifier, stream: Stream, part: Part, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) class indices of the images of `part` that decode."""
    true, predicted = [], []
    for pixels, targets in stream.batches(part, batch_size):
        predicted.append(np.asarray(classifier.predict_on_batch(pixels)).argmax(axis=1))
        true.append(targets)
    return (np.concatenate(true) if true else np.zeros(0, np.int64),
            np.concatenate(predicted) if predicted else np.zeros(0, np.int64))


def features_of(model, stream: Stream, part: Part, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    features, targets = [], []
    for pixels, batch_targets in stream.batches(part, batch_size):
        features.append(np.asarray(model.predict_on_batch(pixels)))
        targets.append(batch_targets)
    return np.concatenate(features), np.concatenate(targets)


def linear_probe(classifier, stream: Stream, splits: Splits, config: FinetuneConfig) -> dict:
    """The comparison: logistic regression (as `featurize train` fits it) on the frozen base network's pooled
    features of the same train split (validation slice included), measured on the same test split."""
    from pipeline.train.fit import fit_logistic
    from pipeline.train.metrics import classification_metrics

    started = time.perf_counter()
    features = network.feature_network(classifier)
    train = Part(splits.train.uris + splits.validation.uris,
                 np.concatenate([splits.train.targets, splits.validation.targets]))
    train_features, train_targets = features_of(features, stream, train, config.finetune.batch_size)
    test_features, test_targets = features_of(features, stream, splits.test, config.finetune.batch_size)
    model = fit_logistic(train_features, train_targets, ClassifierConfig(), config.split.seed)
    predicted = model.predict_proba(test_features).argmax(axis=1)
    metrics = classification_metrics(test_targets, predicted, splits.classes)
    log.info("linear probe on the frozen network: accuracy %.4f (%.1f s)", metrics["accuracy"],
             time.perf_counter() - started)
    return {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
            "macro_f1": metrics["macro_f1"], "per_class": metrics["per_class"],
            "classifier": "logistic", "num_train": int(len(train_targets)), "num_test": int(len(test_targets))}
