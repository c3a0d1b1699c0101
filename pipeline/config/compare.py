"""The keys of `featurize compare`: candidates (every `model.*` key plus a name), a sample and one probe."""

from __future__ import annotations

import re
from dataclasses import field
from typing import Annotated

from pydantic import BeforeValidator

from pipeline.config.extract import (
    INPUT_URI_REQUIRED,
    FolderName,
    InputConfig,
    NamedModelConfig,
    RunConfig,
    TopK,
    check_runtime,
    is_weights_file,
    model_list,
)
from pipeline.config.train import ClassifierConfig, SplitConfig, TrainOutputConfig
from pipeline.contract import SAVED_MODEL_SUFFIXES, ZOO_NAMES, zoo_key
from pipeline.errors import ConfigError
from pipeline.sections import Flag, Number, Whole, rule, section


def default_name(candidate: CandidateConfig) -> str:
    """The file stem or zoo name; `-random` for a random-init baseline, `-none`/`-custom` for zoo weights."""
    stem = candidate.backbone.rstrip("/").rsplit("/", 1)[-1]
    for suffix in SAVED_MODEL_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    if candidate.random_init:
        return f"{stem}-random"
    if zoo_key(candidate.backbone) in ZOO_NAMES and candidate.weights != "imagenet":
        return f"{stem}-none" if candidate.weights == "none" else f"{stem}-custom"
    return stem


@section("candidate")
class CandidateConfig(NamedModelConfig):
    """One row of the comparison: every `model.*` key, plus a name and the random-init switch."""

    top_k: TopK = 0  # predictions are not needed to compare features
    name: FolderName = ""  # default: from the backbone
    random_init: Flag = False  # the no-transfer baseline: same architecture, weights re-initialised
    seed: Whole = 0  # seed of the random initialisation (random_init only)

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", default_name(self))  # frozen: set once, while being built


candidate_list = model_list  # a list of mappings (model.* keys plus name), as extract's `models:`


@section("sample")
class SampleConfig:
    # 0 = every listed image; else at most this many per label, chosen with `seed`
    max_per_class: Annotated[Whole, rule(lambda value: value >= 0, "use 0 (all) or a positive count")] = 0
    seed: Whole = 0


@section("probe")
class ProbeConfig:
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)  # as train's `classifier.*`
    split: SplitConfig = field(default_factory=SplitConfig)  # as train's `split.*`: one split for every candidate
    # accuracies within this of the best count as tied ...
    tie_tolerance: Annotated[Number, rule(lambda value: 0.0 <= value < 1.0, "allowed: a fraction in [0, 1)")] = 0.01
    # ... and a tied candidate at least this many times faster is recommended instead
    min_speedup: Annotated[Number, rule(lambda value: value >= 1.0, "allowed: a factor >= 1 (1 = the fastest tied "
                                                                    "candidate always wins)")] = 1.5


@section("")
class CompareConfig:
    input: InputConfig = field(default_factory=InputConfig)  # as extract's `input.*`; labels are required
    sample: SampleConfig = field(default_factory=SampleConfig)
    candidates: Annotated[tuple[CandidateConfig, ...], BeforeValidator(candidate_list)] = ()  # model.* + name
    run: RunConfig = field(default_factory=RunConfig)  # as extract's `run.*`, for every candidate
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    output: TrainOutputConfig = field(default_factory=TrainOutputConfig)

    def validate(self) -> CompareConfig:
        if not self.input.uri:
            raise ConfigError(INPUT_URI_REQUIRED)
        if self.input.labels == "none":
            raise ConfigError("input.labels: got 'none'; compare needs labelled images: use from_dirs or the name "
                              "of a manifest column")
        if not self.output.uri:
            raise ConfigError("output.uri is required: the directory to write features, probes and the comparison to")
        if not self.candidates:
            raise ConfigError("candidates: none given; list at least one, e.g. "
                              "[{name: mobilenetv2, backbone: mobilenetv2, weights: imagenet}]")
        names = [candidate.name for candidate in self.candidates]
        for index, candidate in enumerate(self.candidates):
            key = f"candidates.{index}"
            if candidate.name in names[:index]:
                raise ConfigError(f"{key}.name: {candidate.name!r} is used by more than one candidate "
                                  f"(candidates.{names.index(candidate.name)} too); names must be unique: set name:")
            if candidate.random_init and candidate.top_k:
                raise ConfigError(f"{key}.top_k: got {candidate.top_k} with random_init: true; a re-initialised "
                                  "head predicts noise: use top_k: 0")
            if candidate.random_init and is_weights_file(candidate.weights):
                raise ConfigError(f"{key}.weights: got {candidate.weights!r} with random_init: true; the baseline "
                                  "re-initialises every weight, so a weights file would be thrown away: drop weights")
            check_runtime(candidate, self.run, key)
        return self
