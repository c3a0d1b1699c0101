"""FeatureExtractor: builds one Keras model once and turns uint8 image batches into features and top-k.

One forward pass gives both outputs. The model built here takes uint8 pixels (n, H, W, 3), casts them to
float32 and applies the backbone's preprocessing inside the graph, so batches travel as uint8 (4x less
to move than float32). It is called through one `tf.function` with a fixed batch shape: the last partial
batch is padded up to `batch_size`, so the function is traced once and never again.

What can be extracted (one config line each):
- a zoo backbone (`model.backbone: resnet50`) with `model.weights` `imagenet` (Keras download cache),
  `none` (random init) or the path/URI of a weights file (fetched through `storage`, checksummed);
- a saved Keras model (`model.backbone: s3://bucket/model.keras` or `.h5`), loaded in Keras safe mode:
  a model with a `Lambda` layer (arbitrary Python code) is refused unless `model.trust: true`.

Feature cut (`model.layer`, default: the pooled layer before the classifier):
- zoo models: the last spatial feature map before the head, globally pooled per `model.pooling`.
  Features do not depend on `model.top_k` (with or without the head, the cut is the same tensor).
  For ConvNeXt this is the pooled last-stage map, before the head's LayerNormalization.
- saved models: walk back from the output past the classifier (Dense, Dropout, Activation layers) to
  the layer that feeds it (for a fine-tuned "base -> GlobalAveragePooling2D -> Dropout -> Dense" model,
  the pooling layer).
- a named layer, also one inside a nested sub-model: rank-4 outputs are pooled, rank-2 taken as is,
  anything else flattened.

Preprocessing (`model.preprocess`): `auto` is the zoo family's own mode; for a saved model `auto` means
`none` (the model gets raw 0..255 float pixels), since a saved file does not say what its training
pipeline did outside the graph: set `tf`, `caffe` or `torch` when it was trained that way. A saved model
that gets raw pixels and has no Rescaling/Normalization at its input most likely was: a warning says so.

Problems the user can fix (a refused or unloadable model file, a layer or size that does not fit, a checksum
that differs, class names that do not match the head) raise `pipeline.config.ConfigError`; any other
exception is a bug in featurize.

No Ray and no URLs here: files come through `pipeline.io.storage`; the actor owns threads and devices
(see `configure_tensorflow`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import logging
import math
import os
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata, resources
from typing import Any

import numpy as np

from pipeline.config import ModelConfig, is_saved_model_path
from pipeline.errors import ConfigError
from pipeline.io import redaction, storage
from pipeline.models import litert
from pipeline.models.zoo import PREPROCESS_MODES, Backbone, get_backbone

logger = logging.getLogger(__name__)

WEIGHTS_FILE_SUFFIXES = (".weights.h5", ".h5", ".keras")
IMAGENET_MEAN_BGR = (103.939, 116.779, 123.68)  # caffe mode, as keras.applications.imagenet_utils
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)  # torch mode
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


class WeightsUnavailableError(ConfigError, RuntimeError):
    """ImageNet weights are neither in the Keras cache nor downloadable from here; the message says the fix.

    A ConfigError (the user fixes it: pull the weights elsewhere, or choose a file); still a RuntimeError for
    callers that caught it as one."""


@dataclass
class ExtractorOutput:
    features: np.ndarray  # (n, feature_dim) float32
    top_k_indices: np.ndarray  # (n, top_k) int32, best first; (n, 0) when top_k = 0
    top_k_scores: np.ndarray  # (n, top_k) float32 probabilities, best first


# --------------------------------------------------------------------------------------------------
# TensorFlow process settings (called by the actor before any TF op)
# --------------------------------------------------------------------------------------------------

_TF_SETTINGS: dict[str, Any] | None = None


def configure_tensorflow(num_threads: int | None, gpu_memory_growth: bool = True) -> dict[str, Any]:
    """Set TF op thread pools and GPU memory growth for this process; call it before any TF op.

    `num_threads` None keeps TF's defaults (all cores). Idempotent: a repeated call with the same
    arguments does nothing. Called after TF started its runtime, TF cannot change these any more: a
    warning says so and the settings in effect are returned. (Mixed precision is a model option,
    `model.mixed_precision`, applied by FeatureExtractor.)
    """
    global _TF_SETTINGS
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads: got {num_threads}; use a positive count or None")
    wanted = {"num_threads": num_threads, "gpu_memory_growth": gpu_memory_growth}
    if _TF_SETTINGS == wanted:
        return dict(_TF_SETTINGS)
    import tensorflow as tf

    try:
        if num_threads is not None:
            tf.config.threading.set_intra_op_parallelism_threads(num_threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, num_threads)))
        if gpu_memory_growth:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as error:  # TF already initialised its runtime in this process
        intra = tf.config.threading.get_intra_op_parallelism_threads()
        logger.warning("configure_tensorflow(num_threads=%s) came after TensorFlow started, which keeps "
                       "intra-op threads at %s (%s); call it first thing in the process", num_threads,
                       intra or "default", error)
        _TF_SETTINGS = {"num_threads": intra or None, "gpu_memory_growth": None}
        return dict(_TF_SETTINGS)
    _TF_SETTINGS = wanted
    return dict(wanted)


# --------------------------------------------------------------------------------------------------
# ImageNet class names, offline (package data: the same file keras.applications downloads)
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def imagenet_class_index() -> dict[str, list[str]]:
    """{"0": ["n01440764", "tench"], ...}: Keras's imagenet_class_index.json, shipped with the package."""
    text = resources.files("pipeline.data").joinpath("imagenet_class_index.json").read_text("utf-8")
    return json.loads(text)


def imagenet_class_names() -> list[str]:
    """The 1000 human-readable names, by class index (as `decode_predictions` shows them)."""
    index = imagenet_class_index()
    return [index[str(i)][1] for i in range(len(index))]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def is_saved_model(backbone: str) -> bool:
    """`pipeline.config.is_saved_model_path` (the one rule, importable without Keras), under the name callers
    of this module use."""
    return is_saved_model_path(backbone)


def keras_cache_dir() -> str:
    """Where keras.applications caches downloaded weights ($KERAS_HOME/models or ~/.keras/models)."""
    try:
        from keras.src.backend.config import keras_home

        base = keras_home()
    except Exception:  # noqa: BLE001 - private accessor; fall back to Keras's documented rule
        base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(os.path.expanduser(base), "models")


def package_versions() -> dict[str, str]:
    versions = {}
    for key, distributions in (("keras_version", ("keras",)),
                               ("tensorflow_version", ("tensorflow", "tensorflow-cpu", "tf-nightly"))):
        versions[key] = "unknown"
        for distribution in distributions:
            with contextlib.suppress(metadata.PackageNotFoundError):
                versions[key] = metadata.version(distribution)
                break
    return versions


def distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def library_versions(runtime: str) -> dict[str, str]:
    """Versions, besides Keras and TensorFlow, of what computes the stored values in this process: featurize
    (preprocessing, cut, pooling), Pillow (decode and resize), NumPy (high-bit-depth pixel conversion, float16
    rows, top-k under LiteRT) and, only where it runs the model, LiteRT."""
    import PIL

    versions = {"featurize_version": distribution_version("featurize"), "pillow_version": PIL.__version__,
                "numpy_version": np.__version__}
    if runtime == "litert":
        versions["litert_version"] = litert.interpreter_version()
    return versions


def resolve_preprocess(model_config: ModelConfig, backbone: Backbone | None) -> str:
    mode = model_config.preprocess
    if mode == "auto":
        return backbone.preprocess if backbone is not None else "none"
    if mode not in PREPROCESS_MODES:
        raise ConfigError(f"model.preprocess: got {mode!r}; allowed: auto, {', '.join(PREPROCESS_MODES)}")
    return mode


def describe_model(model_config: ModelConfig) -> dict[str, str]:
    """Provenance known without building the model (feature_dim/input_size may read 'unknown')."""
    saved = is_saved_model(model_config.backbone)
    backbone = None if saved else get_backbone(model_config.backbone)
    if saved:
        input_size = f"{model_config.input_size}x{model_config.input_size}" if model_config.input_size else "unknown"
        feature_dim = "unknown"
    else:
        side = model_config.input_size or backbone.input_size
        input_size = f"{side}x{side}"
        feature_dim = str(backbone.feature_dim) if model_config.layer is None else "unknown"
    return {
        "backbone": model_config.backbone if saved else backbone.name,
        "weights": "embedded" if saved else model_config.weights,
        "weights_sha256": model_config.weights_sha256 or "",
        "layer": model_config.layer or "default",
        "pooling": model_config.pooling,
        "input_size": input_size,
        "preprocess": resolve_preprocess(model_config, backbone),
        "feature_dim": feature_dim,
        "top_k": str(model_config.top_k),
        **package_versions(),
    }


def preprocess_in_graph(x, mode: str):
    """Float32 0..255 RGB pixels -> the network's input, with keras.ops (runs inside the model graph)."""
    from keras import ops

    if mode == "caffe":  # keras.applications.imagenet_utils "caffe": RGB->BGR, zero-centre per channel
        x = ops.flip(x, axis=-1)
        return x - ops.convert_to_tensor(np.array(IMAGENET_MEAN_BGR, dtype="float32"))
    if mode == "torch":
        x = x / 255.0
        mean = ops.convert_to_tensor(np.array(IMAGENET_MEAN_RGB, dtype="float32"))
        std = ops.convert_to_tensor(np.array(IMAGENET_STD_RGB, dtype="float32"))
        return (x - mean) / std
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "none":
        return x
    raise ValueError(f"preprocess mode {mode!r} not in {PREPROCESS_MODES}")


def producer(tensor):
    """The layer that produced a KerasTensor."""
    history = getattr(tensor, "_keras_history", None)
    return history.operation if history is not None else None


def layer_names(model, limit: int = 400) -> list[str]:
    """Layer names in graph order, each nested sub-model's own layers listed right after it."""
    import keras

    names: list[str] = []
    for layer in model.layers:
        names.append(layer.name)
        if isinstance(layer, keras.Model):
            names.extend(layer_names(layer, limit))
        if len(names) >= limit:
            break
    return names[:limit]


def find_layer_path(model, name: str) -> list | None:
    """[layer] when `name` is a layer of `model`, [submodel, ..., layer] when nested, else None."""
    import keras

    for layer in model.layers:
        if layer.name == name:
            return [layer]
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner = find_layer_path(layer, name)
            if inner is not None:
                return [layer, *inner]
    return None


def unknown_layer_error(name: str, model, where: str) -> ConfigError:
    names = layer_names(model)
    shown = names[-40:] if len(names) > 40 else names
    return ConfigError(
        f"model.layer: {name!r} is not a layer of {where}; some of its layers (the last {len(shown)} of "
        f"{len(names)}): {', '.join(shown)}"
    )


def single_output(layer, attribute: str):
    try:
        return getattr(layer, attribute)
    except (AttributeError, ValueError) as error:
        raise ConfigError(
            f"layer {layer.name!r} is used more than once in the model (shared layer), so its {attribute} "
            f"is ambiguous; choose another model.layer ({error})"
        ) from error


def as_functional(model):
    """Sequential models are rebuilt as Functional over the same layers (same weights)."""
    import keras

    if isinstance(model, keras.Sequential):
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            x = layer(x)
        return keras.Model(inputs, x, name=model.name)
    return model


def with_layer_output(model, path: list):
    """A Functional over `model`'s own layers whose outputs are [output of path[-1], *model.outputs].

    `path` comes from `find_layer_path`: nested sub-models are re-wired with `clone_model` (same layer
    objects, so the same weights) so that the inner layer's output exists in the outer graph.
    """
    import keras

    model = as_functional(model)
    target = path[0]
    if len(path) == 1:
        return keras.Model(model.inputs, [single_output(target, "output"), *model.outputs])
    inner = with_layer_output(target, path[1:])
    captured: list = []

    def call_function(layer, *args, **kwargs):
        if layer is target:
            outputs = inner(*args, **kwargs)
            captured.append(outputs[0])
            rest = outputs[1:]
            return rest[0] if len(rest) == 1 else rest
        return layer(*args, **kwargs)

    clone = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call_function)
    if len(captured) != 1:
        raise ConfigError(
            f"sub-model {target.name!r} is called {len(captured)} times in {model.name!r}; "
            f"model.layer must name a layer of a sub-model used once"
        )
    return keras.Model(clone.inputs, [captured[0], *clone.outputs])


def is_softmax_output(layer) -> bool:
    import keras

    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    if activation is None:
        return False
    try:
        return keras.activations.serialize(activation) == "softmax"
    except Exception:  # noqa: BLE001 - custom activation objects
        return getattr(activation, "__name__", "") == "softmax"


def classifier_walk_back(model) -> tuple[Any, bool]:
    """(layer feeding the classifier, whether a Dense classifier was passed) for a saved model."""
    import keras

    head_types = (keras.layers.Dense, keras.layers.Dropout, keras.layers.GaussianDropout,
                  keras.layers.AlphaDropout, keras.layers.GaussianNoise, keras.layers.Activation,
                  keras.layers.Softmax, keras.layers.ReLU, keras.layers.LeakyReLU)
    layer = producer(model.outputs[0]) or model.layers[-1]
    passed_dense = False
    while True:
        skippable = isinstance(layer, head_types) or (
            isinstance(layer, (keras.layers.BatchNormalization, keras.layers.LayerNormalization))
            and len(layer.output.shape) == 2
        )
        if not skippable:
            return layer, passed_dense
        inbound = producer(single_output(layer, "input"))
        if inbound is None or isinstance(inbound, keras.layers.InputLayer):
            return layer, passed_dense
        passed_dense = passed_dense or isinstance(layer, keras.layers.Dense)
        layer = inbound


def pooled_feature_tensor(network):
    """The last spatial map before the head of a keras.applications model: the input of its final global
    pooling layer (built with pooling="avg" when include_top=False), or of the Flatten for VGG's head."""
    import keras

    pools = [layer for layer in network.layers
             if isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D))]
    flattens = [layer for layer in network.layers if isinstance(layer, keras.layers.Flatten)]
    anchor = pools[-1] if pools else (flattens[-1] if flattens else None)
    if anchor is None:
        raise ValueError(f"{network.name}: found no global pooling or Flatten layer to cut before")
    return single_output(anchor, "input")


# Scanning a saved model from its input for something that scales the pixels. Pass-through layers keep values on
# the 0..255 scale (augmentation, resizing, cropping, padding, casts; also any Random* augmentation layer), so
# the scan looks past them; the first other layer ends it. Functional arithmetic on the input (`inputs / 255.0`)
# is recorded by Keras as an op, not a layer, and scales as a Rescaling layer does.
SCALING_LAYERS = frozenset({"Rescaling", "Normalization"})
SCALING_OPERATIONS = frozenset({"TrueDivide", "Divide", "Multiply", "Subtract", "Add"})
PASS_THROUGH_OPERATIONS = frozenset({"InputLayer", "Resizing", "CenterCrop", "Cropping2D", "ZeroPadding2D", "Cast"})
INPUT_SCAN_LIMIT = 12  # operations looked at from the input, nested sub-models included


def graph_operations(model) -> list:
    """Layers and ops in graph order (Functional), or the layers (Sequential, which lists no ops)."""
    import keras

    if isinstance(model, keras.Sequential):
        return list(model.layers)
    return list(getattr(model, "operations", model.layers))


def type_names(operation) -> set[str]:
    """Class names along the MRO, so subclasses of Keras layers count as their base."""
    return {cls.__name__ for cls in type(operation).__mro__}


def scan_input_scaling(model, budget: int = INPUT_SCAN_LIMIT) -> tuple[bool | None, int]:
    """(True: the pixels are scaled before any computing layer; False: a computing layer comes first or the
    budget ran out; None: `model` only passes its input through), and the budget left. Nested sub-models are
    entered where they stand in the graph."""
    import keras

    for operation in graph_operations(model):
        if isinstance(operation, keras.Model):
            verdict, budget = scan_input_scaling(operation, budget)
            if verdict is not None:
                return verdict, budget
            continue
        names = type_names(operation)
        if "InputLayer" in names:
            continue
        budget -= 1
        if budget < 0:
            return False, 0
        is_layer = isinstance(operation, keras.layers.Layer)
        if names & SCALING_LAYERS or (not is_layer and names & SCALING_OPERATIONS):
            return True, budget
        if not (names & PASS_THROUGH_OPERATIONS or type(operation).__name__.startswith("Random")):
            return False, budget
    return None, budget


def warn_if_raw_pixels(model, uri: str, preprocess: str) -> None:
    """A saved model fed raw 0..255 pixels with nothing at its input to scale them was most likely trained on
    scaled pixels, and then gives wrong features without any error: say so, once per extractor."""
    if preprocess != "none" or scan_input_scaling(model)[0]:
        return
    logger.warning(
        "model.backbone: %s receives raw 0-255 pixels (model.preprocess resolves to none) and has no "
        "Rescaling/Normalization layer at its input; if it was trained on scaled pixels, set model.preprocess "
        "to the mode it was trained with (tf: [-1, 1], torch, caffe), or add a Rescaling layer to the model",
        redaction.redact(uri))


def find_lambda_layers(config: Any) -> list[str]:
    """Names of Lambda layers anywhere in a serialized Keras model config (nested models included)."""
    found: list[str] = []
    if isinstance(config, dict):
        if config.get("class_name") == "Lambda":
            inner = config.get("config") or {}
            found.append(str(inner.get("name", "?")) if isinstance(inner, dict) else "?")
        for value in config.values():
            found.extend(find_lambda_layers(value))
    elif isinstance(config, list):
        for value in config:
            found.extend(find_lambda_layers(value))
    return found


def saved_model_config(path: str) -> Any:
    """The architecture JSON of a .keras (config.json in the zip) or legacy .h5 (model_config attribute)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    import h5py

    with h5py.File(path, "r") as handle:
        raw = handle.attrs.get("model_config")
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return json.loads(raw)


# --------------------------------------------------------------------------------------------------
# the extractor
# --------------------------------------------------------------------------------------------------


def no_predictions(batch_size: int, arrays):
    """(indices, scores) with zero columns, for model.top_k 0; `arrays` is numpy or tensorflow."""
    return arrays.zeros((batch_size, 0), arrays.int32), arrays.zeros((batch_size, 0), arrays.float32)


class FeatureExtractor:
    """Builds the model once; `extractor(uint8 images)` -> ExtractorOutput. Not thread-safe; one per actor."""

    def __init__(self, model_config: ModelConfig, batch_size: int = 32, storage_options: dict | None = None,
                 num_threads: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}; it must be a positive number")
        if model_config.top_k < 0:
            raise ConfigError(f"model.top_k: got {model_config.top_k}; use 0 (no predictions) or a positive count")
        import keras
        import tensorflow as tf

        self.model_config = model_config
        self.batch_size = batch_size
        self.storage_options = storage_options
        self.num_threads = num_threads  # LiteRT's threads; None: all cores (TF's are set by configure_tensorflow)
        self.class_names: list[str] | None = None
        self.class_names_sha256 = ""  # of the class-names file's bytes, when names were read from one
        self.weights_sha256 = ""
        self.backbone_sha256 = ""  # of a saved model's file; zoo backbones are named, not files
        self.mixed_precision = False
        if is_saved_model(model_config.backbone):
            self.backbone = None
            core, cut_name, head_softmax, input_hw = self.load_saved_model()
        else:
            self.backbone = get_backbone(model_config.backbone)
            core, cut_name, head_softmax, input_hw = self.build_zoo_model()
        self.preprocess = resolve_preprocess(model_config, self.backbone)
        self.input_size: tuple[int, int] = input_hw
        self.layer = cut_name
        self.model, self.pooling = self.wrap_model(core, head_softmax)
        outputs = self.model.outputs
        self.feature_dim = int(outputs[0].shape[-1])
        self.num_classes = int(outputs[1].shape[-1]) if len(outputs) > 1 else 0
        self.top_k = min(model_config.top_k, self.num_classes)
        if self.top_k and model_config.class_names:
            self.class_names = self.read_class_names(model_config.class_names)
        elif self.top_k and self.backbone is not None and self.num_classes == 1000:
            self.class_names = imagenet_class_names()
        if self.class_names is not None and self.num_classes and len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"model.class_names: {model_config.class_names} has {len(self.class_names)} names but the "
                f"model's head has {self.num_classes} classes; give one name a line, in class-index order"
            )
        if not self.top_k:
            self.class_names = None
        self.runtime, self.forward = self.build_forward(tf)
        if self.runtime == "litert":
            # The interpreter holds its own copy of the weights; the Keras graph is only needed for the GPU
            # out-of-memory path, which LiteRT never takes. Dropping it hands its weights back to the allocator
            # for decode buffers to reuse (RSS does not shrink: the allocator keeps the pages).
            self.model = None
            gc.collect()
        self.provenance = self.make_provenance(keras, tf)

    # ---------------------------------------------------------------- zoo

    def build_zoo_model(self):
        """(core model: float pixels -> [feature tensor, probabilities?], cut name, softmax?, (h, w))."""
        config, backbone = self.model_config, self.backbone
        side = config.input_size or backbone.input_size
        if side < backbone.min_input_size:
            raise ConfigError(
                f"model.input_size: got {side}; {backbone.keras_name} needs at least {backbone.min_input_size}"
            )
        want_head = config.top_k > 0
        weights = config.weights
        if want_head and weights == "imagenet" and side != backbone.input_size:
            raise ConfigError(
                f"model.input_size: {side} with model.top_k: {config.top_k}: the ImageNet classifier head of "
                f"{backbone.keras_name} needs its native {backbone.input_size}x{backbone.input_size} input; "
                f"drop model.input_size, or set model.top_k: 0 for features only"
            )
        network = self.zoo_network(include_top=want_head, side=side)
        if config.layer is not None:
            path = find_layer_path(network, config.layer)
            if path is None and not want_head:  # e.g. VGG's fc2: a layer of the classifier head
                head_network = self.zoo_network(include_top=True, side=side)
                if find_layer_path(head_network, config.layer) is not None:
                    network, path = head_network, find_layer_path(head_network, config.layer)
            if path is None:
                raise unknown_layer_error(config.layer, network, backbone.keras_name)
            core = with_layer_output(network, path)
            if not want_head:
                import keras

                core = keras.Model(core.inputs, core.outputs[0])
            return core, config.layer, True, (side, side)
        import keras

        feature_tensor = pooled_feature_tensor(network)
        outputs = [feature_tensor, *network.outputs] if want_head else [feature_tensor]
        core = keras.Model(network.inputs, outputs)
        return core, producer(feature_tensor).name, True, (side, side)

    def zoo_network(self, include_top: bool, side: int):
        """The keras.applications model with the configured weights (imagenet / none / a file)."""
        config, backbone = self.model_config, self.backbone
        weights = config.weights
        if weights == "none":
            return self.construct(include_top, side, None)
        if weights == "imagenet":
            if config.weights_sha256:
                raise ConfigError(
                    "model.weights_sha256 is set but model.weights is imagenet (Keras checks its own downloads); "
                    "pin a file instead: `featurize weights pull NAME --to URI`, then model.weights: URI"
                )
            try:
                return self.construct(include_top, side, "imagenet")
            except Exception as error:  # noqa: BLE001 - classified: download failures only
                if "URL fetch failure" in str(error) or isinstance(error, (OSError, ConnectionError)):
                    raise WeightsUnavailableError(
                        f"backbone {backbone.name}: its ImageNet weights are not in the Keras cache "
                        f"({keras_cache_dir()}) and could not be downloaded from here ({error}). Fix: on a "
                        f"machine with internet run `featurize weights pull {backbone.name} --to URI` "
                        f"(URI: a path or bucket these workers can read), then set `model.weights: URI` "
                        f"(and `model.weights_sha256` to the checksum it prints); or set `model.weights: none` "
                        f"for random weights"
                    ) from error
                raise
        return self.construct_from_file(include_top, side, weights)

    def construct(self, include_top: bool, side: int, weights: str | None):
        backbone = self.backbone
        kwargs: dict[str, Any] = {"include_top": include_top, "weights": weights}
        if include_top:
            if side != backbone.input_size or weights is None:
                kwargs["input_shape"] = (side, side, 3)
        else:
            kwargs["input_shape"] = (side, side, 3)
            kwargs["pooling"] = "avg"  # marks the feature map; the cut is taken before it
        with self.dtype_policy():
            return backbone.constructor(**kwargs)

    def construct_from_file(self, include_top: bool, side: int, uri: str):
        """Build with random init, then load a weights file (the full-model file from `featurize weights
        pull` fits with and without the head; a `_notop` file only without)."""
        if not uri.lower().endswith(WEIGHTS_FILE_SUFFIXES):
            raise ConfigError(
                f"model.weights: {uri!r} is neither imagenet, none, nor a weights file "
                f"({', '.join(WEIGHTS_FILE_SUFFIXES)}); get one with `featurize weights pull NAME --to URI`"
            )
        with storage.local_copy(uri, self.storage_options) as path:
            self.check_sha256(path, uri)
            attempts = [include_top] if include_top else [False, True]
            errors = []
            for with_head in attempts:
                network = self.construct(with_head, side, None)
                try:
                    network.load_weights(path)
                    return network
                except Exception as error:  # noqa: BLE001 - reported below with both attempts
                    errors.append(f"include_top={with_head}: {error}")
        raise ConfigError(
            f"model.weights: {uri} does not fit {self.backbone.keras_name} at {side}x{side} "
            f"({'; '.join(errors)[:1500]}). A file from `featurize weights pull {self.backbone.name}` holds "
            f"the whole model; a '_notop' file only fits model.top_k: 0"
        )

    def check_sha256(self, path: str, uri: str) -> str:
        """Refuse a file whose checksum differs from model.weights_sha256; record and return its checksum."""
        actual = storage.sha256_of_file(path)
        expected = self.model_config.weights_sha256
        if expected and expected.strip().lower() != actual:
            raise ConfigError(
                f"model.weights_sha256: expected {expected} but {uri} has sha256 {actual}; the file changed "
                f"or the checksum is wrong (update model.weights_sha256 only if you trust the new file)"
            )
        self.weights_sha256 = actual
        return actual

    @contextlib.contextmanager
    def dtype_policy(self):
        """mixed_float16 while building (layers keep the policy they were built with), then restored."""
        if not self.model_config.mixed_precision:
            yield
            return
        import keras

        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy("mixed_float16")
        self.mixed_precision = True
        try:
            yield
        finally:
            keras.config.set_dtype_policy(previous)

    # ---------------------------------------------------------------- saved models

    def load_saved_model(self):
        config, uri = self.model_config, self.model_config.backbone
        separate_weights = config.weights not in ("imagenet", "none")
        if separate_weights:
            logger.info("model.weights %s is loaded into the saved model %s", config.weights, uri)
        with storage.local_copy(uri, self.storage_options) as path:
            # The model file is the weights unless a weights file is given (then weights_sha256 is that file's).
            self.backbone_sha256 = storage.sha256_of_file(path) if separate_weights else self.check_sha256(path, uri)
            model = self.read_saved_model(path, uri)
            if separate_weights:
                self.load_separate_weights(model, uri)
        return self.saved_model_core(as_functional(model), uri)

    def read_saved_model(self, path: str, uri: str):
        """keras.models.load_model in safe mode (unless model.trust); a file Keras cannot load is the user's to fix."""
        import keras

        trust = self.model_config.trust
        if not trust:
            self.refuse_lambda_layers(path, uri)
        try:
            return keras.models.load_model(path, compile=False, safe_mode=not trust)
        except (ValueError, TypeError, OSError) as error:
            if "safe_mode" in str(error):
                raise ConfigError(
                    f"model.backbone: {uri} needs unsafe deserialization ({error}); if you trust this file, "
                    f"set `model.trust: true`"
                ) from error
            raise ConfigError(
                f"model.backbone: {uri} could not be loaded by Keras {keras.__version__} "
                f"({type(error).__name__}: {str(error)[:1500]}); give a whole model saved with `model.save` "
                f"(.keras or .h5) whose layers are Keras's own (custom layer classes cannot be loaded here)"
            ) from error

    def refuse_lambda_layers(self, path: str, uri: str) -> None:
        try:
            architecture = saved_model_config(path)
        except (OSError, KeyError, ValueError) as error:  # not a zip with config.json, nor an HDF5 file
            raise ConfigError(
                f"model.backbone: {uri} is not a saved Keras model: neither a .keras archive nor an HDF5 model "
                f"file ({type(error).__name__}: {error})"
            ) from error
        lambdas = find_lambda_layers(architecture)
        if lambdas:
            raise ConfigError(
                f"model.backbone: {uri} contains Lambda layer(s) {', '.join(lambdas)}, which run arbitrary "
                f"Python code when loaded; refused in safe mode. If you trust this file, set "
                f"`model.trust: true`"
            )

    def load_separate_weights(self, model, uri: str) -> None:
        weights_uri = self.model_config.weights
        with storage.local_copy(weights_uri, self.storage_options) as weights_path:
            self.check_sha256(weights_path, weights_uri)
            try:
                model.load_weights(weights_path)
            except (ValueError, TypeError, OSError, KeyError) as error:
                raise ConfigError(
                    f"model.weights: {weights_uri} does not fit the saved model {uri} "
                    f"({type(error).__name__}: {str(error)[:1500]}); give the weights of this architecture "
                    f"(saved with `model.save_weights`), or leave model.weights unset to use the model's own"
                ) from error

    def saved_model_core(self, model, uri: str):
        """(core model: float pixels -> [feature tensor, probabilities?], cut name, softmax?, (h, w))."""
        import keras

        config = self.model_config
        if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or model.inputs[0].shape[-1] != 3:
            raise ConfigError(
                f"model.backbone: {uri} takes {[tuple(x.shape) for x in model.inputs]}; "
                f"expected one (batch, height, width, 3) image input"
            )
        input_hw = self.saved_model_input_size(model, uri)
        if len(model.outputs) != 1:
            raise ConfigError(f"model.backbone: {uri} has {len(model.outputs)} outputs; expected one")
        if config.layer is not None:
            path_to_layer = find_layer_path(model, config.layer)
            if path_to_layer is None:
                raise unknown_layer_error(config.layer, model, uri)
            cut_name = config.layer
            has_head = len(model.outputs[0].shape) == 2 and path_to_layer[-1] is not producer(model.outputs[0])
            core = with_layer_output(model, path_to_layer)
        else:
            cut_layer, has_head = classifier_walk_back(model)
            cut_name = cut_layer.name
            core = keras.Model(model.inputs, [single_output(cut_layer, "output"), *model.outputs])
        head_softmax = is_softmax_output(producer(model.outputs[0]))
        if config.top_k > 0:
            if not has_head:
                raise ConfigError(
                    f"model.top_k: {config.top_k} but {uri} has no classifier head after the feature cut "
                    f"({cut_name}); set model.top_k: 0"
                )
        else:
            core = keras.Model(core.inputs, core.outputs[0])
        warn_if_raw_pixels(model, uri, resolve_preprocess(config, None))
        return core, cut_name, head_softmax, input_hw

    def saved_model_input_size(self, model, uri: str) -> tuple[int, int]:
        _, height, width, _ = model.inputs[0].shape
        wanted = self.model_config.input_size
        if height is None or width is None:
            if wanted is None:
                raise ConfigError(
                    f"model.backbone: {uri} accepts any image size; set model.input_size to the side it was "
                    f"trained at"
                )
            return wanted, wanted
        if wanted is not None and (wanted, wanted) != (height, width):
            raise ConfigError(
                f"model.input_size: got {wanted}; {uri} takes {height}x{width} images; drop model.input_size"
            )
        return int(height), int(width)

    def read_class_names(self, uri: str) -> list[str]:
        """One name a line; the checksum is taken of the very bytes the names come from."""
        data = storage.read_bytes(uri, self.storage_options)
        self.class_names_sha256 = hashlib.sha256(data).hexdigest()
        text = data.decode("utf-8")
        return [line.strip() for line in text.splitlines() if line.strip()]

    # ---------------------------------------------------------------- the compiled model

    def wrap_model(self, core, head_softmax: bool):
        """uint8 images -> cast -> preprocess -> core -> [pooled features float32, probabilities float32]."""
        import keras
        from keras import ops

        height, width = self.input_size
        with self.dtype_policy():
            images = keras.Input(shape=(height, width, 3), dtype="uint8", name="images")
            x = preprocess_in_graph(ops.cast(images, "float32"), self.preprocess)
            outputs = core(x)
            outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
            feature_map = outputs[0]
            rank = len(feature_map.shape)
            if rank == 4:
                pooling = self.model_config.pooling
                pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
                features = pool(name=f"features_{pooling}_pool")(feature_map)
            elif rank == 2:
                pooling, features = "none", feature_map
            else:
                pooling, features = "flatten", keras.layers.Flatten(name="features_flatten")(feature_map)
            results = [ops.cast(features, "float32")]
            if len(outputs) > 1:
                scores = ops.cast(outputs[1], "float32")
                if len(scores.shape) != 2:
                    scores = ops.reshape(scores, (-1, math.prod(scores.shape[1:])))
                results.append(scores if head_softmax else ops.softmax(scores, axis=-1))
        return keras.Model(images, results, name="featurize"), pooling

    def choose_runtime(self, tf) -> str:
        """model.runtime, with auto resolved: litert on a CPU-only process unless a GPU option is set."""
        config = self.model_config
        if config.runtime != "auto":
            return config.runtime
        if config.mixed_precision or config.xla or tf.config.list_physical_devices("GPU"):
            return "keras"
        return "litert"

    def build_forward(self, tf):
        """(runtime, forward): forward maps a uint8 batch of exactly batch_size to (features, indices, scores)."""
        if self.choose_runtime(tf) == "litert":
            try:
                return "litert", self.litert_forward()
            except litert.ConversionError as error:
                if self.model_config.runtime == "litert":
                    raise ConfigError(f"model.runtime: litert cannot run this model ({error}); set model.runtime: "
                                     "keras") from error
                logger.warning("model.runtime auto: LiteRT cannot run this model (%s); running it on Keras", error)
        return "keras", self.compile_forward(tf)

    def litert_forward(self):
        flatbuffer, cached = litert.load_or_convert(self.model)
        logger.info("LiteRT model %s (%.1f MB)", "loaded from the node cache" if cached else "converted",
                    len(flatbuffer) / 1e6)
        try:
            model = litert.LiteRTModel(flatbuffer, self.batch_size, self.num_threads)
        except (RuntimeError, ValueError) as error:  # e.g. an op the interpreter cannot prepare
            raise litert.ConversionError(f"{type(error).__name__}: {error}") from error
        top_k, batch_size = self.top_k, self.batch_size

        def forward(images):
            outputs = model(images)
            if not top_k:
                return outputs[0], *no_predictions(batch_size, np)
            indices, scores = litert.top_k(outputs[1], top_k)
            return outputs[0], indices, scores

        return forward

    def compile_forward(self, tf):
        height, width = self.input_size
        spec = tf.TensorSpec((self.batch_size, height, width, 3), tf.uint8)
        model, top_k = self.model, self.top_k

        def forward(images):
            outputs = model(images, training=False)
            if not top_k:
                features = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
                return features, *no_predictions(self.batch_size, tf)
            features, probabilities = outputs
            scores, indices = tf.math.top_k(probabilities, k=top_k)
            return features, tf.cast(indices, tf.int32), scores

        if self.model_config.xla and not tf.config.list_physical_devices("GPU"):
            logger.warning("model.xla on a CPU: measured ~10x slower for depthwise-conv models (MobileNet, "
                           "EfficientNet) on CPUs; it is meant for GPUs")
        return tf.function(forward, input_signature=[spec], jit_compile=bool(self.model_config.xla))

    def forward_padded(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows through the compiled function in batches of its fixed shape (padded, never retraced).

        On accelerator OOM the batch size halves (traced once per size) and the rows run again in smaller
        pieces, so a too-large `run.batch_size` slows a GPU actor down instead of killing it."""
        import tensorflow as tf

        size = len(chunk)
        if size > self.batch_size:
            step = self.batch_size
            pieces = [self.forward_padded(chunk[start:start + step]) for start in range(0, size, step)]
            return tuple(np.concatenate([piece[index] for piece in pieces]) for index in range(3))
        padded = chunk
        if size < self.batch_size:
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), dtype=np.uint8)
            padded[:size] = chunk
        try:
            features, indices, scores = self.forward(padded)
            return np.asarray(features)[:size], np.asarray(indices)[:size], np.asarray(scores)[:size]
        except tf.errors.ResourceExhaustedError:
            if self.batch_size == 1:
                raise
        self.batch_size = max(1, self.batch_size // 2)
        logger.warning("out of accelerator memory: batch size reduced to %d", self.batch_size)
        self.forward = self.compile_forward(tf)
        return self.forward_padded(chunk)

    def __call__(self, images: np.ndarray) -> ExtractorOutput:
        images = np.asarray(images)
        height, width = self.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, 3):
            raise ValueError(
                f"images: got dtype {images.dtype} shape {images.shape}; expected uint8 (n, {height}, {width}, 3) "
                f"(decode resizes to the extractor's input_size)"
            )
        if not len(images):
            return ExtractorOutput(np.zeros((0, self.feature_dim), np.float32),
                                   np.zeros((0, self.top_k), np.int32), np.zeros((0, self.top_k), np.float32))
        features, indices, scores = self.forward_padded(images)
        return ExtractorOutput(features=features.astype(np.float32, copy=False),
                               top_k_indices=indices.astype(np.int32, copy=False),
                               top_k_scores=scores.astype(np.float32, copy=False))

    def warmup(self) -> None:
        """Trace and run the compiled function once (so the first real batch pays no tracing)."""
        height, width = self.input_size
        self(np.zeros((1, height, width, 3), np.uint8))

    def labels(self, indices: np.ndarray) -> list[list[str]]:
        """Class names for top-k indices; the index as a string where no names are known."""
        names = self.class_names
        return [[names[i] if names is not None else str(int(i)) for i in row] for row in np.asarray(indices)]

    def make_provenance(self, keras, tf) -> dict[str, str]:
        """Everything that can change a stored value (the plan's fingerprint keys that reach the rows, and
        library versions), as the strings Parquet key-value metadata holds. Existing keys keep their meaning:
        other programs read them."""
        config = self.model_config
        saved = self.backbone is None
        if saved:
            weights = "embedded" if config.weights in ("imagenet", "none") else config.weights
        else:
            weights = config.weights
        return {
            "backbone": config.backbone if saved else self.backbone.name,
            "weights": weights,
            "weights_sha256": self.weights_sha256,
            "layer": config.layer or "default",  # not the cut's name: Keras auto-names vary by process
            "pooling": self.pooling,
            "input_size": f"{self.input_size[0]}x{self.input_size[1]}",
            "preprocess": self.preprocess,
            "feature_dim": str(self.feature_dim),
            "top_k": str(self.top_k),
            "num_classes": str(self.num_classes),
            "compute_dtype": "mixed_float16" if self.mixed_precision else "float32",
            "runtime": self.runtime,
            "keras_version": keras.__version__,
            "tensorflow_version": tf.__version__,
            "backbone_sha256": self.backbone_sha256,  # the saved model file; "" for zoo backbones
            "resize": config.resize,
            "draft_margin": str(config.draft_margin),
            "class_names_sha256": self.class_names_sha256,  # "" when no class-names file was read
            "xla": str(config.xla).lower(),
            **library_versions(self.runtime),
        }


# --------------------------------------------------------------------------------------------------
# `featurize weights pull NAME --to URI`
# --------------------------------------------------------------------------------------------------


def pull_weights(backbone_name: str, destination_uri: str, storage_options: dict | None = None,
                 weights: str | None = "imagenet") -> str:
    """Build a zoo backbone with its ImageNet weights (Keras download cache), save the whole model's weights
    (head included: the file fits model.top_k 0 and > 0) and upload them; return the file's sha256.

    `destination_uri` is the file to write (ending .weights.h5) or a directory, which gets
    `<name>_imagenet.weights.h5`. `weights` other than "imagenet" (None: random init, or a local file)
    exists for tests and air-gapped round trips.
    """
    backbone = get_backbone(backbone_name)
    if not destination_uri.lower().endswith(".weights.h5"):
        suffix = "_imagenet" if weights == "imagenet" else ""
        destination_uri = storage.join(destination_uri, f"{backbone.name}{suffix}.weights.h5")
    try:
        network = backbone.constructor(include_top=True, weights=weights)
    except Exception as error:  # noqa: BLE001 - classified: download failures only
        if weights == "imagenet" and ("URL fetch failure" in str(error) or isinstance(error, OSError)):
            raise WeightsUnavailableError(
                f"backbone {backbone.name}: could not download its ImageNet weights ({error}); "
                f"`featurize weights pull` needs a machine with internet access"
            ) from error
        raise
    with tempfile.TemporaryDirectory(prefix="featurize-weights-") as directory:
        local = os.path.join(directory, f"{backbone.name}.weights.h5")
        network.save_weights(local)
        checksum = storage.sha256_of_file(local)
        storage.upload_file(local, destination_uri, storage_options)
    logger.info("pulled %s weights to %s (sha256 %s)", backbone.name, destination_uri, checksum)
    return checksum
