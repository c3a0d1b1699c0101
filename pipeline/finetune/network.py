"""The networks of a fine-tune: the base cut for features (as extract cuts it), the classifier built on it, the
augmenting wrapper that trains, and which layers train in each phase. No Ray and no URLs.

The classifier takes float 0..255 RGB pixels and holds its preprocessing in the graph, then the base network, its
pooling, dropout and a Dense softmax head named `classifier`: saved, it loads in Keras safe mode (no Lambda
layers), and `featurize extract` cuts it at the pooled features before the head (surgery's walk back) and reads
the head's softmax as its top-k.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from pipeline.config import AugmentConfig, FinetuneOptions, ModelConfig
from pipeline.errors import ConfigError
from pipeline.models import surgery
from pipeline.models.extractor import backbone_of, build_core
from pipeline.models.provenance import Checksums

CLASSIFIER_NAME = "finetuned"  # the classifier inside the training model, which wraps it with augmentation
HEAD_NAME = "classifier"
FEATURES_NAME = "features"  # the pooled features: extract's default cut in the saved classifier
# A block is a run of layers whose names share a prefix ending in block + its number: MobileNetV2 `block_16_`,
# ResNet `conv5_block3_`, EfficientNet `block7a_`, Xception `block14_`.
BLOCK_PREFIX = re.compile(r"^(.*?block_?\d+[a-z]?)(?:_|$)")


@dataclass
class Base:
    core: surgery.Core  # float pixels (preprocessed) -> feature tensor
    preprocess: str  # the preprocessing mode built into the classifier's graph
    checksums: Checksums


def load_base(model_config: ModelConfig, storage_options: dict | None) -> Base:
    """The base network cut where extract would cut it (`model.layer`, default the pooled layer before the
    classifier), with the configured weights; its own classifier is left off."""
    config = dataclasses.replace(model_config, top_k=0)
    backbone = backbone_of(config)
    core, checksums = build_core(config, backbone, storage_options)
    return Base(core, surgery.resolve_preprocess(config, backbone), checksums)


def build_classifier(base: Base, num_classes: int, model_config: ModelConfig, options: FinetuneOptions):
    """pixels 0..255 -> preprocess -> base -> pooled features -> dropout -> softmax over the new classes."""
    import keras

    height, width = base.core.input_size
    pixels = keras.Input((height, width, 3), name="pixels")
    features = base.core.model(surgery.preprocess_in_graph(pixels, base.preprocess))
    features = features[0] if isinstance(features, (list, tuple)) else features  # a zoo cut is a list of one
    _, features = surgery.pooled_features(features, model_config.pooling, None)
    # A layer of the classifier's own graph (not of the nested base) where extract's walk back stops.
    features = keras.layers.Identity(name=FEATURES_NAME)(features)
    dropped = keras.layers.Dropout(options.dropout, seed=options.seed, name="head_dropout")(features)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name=HEAD_NAME,
                                 kernel_initializer=keras.initializers.GlorotUniform(options.seed))(dropped)
    return keras.Model(pixels, outputs, name=CLASSIFIER_NAME)


def feature_network(classifier):
    """The classifier's pooled features (the input of its head's dropout), for the linear probe."""
    import keras

    return keras.Model(classifier.inputs, classifier.get_layer(FEATURES_NAME).output)


def augmentation_layers(augment: AugmentConfig, seed: int) -> list:
    """Keras's random image layers (active in training only), for the configured changes."""
    import keras

    layers: list[Any] = []
    if augment.flips != "none":
        layers.append(keras.layers.RandomFlip(augment.flips, seed=seed))
    if augment.crop:
        layers.append(keras.layers.RandomZoom((-augment.crop, 0.0), fill_mode="reflect", seed=seed + 1))
    if augment.rotation:
        layers.append(keras.layers.RandomRotation(augment.rotation / 360.0, fill_mode="reflect", seed=seed + 2))
    if augment.colour:
        layers.append(keras.layers.RandomBrightness(augment.colour, value_range=(0.0, 255.0), seed=seed + 3))
        layers.append(keras.layers.RandomContrast(augment.colour, value_range=(0.0, 255.0), seed=seed + 4))
    return layers


def build_training_model(classifier, options: FinetuneOptions):
    """Augmentation in front of the classifier: the model that trains and is checkpointed every epoch."""
    import keras

    pixels = keras.Input(classifier.inputs[0].shape[1:], name="pixels")
    augmented = pixels
    for layer in augmentation_layers(options.augment, options.seed):
        augmented = layer(augmented)
    return keras.Model(pixels, classifier(augmented), name="training")


def classifier_of(training_model):
    return training_model.get_layer(CLASSIFIER_NAME)


def base_layers(classifier) -> list:
    """The base network's own layers (nested models opened) in graph order: what phase 2 may unfreeze."""
    import keras

    core = next(layer for layer in classifier.layers if isinstance(layer, keras.Model))
    return list(leaf_layers(core))


def leaf_layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer


def first_trained_layer(layers: list, options: FinetuneOptions) -> int:
    """The index of the first base layer phase 2 trains: `unfreeze_from`, or the start of the last N blocks."""
    names = [layer.name for layer in layers]
    if options.unfreeze_from is not None:
        if options.unfreeze_from not in names:
            shown = names[-30:]
            raise ConfigError(f"finetune.unfreeze_from: {options.unfreeze_from!r} is not a layer of the base "
                              f"network; its last {len(shown)} layers: {', '.join(shown)}")
        return names.index(options.unfreeze_from)
    blocks = [match.group(1) if match else None for match in map(BLOCK_PREFIX.match, names)]
    starts = [index for index, block in enumerate(blocks) if block is not None and block not in blocks[:index]]
    if not starts:
        raise ConfigError("finetune.unfreeze_blocks: the base network's layer names have no blocks (block_N_...); "
                          f"set finetune.unfreeze_from to a layer name instead, e.g. one of {', '.join(names[-8:])}")
    return starts[-min(options.unfreeze_blocks, len(starts))]


def set_phase(classifier, phase: str, options: FinetuneOptions) -> None:
    """Which weights train: in `head` the head alone; in `network` the head and the base from the unfreeze point.
    Batch normalisation stays frozen (inference mode) in both: its statistics, learnt on many images, are not
    re-estimated from a few small batches."""
    import keras

    classifier.trainable = True
    layers = base_layers(classifier)
    start = len(layers) if phase == "head" else first_trained_layer(layers, options)
    for index, layer in enumerate(layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)


def compile_for(training_model, learning_rate: float) -> None:
    import keras

    training_model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                           metrics=["accuracy"])
