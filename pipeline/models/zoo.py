"""The zoo: every Keras applications model, each entry carrying its own preprocessing (timm-style registry).

An entry says how to build the network (`constructor`, a `keras.applications` function), what it expects
(`input_size`, `preprocess`) and what it gives (`feature_dim`: the size of the globally pooled last
feature map, the default feature cut). The numbers for `featurize models` come from the table of the
Keras applications docs (https://keras.io/api/applications/); MobileNetV3, absent from that table,
takes parameters and top-1 from the `keras.applications.MobileNetV3*` docstring, and its size the way the
table's rows read: the HDF5 weights file of the whole model (head included) in MiB, measured by saving
the weights=None model in Keras's HDF5 weights format (the same measurement gives the table's 16, 14
and 23 for MobileNet, MobileNetV2 and NASNetMobile).

Importing this module does not import Keras or TensorFlow: constructors resolve on first call, so
`featurize models` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.contract import PREPROCESS_MODES, ZOO_TABLE, unknown_backbone, zoo_key
from pipeline.errors import ConfigError


class LazyConstructor:
    """`keras.applications.<keras_name>`, imported on the first call (keeps Keras out of plain imports)."""

    def __init__(self, keras_name: str):
        self.keras_name = keras_name

    def resolve(self) -> Callable:
        applications = importlib.import_module("keras.applications")
        return getattr(applications, self.keras_name)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"keras.applications.{self.keras_name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LazyConstructor) and other.keras_name == self.keras_name

    def __hash__(self) -> int:
        return hash(self.keras_name)


@dataclass(frozen=True)
class Backbone:
    name: str  # lowercase registry key, e.g. "resnet50"
    keras_name: str  # the keras.applications function, e.g. "ResNet50"
    constructor: Callable  # keras.applications.<keras_name> (resolved lazily)
    input_size: int  # native square input side
    min_input_size: int  # smallest side the constructor accepts (with weights=None)
    preprocess: str  # one of PREPROCESS_MODES
    feature_dim: int  # size of the globally pooled last feature map (avg or max)
    parameters_millions: float  # with the classifier head, as the docs table lists it
    size_mb: float  # weights file size in MiB, as the docs table lists it
    depth: int | None  # as the docs table lists it (None where it says "-")
    top1: float | None  # ImageNet top-1 accuracy, fraction (None where the docs say "-")
    top5: float | None


def entry(keras_name: str, input_size: int, preprocess: str, feature_dim: int,
          parameters_millions: float, size_mb: float, depth: int | None,
          top1: float | None, top5: float | None, min_input_size: int = 32) -> Backbone:
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"{keras_name}: preprocess {preprocess!r} not in {PREPROCESS_MODES}")
    return Backbone(
        name=keras_name.lower(),
        keras_name=keras_name,
        constructor=LazyConstructor(keras_name),
        input_size=input_size,
        min_input_size=min_input_size,
        preprocess=preprocess,
        feature_dim=feature_dim,
        parameters_millions=parameters_millions,
        size_mb=size_mb,
        depth=depth,
        top1=top1,
        top5=top5,
    )


_ENTRIES = tuple(entry(*row[:9], min_input_size=row[9]) for row in ZOO_TABLE)

BACKBONES: dict[str, Backbone] = {backbone.name: backbone for backbone in _ENTRIES}


def is_zoo_name(name: str) -> bool:
    return zoo_key(name) in BACKBONES


def get_backbone(name: str) -> Backbone:
    """The zoo entry for `name` (case-insensitive); unknown names fail with the list of known ones."""
    message = unknown_backbone(name)
    if message:
        raise ConfigError(message)
    return BACKBONES[zoo_key(name)]


def model_table() -> list[dict]:
    """Rows for `featurize models`, in the order of the Keras applications docs table."""
    return [
        {
            "name": backbone.name,
            "keras_name": backbone.keras_name,
            "input_size": backbone.input_size,
            "preprocess": backbone.preprocess,
            "feature_dim": backbone.feature_dim,
            "parameters_millions": backbone.parameters_millions,
            "size_mb": backbone.size_mb,
            "depth": backbone.depth,
            "top1": backbone.top1,
            "top5": backbone.top5,
        }
        for backbone in _ENTRIES
    ]
