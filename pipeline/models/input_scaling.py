"""Does a saved model scale its pixels itself? A scan from its input, and the warning when it does not.

A saved model fed raw 0..255 pixels (`model.preprocess` resolves to none) with nothing at its input to scale
them was most likely trained on scaled pixels, and then gives wrong features without any error.
"""

from __future__ import annotations

import logging

from pipeline.io import redaction

logger = logging.getLogger(__name__)

# Pass-through layers keep values on the 0..255 scale (augmentation, resizing, cropping, padding, casts, and picking
# or stacking channels, as caffe's RGB -> BGR does; also any Random* augmentation layer), so the scan looks past
# them; the first other layer ends it. Functional arithmetic on the input (`inputs / 255.0`, caffe's mean) is
# recorded by Keras as an op, not a layer, and scales as a Rescaling layer does.
SCALING_LAYERS = frozenset({"Rescaling", "Normalization"})
SCALING_OPERATIONS = frozenset({"TrueDivide", "Divide", "Multiply", "Subtract", "Add"})
PASS_THROUGH_OPERATIONS = frozenset({"InputLayer", "Resizing", "CenterCrop", "Cropping2D", "ZeroPadding2D", "Cast",
                                     "GetItem", "Stack"})
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
    """Warn, once per extractor, when `model` gets raw pixels and scales nothing at its input."""
    if preprocess != "none" or scan_input_scaling(model)[0]:
        return
    logger.warning(
        "model.backbone: %s receives raw 0-255 pixels (model.preprocess resolves to none) and has no "
        "Rescaling/Normalization layer at its input; if it was trained on scaled pixels, set model.preprocess "
        "to the mode it was trained with (tf: [-1, 1], torch, caffe), or add a Rescaling layer to the model",
        redaction.redact(uri))
