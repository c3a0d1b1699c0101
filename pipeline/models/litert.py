"""LiteRT (TensorFlow Lite with the XNNPACK delegate): the CPU runtime behind `model.runtime: litert`.

Why: on CPUs TensorFlow's own kernels leave most of the machine unused for small convolutional models.
Measured on a 2-core x86 (AVX2) machine, batch 32, 224x224: MobileNetV2 runs ~135-160 images/s through
XNNPACK against ~34 through TensorFlow, with the same float32 arithmetic (features agree to cosine
>= 0.99999, top-1 equal; tests/models/test_litert.py).

What converts: the extractor's whole wrapped Keras model (uint8 input, cast, preprocessing, the network,
pooling, softmax), Keras -> frozen graph -> flatbuffer with builtin ops only, so a model with an op LiteRT
lacks fails here (and `model.runtime: auto` falls back to Keras). Top-k is taken in NumPy.

Conversion takes ~4 s for MobileNetV2 on that machine; the flatbuffer is cached per node
(`$FEATURIZE_CACHE_DIR`, default `~/.cache/featurize`, subfolder `litert`) under a digest of the
architecture, the weights and the TensorFlow version, so restarted actors and reruns load it in
milliseconds. No Ray and no URLs here; one LiteRTModel per actor, called from one thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline.io import storage

logger = logging.getLogger(__name__)

CACHE_FORMAT = "litert-v2"  # bump when the conversion recipe changes, so old cache entries are not reused


class ConversionError(RuntimeError):
    """The model does not convert to LiteRT builtin ops; the message names the cause."""


def interpreter_class():
    """LiteRT's own package (ai-edge-litert) when installed; TensorFlow's bundled tf.lite otherwise."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter
    return Interpreter


def interpreter_version() -> str:
    """The LiteRT that runs the models here, as `interpreter_class` picks it: ai-edge-litert's version, or
    `tf.lite (tensorflow X)` for TensorFlow's bundled interpreter (for provenance: it computes the values)."""
    interpreter = interpreter_class()
    if interpreter.__module__.startswith("ai_edge_litert"):
        try:
            return metadata.version("ai-edge-litert")
        except metadata.PackageNotFoundError:  # importable without its distribution metadata (vendored)
            return "unknown"
    import tensorflow as tf

    return f"tf.lite (tensorflow {tf.__version__})"


def cache_dir() -> Path:
    base = os.environ.get("FEATURIZE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "featurize")
    return Path(base) / "litert"


def model_digest(model) -> str:
    """Architecture + every weight's bytes + TensorFlow version: equal digests convert to equal flatbuffers."""
    import tensorflow as tf

    digest = hashlib.sha256(f"{CACHE_FORMAT}|{tf.__version__}|".encode())
    digest.update(architecture_text(model).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(f"|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def architecture_text(model) -> str:
    """The model's JSON with layer and op names replaced by their order of appearance: Keras numbers unnamed
    layers per process (functional_3, conv2d_7), so raw names would give one model many digests."""
    names = set(operation_names(model))
    if not names:
        return model.to_json()
    pattern = re.compile('"(' + "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True)) + ')"')
    order: dict[str, int] = {}
    return pattern.sub(lambda match: f'"#{order.setdefault(match.group(1), len(order))}"', model.to_json())


def operation_names(model) -> list[str]:
    names = [model.name]
    for operation in getattr(model, "operations", model.layers):
        if hasattr(operation, "operations") or hasattr(operation, "layers"):
            names.extend(operation_names(operation))
        else:
            names.append(operation.name)
    return names


def convert(model) -> bytes:
    """Keras model -> LiteRT flatbuffer (float32, builtin ops only)."""
    import tensorflow as tf

    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen_forward(model, tf)])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return converter.convert()
    except Exception as error:  # noqa: BLE001 - any failure means "not convertible"; the cause is kept
        raise ConversionError(conversion_failure(error)) from error


def frozen_forward(model, tf):
    """The model's inference call as a concrete function with the weights folded in as constants: converts
    in ~4 s where the SavedModel route takes ~19 s (MobileNetV2, same flatbuffer); unfrozen, the converter
    keeps resource variables, which XNNPACK cannot run."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    (image_input,) = model.inputs
    spec = tf.TensorSpec((None, *image_input.shape[1:]), image_input.dtype)
    forward = tf.function(lambda images: model(images, training=False), input_signature=[spec])
    return convert_variables_to_constants_v2(forward.get_concrete_function())


def conversion_failure(error: Exception) -> str:
    """The converter's pages of MLIR, cut to what a user can act on: the ops LiteRT lacks, if it says."""
    text = str(error)
    missing = re.search(r"(?:Custom|Flex) ops: ([^\n]+)", text)
    if missing:
        return f"ops LiteRT lacks: {missing.group(1).strip()}"
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first_line[:300]}"


def load_or_convert(model) -> tuple[bytes, bool]:
    """(flatbuffer, whether it came from the node's cache). Writes are atomic: actors may race on a node."""
    path = cache_dir() / f"{model_digest(model)}.tflite"
    with contextlib.suppress(OSError):
        return path.read_bytes(), True
    flatbuffer = convert(model)
    try:
        storage.write_local_atomically(str(path), flatbuffer)
    except OSError as error:  # a read-only or full disk only costs the next actor a conversion
        logger.warning("could not cache the LiteRT model at %s (%s); each actor will convert it again", path, error)
    return flatbuffer, False


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the k largest per row, best first; ties keep the lower index (as tf.math.top_k)."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return order.astype(np.int32), np.take_along_axis(probabilities, order, axis=1).astype(np.float32)


class LiteRTModel:
    """A converted model at a fixed batch size: `model(uint8 batch)` -> outputs in the Keras model's order."""

    def __init__(self, flatbuffer: bytes, batch_size: int, num_threads: int | None):
        self.interpreter = interpreter_class()(model_content=flatbuffer, num_threads=num_threads or os.cpu_count())
        (input_details,) = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        # the function's outputs are Identity, Identity_1, ... in model order; their order in the file is not
        self.output_indices = [output["index"] for output in sorted(outputs, key=lambda o: output_position(o["name"]))]
        self.input_index = input_details["index"]
        self.input_shape = (batch_size, *input_details["shape"][1:])
        self.interpreter.resize_tensor_input(self.input_index, list(self.input_shape))
        self.interpreter.allocate_tensors()

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        if images.shape != self.input_shape:
            raise ValueError(f"LiteRT model takes {self.input_shape}; got {images.shape}")
        # numpy's copy into the input buffer releases the GIL (set_tensor holds it through the copy, stalling the
        # decode threads); the view is dropped before invoke, which refuses to run while one is held
        self.interpreter.tensor(self.input_index)()[...] = images
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(index) for index in self.output_indices]


def output_position(name: str) -> int:
    """Identity -> 0, Identity_2 -> 2."""
    stem, _, suffix = name.rpartition("_")
    return int(suffix) if stem and suffix.isdigit() else 0
