"""Graph surgery: where the features are cut, how they are pooled, and the uint8-in model around the network.

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
pipeline did outside the graph (`pipeline.models.input_scaling` warns when it most likely did).
The wrapped model takes uint8 pixels and preprocesses inside the graph, so batches travel as uint8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import ModelConfig
from pipeline.contract import PREPROCESS_MODES
from pipeline.errors import ConfigError
from pipeline.models.input_scaling import warn_if_raw_pixels
from pipeline.models.zoo import Backbone


@dataclass(frozen=True)
class Core:
    """The network cut for features: float pixels -> [feature tensor, classifier output (when top_k > 0)]."""

    model: Any
    head_softmax: bool  # the classifier output is already probabilities (else logits get a softmax)
    input_size: tuple[int, int]  # (height, width)


# ---------------------------------------------------------------------------------------------- layer lookup


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


# ---------------------------------------------------------------------------------------------- the default cut


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


# ---------------------------------------------------------------------------------------------- cores


def zoo_core(config: ModelConfig, backbone: Backbone, network_for: Callable[[bool], Any]) -> Core:
    """Cut a zoo network; `network_for(include_top)` builds it with the configured weights."""
    import keras

    side = config.input_size or backbone.input_size
    if side < backbone.min_input_size:
        raise ConfigError(
            f"model.input_size: got {side}; {backbone.keras_name} needs at least {backbone.min_input_size}"
        )
    want_head = config.top_k > 0
    if want_head and config.weights == "imagenet" and side != backbone.input_size:
        raise ConfigError(
            f"model.input_size: {side} with model.top_k: {config.top_k}: the ImageNet classifier head of "
            f"{backbone.keras_name} needs its native {backbone.input_size}x{backbone.input_size} input; "
            f"drop model.input_size, or set model.top_k: 0 for features only"
        )
    network = network_for(want_head)
    if config.layer is None:
        feature_tensor = pooled_feature_tensor(network)
        outputs = [feature_tensor, *network.outputs] if want_head else [feature_tensor]
        return Core(keras.Model(network.inputs, outputs), True, (side, side))
    path = find_layer_path(network, config.layer)
    if path is None and not want_head:  # e.g. VGG's fc2: a layer of the classifier head
        head_network = network_for(True)
        head_path = find_layer_path(head_network, config.layer)
        if head_path is not None:
            network, path = head_network, head_path
    if path is None:
        raise unknown_layer_error(config.layer, network, backbone.keras_name)
    core = with_layer_output(network, path)
    if not want_head:
        core = keras.Model(core.inputs, core.outputs[0])
    return Core(core, True, (side, side))


def saved_model_core(model, config: ModelConfig, uri: str) -> Core:
    """Cut a saved model: at `model.layer`, or past its classifier; predictions from its own output."""
    import keras

    model = as_functional(model)
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4 or model.inputs[0].shape[-1] != 3:
        raise ConfigError(
            f"model.backbone: {uri} takes {[tuple(x.shape) for x in model.inputs]}; "
            f"expected one (batch, height, width, 3) image input"
        )
    input_size = saved_model_input_size(model, config.input_size, uri)
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
    if config.top_k > 0 and not has_head:
        raise ConfigError(
            f"model.top_k: {config.top_k} but {uri} has no classifier head after the feature cut "
            f"({cut_name}); set model.top_k: 0"
        )
    if config.top_k == 0:
        core = keras.Model(core.inputs, core.outputs[0])
    warn_if_raw_pixels(model, uri, resolve_preprocess(config, None))
    return Core(core, is_softmax_output(producer(model.outputs[0])), input_size)


def saved_model_input_size(model, wanted: int | None, uri: str) -> tuple[int, int]:
    _, height, width, _ = model.inputs[0].shape
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


# ---------------------------------------------------------------------------------------------- the wrapped model


def resolve_preprocess(config: ModelConfig, backbone: Backbone | None) -> str:
    mode = config.preprocess
    if mode == "auto":
        return backbone.preprocess if backbone is not None else "none"
    if mode not in PREPROCESS_MODES:
        raise ConfigError(f"model.preprocess: got {mode!r}; allowed: auto, {', '.join(PREPROCESS_MODES)}")
    return mode


def preprocess_in_graph(x, mode: str):
    """Float32 0..255 RGB pixels -> the network's input, by Keras's own `imagenet_utils.preprocess_input`
    (symbolic: it runs inside the model graph, and converts to LiteRT builtin ops)."""
    if mode == "none":
        return x
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess mode {mode!r} not in {PREPROCESS_MODES}")
    from keras.applications import imagenet_utils

    return imagenet_utils.preprocess_input(x, data_format="channels_last", mode=mode)


def pooled_features(feature_map, pooling: str, dtype: str | None):
    """(pooling applied: avg/max for a spatial map, none for a vector, flatten otherwise; the features)."""
    import keras

    rank = len(feature_map.shape)
    if rank == 4:
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        return pooling, pool(name=f"features_{pooling}_pool", dtype=dtype)(feature_map)
    if rank == 2:
        return "none", feature_map
    return "flatten", keras.layers.Flatten(name="features_flatten", dtype=dtype)(feature_map)


def wrap_model(core: Core, preprocess: str, pooling: str, mixed_precision: bool) -> tuple[Any, str]:
    """(uint8 images -> cast -> preprocess -> core -> [pooled features float32, probabilities float32],
    the pooling applied)."""
    import keras
    from keras import ops

    height, width = core.input_size
    images = keras.Input(shape=(height, width, 3), dtype="uint8", name="images")
    outputs = core.model(preprocess_in_graph(ops.cast(images, "float32"), preprocess))
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    pooling, features = pooled_features(outputs[0], pooling, "mixed_float16" if mixed_precision else None)
    results = [ops.cast(features, "float32")]
    if len(outputs) > 1:
        scores = ops.cast(outputs[1], "float32")
        if len(scores.shape) != 2:
            scores = ops.reshape(scores, (-1, math.prod(scores.shape[1:])))
        results.append(scores if core.head_softmax else ops.softmax(scores, axis=-1))
    return keras.Model(images, results, name="featurize"), pooling
