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

from pipeline.errors import ConfigError

PREPROCESS_MODES = ("caffe", "torch", "tf", "none")
# caffe: RGB->BGR, minus ImageNet channel means (VGG, ResNet v1)
# torch: /255, minus mean, over std (DenseNet)
# tf:    x/127.5 - 1 (Inception, Xception, MobileNet v1/v2, ResNet v2, NASNet)
# none:  raw 0..255 pixels; the network normalises inside its own graph
#        (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3)


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


# In the order of the Keras applications docs table (MobileNetV3 placed after MobileNetV2).
_ENTRIES = (
    #     keras_name       size  prep    dim   params  MB   depth top1   top5
    entry("Xception", 299, "tf", 2048, 22.9, 88, 81, 0.790, 0.945, min_input_size=71),
    entry("VGG16", 224, "caffe", 512, 138.4, 528, 16, 0.713, 0.901),
    entry("VGG19", 224, "caffe", 512, 143.7, 549, 19, 0.713, 0.900),
    entry("ResNet50", 224, "caffe", 2048, 25.6, 98, 107, 0.749, 0.921),
    entry("ResNet50V2", 224, "tf", 2048, 25.6, 98, 103, 0.760, 0.930),
    entry("ResNet101", 224, "caffe", 2048, 44.7, 171, 209, 0.764, 0.928),
    entry("ResNet101V2", 224, "tf", 2048, 44.7, 171, 205, 0.772, 0.938),
    entry("ResNet152", 224, "caffe", 2048, 60.4, 232, 311, 0.766, 0.931),
    entry("ResNet152V2", 224, "tf", 2048, 60.4, 232, 307, 0.780, 0.942),
    entry("InceptionV3", 299, "tf", 2048, 23.9, 92, 189, 0.779, 0.937, min_input_size=75),
    entry("InceptionResNetV2", 299, "tf", 1536, 55.9, 215, 449, 0.803, 0.953,
          min_input_size=75),
    entry("MobileNet", 224, "tf", 1024, 4.3, 16, 55, 0.704, 0.895),
    entry("MobileNetV2", 224, "tf", 1280, 3.5, 14, 105, 0.713, 0.901),
    entry("MobileNetV3Small", 224, "none", 576, 2.9, 10, None, 0.681, None),
    entry("MobileNetV3Large", 224, "none", 960, 5.4, 21, None, 0.756, None),
    entry("DenseNet121", 224, "torch", 1024, 8.1, 33, 242, 0.750, 0.923),
    entry("DenseNet169", 224, "torch", 1664, 14.3, 57, 338, 0.762, 0.932),
    entry("DenseNet201", 224, "torch", 1920, 20.2, 80, 402, 0.773, 0.936),
    entry("NASNetMobile", 224, "tf", 1056, 5.3, 23, 389, 0.744, 0.919),
    entry("NASNetLarge", 331, "tf", 4032, 88.9, 343, 533, 0.825, 0.960),
    entry("EfficientNetB0", 224, "none", 1280, 5.3, 29, 132, 0.771, 0.933),
    entry("EfficientNetB1", 240, "none", 1280, 7.9, 31, 186, 0.791, 0.944),
    entry("EfficientNetB2", 260, "none", 1408, 9.2, 36, 186, 0.801, 0.949),
    entry("EfficientNetB3", 300, "none", 1536, 12.3, 48, 210, 0.816, 0.957),
    entry("EfficientNetB4", 380, "none", 1792, 19.5, 75, 258, 0.829, 0.964),
    entry("EfficientNetB5", 456, "none", 2048, 30.6, 118, 312, 0.836, 0.967),
    entry("EfficientNetB6", 528, "none", 2304, 43.3, 166, 360, 0.840, 0.968),
    entry("EfficientNetB7", 600, "none", 2560, 66.7, 256, 438, 0.843, 0.970),
    entry("EfficientNetV2B0", 224, "none", 1280, 7.2, 29, None, 0.787, 0.943),
    entry("EfficientNetV2B1", 240, "none", 1280, 8.2, 34, None, 0.798, 0.950),
    entry("EfficientNetV2B2", 260, "none", 1408, 10.2, 42, None, 0.805, 0.951),
    entry("EfficientNetV2B3", 300, "none", 1536, 14.5, 59, None, 0.820, 0.958),
    entry("EfficientNetV2S", 384, "none", 1280, 21.6, 88, None, 0.839, 0.967),
    entry("EfficientNetV2M", 480, "none", 1280, 54.4, 220, None, 0.853, 0.974),
    entry("EfficientNetV2L", 480, "none", 1280, 119.0, 479, None, 0.857, 0.975),
    entry("ConvNeXtTiny", 224, "none", 768, 28.6, 109.42, None, 0.813, None),
    entry("ConvNeXtSmall", 224, "none", 768, 50.2, 192.29, None, 0.823, None),
    entry("ConvNeXtBase", 224, "none", 1024, 88.5, 338.58, None, 0.853, None),
    entry("ConvNeXtLarge", 224, "none", 1536, 197.7, 755.07, None, 0.863, None),
    entry("ConvNeXtXLarge", 224, "none", 2048, 350.1, 1310, None, 0.867, None),
)

BACKBONES: dict[str, Backbone] = {backbone.name: backbone for backbone in _ENTRIES}


def is_zoo_name(name: str) -> bool:
    return name.strip().lower() in BACKBONES


def get_backbone(name: str) -> Backbone:
    """The zoo entry for `name` (case-insensitive); unknown names fail with the list of known ones."""
    key = str(name).strip().lower()
    if key not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)} "
            "(or give the path/URI of a saved .keras/.h5 model)"
        )
    return BACKBONES[key]


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
