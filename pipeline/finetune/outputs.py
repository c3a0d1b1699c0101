"""The files of a finished fine-tune, written by the driver from the worker's outcome:

    model.keras         the network with its new head, preprocessing in the graph (a copy of the best epoch's)
    class_names.txt     one class a line, in the head's order (extract's `model.class_names`)
    curves.png          loss and accuracy per epoch, train and validation, phases marked
    metrics.json        written last (it marks the output done): held-out accuracy, balanced accuracy, per class,
                        the linear probe on the frozen network for comparison, the history, the images left out,
                        and provenance (base model checksums, the listing's sha256, every setting)
"""

from __future__ import annotations

from pipeline import charts
from pipeline.config import FinetuneConfig, to_dict
from pipeline.finetune.checkpoints import BEST_FILE, Checkpoints
from pipeline.finetune.data import Splits
from pipeline.finetune.training import Outcome
from pipeline.io import storage
from pipeline.models.provenance import distribution_version
from pipeline.output import layout, ledger

MODEL_FILE = "model.keras"
CLASS_NAMES_FILE = "class_names.txt"
CURVES_FILE = "curves.png"
METRICS_FILE = layout.METRICS_FILE


def write_outputs(config: FinetuneConfig, splits: Splits, outcome: Outcome, fingerprint: str, output_lease) -> dict:
    from pipeline.train.metrics import classification_metrics

    uri, options = config.output.uri, config.output.storage_options
    checkpoints = Checkpoints(uri, options)
    metrics = {
        **classification_metrics(outcome.true_test, outcome.predicted_test, splits.classes),
        "linear_probe": outcome.state.probe,
        "num_train": len(splits.train), "num_validation": len(splits.validation), "num_test": len(splits.test),
        "skipped_unlabelled_images": splits.skipped_unlabelled,
        "left_out_images": outcome.left_out,
        "epochs": outcome.state.epoch, "best_epoch": outcome.state.best_epoch,
        "resumed_from_epochs": [start for start in outcome.state.starts if start],
        "history": outcome.state.history,  # with run.workers > 1, each epoch's steps and images per worker
        "workers": config.run.workers,
        "seconds": round(outcome.seconds, 1),
        "fingerprint": fingerprint,
        "provenance": provenance(config, splits, outcome),
    }
    output_lease.check()
    storage.write_bytes(storage.join(uri, MODEL_FILE), storage.read_bytes(checkpoints.uri(BEST_FILE), options), options)
    storage.write_bytes(storage.join(uri, CLASS_NAMES_FILE), "".join(f"{name}\n" for name in splits.classes).encode(),
                        options)
    storage.write_bytes(storage.join(uri, CURVES_FILE), curves_png(outcome.state.history), options)
    output_lease.check()
    ledger.write_json(storage.join(uri, METRICS_FILE), metrics, options)  # last: marks the output done
    return metrics


def provenance(config: FinetuneConfig, splits: Splits, outcome: Outcome) -> dict:
    import keras
    import tensorflow as tf

    return {"base_model": config.model.backbone, "base_weights": config.model.weights,
            "base_weights_sha256": outcome.base_checksums.get("weights", ""),
            "base_backbone_sha256": outcome.base_checksums.get("backbone", ""),
            "input_size": f"{outcome.input_size[0]}x{outcome.input_size[1]}", "preprocess": outcome.preprocess,
            "listing_sha256": splits.listing_sha256, "classes": splits.classes, "settings": to_dict(config),
            "keras_version": keras.__version__, "tensorflow_version": tf.__version__,
            "featurize_version": distribution_version("featurize")}


def curves_png(history: list[dict]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10.0, 4.0))
    epochs = [record["epoch"] for record in history]
    for position, (metric, title) in enumerate((("loss", "Loss"), ("accuracy", "Accuracy")), start=1):
        axes = figure.add_subplot(1, 2, position)
        axes.plot(epochs, [record[metric] for record in history], marker="o", label="train (augmented)")
        axes.plot(epochs, [record[f"val_{metric}"] for record in history], marker="o", label="validation")
        switches = [record["epoch"] - 0.5 for previous, record in zip(history, history[1:])
                    if record["phase"] != previous["phase"]]
        for switch in switches:
            axes.axvline(switch, color="grey", linestyle="--", linewidth=1)
        axes.set_xlabel("epoch (dashed: the network starts training)" if switches else "epoch")
        axes.set_title(title)
        axes.legend()
    figure.tight_layout()
    return charts.figure_png(figure)


def finished_metrics(config: FinetuneConfig, fingerprint: str) -> dict | None:
    """metrics.json of a finished fine-tune with these settings and images (a rerun has nothing to do)."""
    uri = storage.join(config.output.uri, METRICS_FILE)
    if not storage.exists(uri, config.output.storage_options):
        return None
    metrics = ledger.read_json(uri, config.output.storage_options)
    return metrics if metrics.get("fingerprint") == fingerprint else None
