"""The keys of `featurize finetune`: `input` and `model` as extract's, `finetune` (what trains, for how long,
how fast, with which augmentation), `split` as train's, `run` (workers on Ray), `output`.

The stage that reads them is pipeline/finetune/ (docs/finetune.md).
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pipeline.config.extract import GpuShare, InputConfig, ModelConfig
from pipeline.config.loading import build, check_explicit_weights
from pipeline.config.train import SplitConfig
from pipeline.errors import ConfigError
from pipeline.sections import (
    AUTO_OR_COUNT,
    FRACTION_OPEN,
    MaybeText,
    Number,
    Positive,
    PositiveNumber,
    Text,
    Whole,
    read_settings,
    rule,
    section,
)

Count = Annotated[Whole, rule(lambda value: value >= 0, "use 0 (none) or a positive count")]
Fraction = Annotated[Number, rule(lambda value: 0.0 <= value < 1.0, "allowed: a fraction in [0, 1)")]
Degrees = Annotated[Number, rule(lambda value: 0.0 <= value <= 45.0, "allowed: degrees in [0, 45] (small rotations)")]


@section("finetune.augment")
class AugmentConfig:
    """Random changes to each training image, a new draw every epoch (never applied to validation or test images)."""

    flips: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "horizontal"  # none for text, digits
    crop: Fraction = 0.1  # zoom into a random part: up to this fraction of each side cut off, resized back
    rotation: Degrees = 10.0  # up to this many degrees either way
    colour: Fraction = 0.1  # brightness and contrast changed by up to this fraction


@section("finetune")
class FinetuneOptions:
    head_epochs: Positive = 3  # phase 1: the new head alone trains, the network is frozen
    head_learning_rate: PositiveNumber = 1e-3
    epochs: Count = 5  # phase 2: the top of the network trains with the head (0 = head only)
    learning_rate: PositiveNumber = 1e-4  # phase 2: small, so the pretrained weights move a little
    unfreeze_from: MaybeText = None  # phase 2 trains this layer and every later one ...
    unfreeze_blocks: Positive = 2  # ... or, without unfreeze_from, the last N blocks (`block_16_*`, `conv5_block3_*`)
    batch_size: Positive = 32  # images per step, over all workers
    dropout: Fraction = 0.2  # before the new head
    validation_fraction: Annotated[Number, FRACTION_OPEN] = 0.1  # of the train split, for early stopping
    patience: Positive = 3  # epochs without a lower validation loss before a phase stops early
    seed: Whole = 0  # shuffling, augmentation, the head's initial weights
    sync_every: Positive = 16  # run.workers > 1: steps each worker takes between two averagings of the weights
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@section("run")
class FinetuneRunConfig:
    address: Text = ""  # Ray address; empty = the Ray job's cluster, else a private local Ray
    workers: Positive = 1  # training processes; more than one trains data-parallel
    gpus_per_worker: GpuShare = None  # None: 1 on GPU clusters, 0 (CPU threads) on CPU clusters
    cpus_per_worker: Annotated[Whole, AUTO_OR_COUNT] = 0  # 0 = the node's cores divided among its workers
    decode_threads: Positive = 4  # fetch+decode threads per worker, ahead of the model
    max_attempts: Positive = 3  # starts of a worker (a lost worker resumes from the last finished epoch)


@section("output")
class FinetuneOutputConfig:
    uri: Text = ""  # the directory for model.keras, class_names.txt, metrics.json, curves and checkpoints
    mode: Literal["resume", "overwrite"] = "resume"  # resume: continue from the last finished epoch
    storage_options: dict = field(default_factory=dict)


@section("")
class FinetuneConfig:
    input: InputConfig = field(default_factory=InputConfig)  # as extract's; labels are required
    model: ModelConfig = field(default_factory=ModelConfig)  # as extract's: the base network, its cut and preprocessing
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    split: SplitConfig = field(default_factory=SplitConfig)  # as train's: the held-out test split
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)
    output: FinetuneOutputConfig = field(default_factory=FinetuneOutputConfig)

    def validate(self) -> FinetuneConfig:
        if not self.input.uri:
            raise ConfigError("input.uri is required: a directory, glob, manifest or archive of labelled images")
        if self.input.labels == "none":
            raise ConfigError("input.labels: got 'none'; finetune needs labelled images: use from_dirs, the name "
                              "of a manifest column, member:EXT or json:FIELD")
        if not self.output.uri:
            raise ConfigError("output.uri is required: the directory (local or fsspec URI) to write the model to")
        if self.split.column:
            raise ConfigError(f"split.column: got {self.split.column!r}; finetune holds out a stratified random "
                              "split: remove split.column and set split.test_fraction")
        if self.model.mixed_precision or self.model.xla:
            raise ConfigError("model.mixed_precision / model.xla: extract options; finetune trains in float32: "
                              "remove them")
        return self


def load_finetune_config(path: str | None, overrides=()) -> FinetuneConfig:
    """The checked config: YAML plus `--set` overrides; a bad key or value is a ConfigError naming it."""
    data = read_settings(path, overrides)
    config = build(FinetuneConfig, data)
    check_explicit_weights(config.model, data.get("model") or {})
    return config
