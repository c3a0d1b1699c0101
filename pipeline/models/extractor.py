"""FeatureExtractor: builds one model once and turns uint8 image batches into features and top-k.

One forward pass gives both outputs. The model takes uint8 pixels (n, H, W, 3), casts them to float32 and
applies the backbone's preprocessing inside the graph, so batches travel as uint8 (4x less to move than
float32). What is extracted and how (one config line each):
- loading (`pipeline.models.loading`): a zoo backbone with imagenet / none / a weights file, or a saved
  Keras model, loaded safely;
- surgery (`pipeline.models.surgery`): the feature cut, pooling, preprocessing in the graph;
- runtimes (`pipeline.models.runtimes`): Keras/TensorFlow or LiteRT, fixed batch shape, padded batches;
- provenance (`pipeline.models.provenance`): what the rows' metadata records.

Problems the user can fix (a refused or unloadable model file, a layer or size that does not fit, a checksum
that differs, class names that do not match the head) raise `pipeline.errors.ConfigError`; any other
exception is a bug in featurize. No Ray and no URLs here: the actor owns threads and devices.
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np

from pipeline.config import ModelConfig, is_saved_model_path
from pipeline.errors import ConfigError
from pipeline.models import loading, surgery
from pipeline.models.provenance import Checksums, model_provenance
from pipeline.models.runtimes import Runtime, build_runtime
from pipeline.models.zoo import Backbone, get_backbone


@dataclasses.dataclass
class ExtractorOutput:
    features: np.ndarray  # (n, feature_dim) float32
    top_k_indices: np.ndarray  # (n, top_k) int32, best first; (n, 0) when top_k = 0
    top_k_scores: np.ndarray  # (n, top_k) float32 probabilities, best first


class FeatureExtractor:
    """Builds the model once; `extractor(uint8 images)` -> ExtractorOutput. Not thread-safe; one per actor.

    Reads: `input_size` (h, w), `feature_dim`, `num_classes`, `top_k`, `class_names` (None without
    predictions or names), `preprocess`, `pooling`, `runtime` (its name), `batch_size` (the runtime's, which
    halves on accelerator out-of-memory), `provenance` (complete once constructed), `forward` (the Runtime)."""

    def __init__(self, model_config: ModelConfig, batch_size: int = 32, storage_options: dict | None = None,
                 num_threads: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size}; it must be a positive number")
        if model_config.top_k < 0:
            raise ConfigError(f"model.top_k: got {model_config.top_k}; use 0 (no predictions) or a positive count")
        self.model_config = model_config
        self.storage_options = storage_options
        self.backbone: Backbone | None = backbone_of(model_config)
        self.preprocess = surgery.resolve_preprocess(model_config, self.backbone)
        core, checksums = build_core(model_config, self.backbone, storage_options)
        self.input_size: tuple[int, int] = core.input_size
        model, self.pooling = surgery.wrap_model(core, self.preprocess, model_config.pooling,
                                                 model_config.mixed_precision)
        self.feature_dim = int(model.outputs[0].shape[-1])
        self.num_classes = int(model.outputs[1].shape[-1]) if len(model.outputs) > 1 else 0
        self.top_k = min(model_config.top_k, self.num_classes)
        self.class_names, class_names_sha256 = self.read_class_names()
        checksums = dataclasses.replace(checksums, class_names=class_names_sha256)
        self.forward: Runtime = build_runtime(model_config, model, batch_size, self.top_k, num_threads)
        del model, core
        if self.runtime == "litert":
            # The interpreter holds its own copy of the weights: handing the Keras graph's back to the allocator
            # lets decode buffers reuse them (RSS does not shrink: the allocator keeps the pages).
            gc.collect()
        self.provenance = model_provenance(
            model_config, self.backbone, checksums, pooling=self.pooling, input_size=self.input_size,
            preprocess=self.preprocess, feature_dim=self.feature_dim, top_k=self.top_k,
            num_classes=self.num_classes, runtime=self.runtime)

    @property
    def runtime(self) -> str:
        """"keras" or "litert": what runs the model (model.runtime with auto resolved)."""
        return self.forward.name

    @property
    def batch_size(self) -> int:
        return self.forward.batch_size

    def read_class_names(self) -> tuple[list[str] | None, str]:
        """(class names for the top-k indices, the names file's sha256): from model.class_names, or ImageNet's
        for a zoo head of 1000 classes; (None, "") without predictions."""
        config = self.model_config
        if not self.top_k:
            return None, ""
        if config.class_names:
            names, checksum = loading.read_class_names(config.class_names, self.storage_options)
        elif self.backbone is not None and self.num_classes == 1000:
            names, checksum = loading.imagenet_class_names(), ""
        else:
            return None, ""
        if len(names) != self.num_classes:
            raise ConfigError(
                f"model.class_names: {config.class_names} has {len(names)} names but the "
                f"model's head has {self.num_classes} classes; give one name a line, in class-index order"
            )
        return names, checksum

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
        features, indices, scores = self.forward(images)
        return ExtractorOutput(features=features.astype(np.float32, copy=False),
                               top_k_indices=indices.astype(np.int32, copy=False),
                               top_k_scores=scores.astype(np.float32, copy=False))


def backbone_of(model_config: ModelConfig) -> Backbone | None:
    """The zoo entry of `model.backbone`, or None for a saved model."""
    return None if is_saved_model_path(model_config.backbone) else get_backbone(model_config.backbone)


def build_core(model_config: ModelConfig, backbone: Backbone | None,
               storage_options: dict | None) -> tuple[surgery.Core, Checksums]:
    """The network cut for features (loading and surgery), and the checksums of the files it was read from."""
    if backbone is None:
        model, backbone_sha256, weights_sha256 = loading.load_saved_model(model_config, storage_options)
        core = surgery.saved_model_core(model, model_config, model_config.backbone)
        return core, Checksums(weights=weights_sha256, backbone=backbone_sha256)
    side = model_config.input_size or backbone.input_size
    weights_sha256 = ""

    def network_for(include_top: bool):
        nonlocal weights_sha256
        network, weights_sha256 = loading.zoo_network(model_config, backbone, include_top, side, storage_options)
        return network

    core = surgery.zoo_core(model_config, backbone, network_for)
    return core, Checksums(weights=weights_sha256)
