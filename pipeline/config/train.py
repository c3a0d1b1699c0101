"""The keys of `featurize train` (features, classifier, split, output); `featurize predict` reads its output."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pipeline.errors import ConfigError
from pipeline.sections import FRACTION_OPEN, MaybeText, Number, Positive, PositiveNumber, Text, Texts, Whole, section


@section("features")
class FeaturesConfig:
    uri: Texts = ()  # one or more extract outputs
    label_column: Text = "label"
    labels_file: MaybeText = None  # CSV/Parquet with `uri` and the label column, joined on uri
    storage_options: dict = field(default_factory=dict)


@section("classifier")
class ClassifierConfig:
    kind: Literal["logistic", "mlp"] = "logistic"
    regularization: PositiveNumber = 1.0  # inverse strength C for logistic regression
    class_weight: Literal["none", "balanced"] = "none"
    hidden_units: Whole = 256  # mlp
    dropout: Number = 0.3  # mlp
    epochs: Positive = 100  # mlp upper bound; early stopping ends sooner
    batch_size: Positive = 256
    max_in_memory_rows: Positive = 2_000_000  # above this, train from Parquet in batches
    validation_fraction: Annotated[Number, FRACTION_OPEN] = 0.1  # train split share held back for early stopping
    patience: Positive = 10  # epochs without validation improvement before early stopping


@section("split")
class SplitConfig:
    test_fraction: Annotated[Number, FRACTION_OPEN] = 0.2  # stratified holdout
    seed: Whole = 0
    column: MaybeText = None  # use a split column (values train/test) instead


@section("output")
class TrainOutputConfig:
    uri: Text = ""  # directory for the classifier, metrics and plots (compare: features, probes, comparison)
    storage_options: dict = field(default_factory=dict)


@section("")
class TrainConfig:
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    output: TrainOutputConfig = field(default_factory=TrainOutputConfig)

    def validate(self) -> TrainConfig:
        if not self.features.uri:
            raise ConfigError("features.uri is required: the output directory of `featurize extract`")
        if not self.output.uri:
            raise ConfigError("output.uri is required: the directory to write the classifier and metrics to")
        return self
