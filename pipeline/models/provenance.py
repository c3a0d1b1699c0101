"""Provenance: every setting and library version that can change a stored value, as Parquet metadata strings.

Existing keys keep their meaning: other programs read them (see DESIGN.md, "Output directory").
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

import numpy as np

from pipeline.config import ModelConfig
from pipeline.models import litert
from pipeline.models.zoo import Backbone


@dataclass(frozen=True)
class Checksums:
    """sha256 of the files a model was read from; "" where no file was read."""

    weights: str = ""  # the weights: a weights file, or the saved model file that embeds them
    backbone: str = ""  # a saved model's file; zoo backbones are named, not files
    class_names: str = ""  # the class-names file's bytes, when names were read from one


def distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def library_versions(runtime: str) -> dict[str, str]:
    """Versions of what computes the stored values in this process: Keras and TensorFlow, featurize
    (preprocessing, cut, pooling), Pillow (decode and resize), NumPy (high-bit-depth pixel conversion, float16
    rows, top-k under LiteRT) and, only where it runs the model, LiteRT."""
    import keras
    import PIL
    import tensorflow as tf

    versions = {"keras_version": keras.__version__, "tensorflow_version": tf.__version__,
                "featurize_version": distribution_version("featurize"), "pillow_version": PIL.__version__,
                "numpy_version": np.__version__}
    if runtime == "litert":
        versions["litert_version"] = litert.interpreter_version()
    return versions


def weights_source(config: ModelConfig, backbone: Backbone | None) -> str:
    """imagenet / none / the weights file for a zoo backbone; a saved model's own weights are "embedded"."""
    if backbone is None and config.weights in ("imagenet", "none"):
        return "embedded"
    return config.weights


def model_provenance(config: ModelConfig, backbone: Backbone | None, checksums: Checksums, *, pooling: str,
                     input_size: tuple[int, int], preprocess: str, feature_dim: int, top_k: int, num_classes: int,
                     runtime: str) -> dict[str, str]:
    """The plan's fingerprint keys that reach the rows, what the built model turned out to be, and library
    versions."""
    versions = library_versions(runtime)
    return {
        "backbone": config.backbone if backbone is None else backbone.name,
        "weights": weights_source(config, backbone),
        "weights_sha256": checksums.weights,
        "layer": config.layer or "default",  # not the cut's name: Keras auto-names vary by process
        "pooling": pooling,
        "input_size": f"{input_size[0]}x{input_size[1]}",
        "preprocess": preprocess,
        "feature_dim": str(feature_dim),
        "top_k": str(top_k),
        "num_classes": str(num_classes),
        "compute_dtype": "mixed_float16" if config.mixed_precision else "float32",
        "runtime": runtime,
        "keras_version": versions.pop("keras_version"),
        "tensorflow_version": versions.pop("tensorflow_version"),
        "backbone_sha256": checksums.backbone,
        "resize": config.resize,
        "draft_margin": str(config.draft_margin),
        "class_names_sha256": checksums.class_names,
        "xla": str(config.xla).lower(),
        **versions,
    }
