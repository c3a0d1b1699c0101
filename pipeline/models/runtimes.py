"""Runtimes: what runs the wrapped model, behind one interface (`runtime(uint8 images) -> arrays`).

- Keras/TensorFlow (`KerasRuntime`): one `tf.function` with a fixed batch shape, traced once; on accelerator
  out-of-memory the batch size halves (traced once per size), so a too-large `run.batch_size` slows a GPU actor
  down instead of killing it. The GPU runtime; XLA and mixed precision are its options.
- LiteRT (`LiteRTRuntime`, see `pipeline.models.litert`): XNNPACK on CPUs, input shape fixed at load.

Both take any number of rows: the last partial batch is padded up to `batch_size`, so shapes never change.
`configure_tensorflow` sets TensorFlow's process settings; the actor calls it before any TF op.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.config import ModelConfig
from pipeline.errors import ConfigError
from pipeline.models import litert

logger = logging.getLogger(__name__)

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # features (n, D), top-k indices (n, k), top-k scores (n, k)

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


def no_predictions(batch_size: int, arrays):
    """(indices, scores) with zero columns, for model.top_k 0; `arrays` is numpy or tensorflow."""
    return arrays.zeros((batch_size, 0), arrays.int32), arrays.zeros((batch_size, 0), arrays.float32)


class Runtime:
    """Runs a wrapped model (uint8 images -> [features, probabilities?]) on any number of rows.

    Subclasses set `name` and implement `run_batch` for exactly `batch_size` rows."""

    name = ""
    out_of_memory_errors: tuple[type[BaseException], ...] = ()  # errors after which a halved batch may fit

    def __init__(self, batch_size: int, top_k: int):
        self.batch_size = batch_size  # the one place it is kept: halved on out-of-memory, read by the worker
        self.top_k = top_k

    def run_batch(self, images: np.ndarray) -> Arrays:
        raise NotImplementedError

    def halve_batch_size(self) -> None:
        self.batch_size = max(1, self.batch_size // 2)
        logger.warning("out of accelerator memory: batch size reduced to %d", self.batch_size)

    def __call__(self, images: np.ndarray) -> Arrays:
        pieces: list[Arrays] = []
        start = 0
        while start < len(images):
            piece = images[start:start + self.batch_size]
            try:
                pieces.append(self.run_padded(piece))
            except self.out_of_memory_errors:
                if self.batch_size == 1:
                    raise
                self.halve_batch_size()
                continue
            start += len(piece)
        return tuple(np.concatenate([piece[index] for piece in pieces]) for index in range(3))

    def run_padded(self, piece: np.ndarray) -> Arrays:
        size = len(piece)
        padded = piece
        if size < self.batch_size:
            padded = np.zeros((self.batch_size, *piece.shape[1:]), dtype=np.uint8)
            padded[:size] = piece
        return tuple(np.asarray(output)[:size] for output in self.run_batch(padded))


class KerasRuntime(Runtime):
    """The wrapped Keras model through one compiled function (`function`) of a fixed batch shape."""

    name = "keras"

    def __init__(self, model, batch_size: int, top_k: int, xla: bool):
        import tensorflow as tf

        super().__init__(batch_size, top_k)
        self.model = model  # kept: a halved batch size compiles it again
        self.xla = bool(xla)
        self.out_of_memory_errors = (tf.errors.ResourceExhaustedError,)
        if xla and not tf.config.list_physical_devices("GPU"):
            logger.warning("model.xla on a CPU: measured ~10x slower for depthwise-conv models (MobileNet, "
                           "EfficientNet) on CPUs; it is meant for GPUs")
        self.function = self.compile()

    def compile(self):
        import tensorflow as tf

        model, top_k, batch_size = self.model, self.top_k, self.batch_size
        height, width = model.inputs[0].shape[1:3]
        spec = tf.TensorSpec((batch_size, height, width, 3), tf.uint8)

        def forward(images):
            outputs = model(images, training=False)
            if not top_k:
                features = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
                return features, *no_predictions(batch_size, tf)
            features, probabilities = outputs
            scores, indices = tf.math.top_k(probabilities, k=top_k)
            return features, tf.cast(indices, tf.int32), scores

        return tf.function(forward, input_signature=[spec], jit_compile=self.xla)

    def halve_batch_size(self) -> None:
        super().halve_batch_size()
        self.function = self.compile()

    def run_batch(self, images: np.ndarray) -> Arrays:
        return self.function(images)


class LiteRTRuntime(Runtime):
    """The wrapped model converted to a LiteRT flatbuffer (cached per node); top-k in NumPy. The interpreter
    holds its own copy of the weights: the Keras model is not kept."""

    name = "litert"

    def __init__(self, model, batch_size: int, top_k: int, num_threads: int | None):
        super().__init__(batch_size, top_k)
        flatbuffer, cached = litert.load_or_convert(model)
        logger.info("LiteRT model %s (%.1f MB)", "loaded from the node cache" if cached else "converted",
                    len(flatbuffer) / 1e6)
        try:
            self.interpreter = litert.LiteRTModel(flatbuffer, batch_size, num_threads)
        except (RuntimeError, ValueError) as error:  # e.g. an op the interpreter cannot prepare
            raise litert.ConversionError(f"{type(error).__name__}: {error}") from error

    def run_batch(self, images: np.ndarray) -> Arrays:
        outputs = self.interpreter(images)
        if not self.top_k:
            return outputs[0], *no_predictions(self.batch_size, np)
        indices, scores = litert.top_k(outputs[1], self.top_k)
        return outputs[0], indices, scores


def chosen_runtime(config: ModelConfig) -> str:
    """model.runtime, with auto resolved: litert on a CPU-only process unless a GPU option is set."""
    if config.runtime != "auto":
        return config.runtime
    import tensorflow as tf

    if config.mixed_precision or config.xla or tf.config.list_physical_devices("GPU"):
        return "keras"
    return "litert"


def build_runtime(config: ModelConfig, model, batch_size: int, top_k: int, num_threads: int | None) -> Runtime:
    """The runtime `model.runtime` asks for; under `auto`, Keras when LiteRT cannot run the model.
    `num_threads` is LiteRT's (None: all cores); TensorFlow's are set by `configure_tensorflow`."""
    if chosen_runtime(config) == "litert":
        try:
            return LiteRTRuntime(model, batch_size, top_k, num_threads)
        except litert.ConversionError as error:
            if config.runtime == "litert":
                raise ConfigError(f"model.runtime: litert cannot run this model ({error}); set model.runtime: "
                                  "keras") from error
            logger.warning("model.runtime auto: LiteRT cannot run this model (%s); running it on Keras", error)
    return KerasRuntime(model, batch_size, top_k, config.xla)
