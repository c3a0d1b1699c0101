"""How well a fitted classifier does on the test split: metrics.json, its plots, and a summary table.

    metrics.json        accuracy, balanced_accuracy, macro_f1, per_class, confusion_matrix, classes, counts...
    confusion_matrix.png, per_class_f1.png
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import charts
from pipeline.errors import ConfigError
from pipeline.output import layout
from pipeline.train.classifiers import Classifier

METRICS_FILE = layout.METRICS_FILE
CONFUSION_PLOT_FILE = "confusion_matrix.png"
F1_PLOT_FILE = "per_class_f1.png"


@dataclass
class Outcome:
    """What either way of training (in memory, streaming) hands to the reporting code."""

    model: Classifier
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


def plots(metrics: dict) -> dict[str, bytes]:
    """The PNG files of a train output, by file name."""
    return {CONFUSION_PLOT_FILE: confusion_matrix_png(metrics["confusion_matrix"], metrics["classes"]),
            F1_PLOT_FILE: per_class_f1_png(metrics["per_class"])}


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
