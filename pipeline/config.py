"""Configuration: frozen dataclasses with commented defaults, loaded from YAML plus `--set a.b=c` overrides.

The dataclasses are the one source of truth for every key. Unknown keys, wrong types and values outside
the allowed set fail at once with a `ConfigError` naming the key, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


def choice(default: Any, allowed: tuple) -> Any:
    """A field restricted to `allowed` values."""
    return field(default=default, metadata={"allowed": allowed})


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "webp")


@dataclass(frozen=True)
class InputConfig:
    uri: tuple[str, ...] = ()  # dir, glob, or manifest (.csv/.parquet/.txt); a list of them is allowed
    labels: str = "none"  # none | from_dirs | name of a manifest column
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # allow-list for directory and glob listings
    storage_options: dict = field(default_factory=dict)  # fsspec options (endpoint_url, anon, profile...)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "mobilenetv2"  # zoo name (`featurize models`) or path/URI of a saved .keras/.h5 model
    weights: str = "imagenet"  # imagenet | none | path/URI of a weights file
    weights_sha256: str | None = None  # refuse a weights file whose checksum differs
    layer: str | None = None  # cut point; default: the pooled layer before the classifier
    pooling: str = choice("avg", ("avg", "max"))  # applied when the cut layer is a spatial map
    top_k: int = 5  # 0 = no predictions
    class_names: str | None = None  # file with one class name a line (custom models)
    input_size: int | None = None  # square input side; default: the backbone's native size
    preprocess: str = choice("auto", ("auto", "caffe", "torch", "tf", "none"))  # auto: the zoo family's own
    resize: str = choice("stretch", ("stretch", "center_crop", "pad"))  # how images meet the input size
    draft_margin: int = 4  # JPEGs decode at reduced scale while staying >= this x the input size; 0 = off
    trust: bool = False  # allow Lambda layers (arbitrary code) in saved models
    mixed_precision: bool = False  # mixed_float16 compute (GPU option)
    xla: bool = False  # jit-compile the forward function (GPU option; slow on CPU)
    runtime: str = choice("auto", ("auto", "keras", "litert"))  # auto: litert on CPU-only actors, keras on GPUs


@dataclass(frozen=True)
class RunConfig:
    address: str = ""  # Ray address; empty = start a local Ray
    actors: int = 0  # 0 = one per GPU, or one per node on CPU clusters
    gpus_per_actor: float | None = None  # None = 1 on GPU clusters, 0 on CPU
    cpus_per_actor: float | None = None  # None = the node's cores divided among its actors
    batch_size: int = 32
    shard_size: int = 1000  # images per shard: the unit of work, retry and resume
    shards_in_flight_per_actor: int = 2  # work is pulled: bounded shards queued per actor
    decode_threads: int = 0  # fetch+decode threads per actor, ahead of the model; 0 = the actor's CPUs (min 4)
    max_attempts: int = 3  # tries per shard before it is bisected / quarantined
    max_error_rate: float = 0.1  # the job fails when error rows pass this fraction


@dataclass(frozen=True)
class OutputConfig:
    uri: str = ""  # output directory (local path or fsspec URI)
    feature_dtype: str = choice("float32", ("float32", "float16"))
    mode: str = choice("resume", ("resume", "overwrite", "error"))
    row_group_size: int = 1024
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ExtractConfig:
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> ExtractConfig:
        if not self.input.uri:
            raise ConfigError("input.uri is required: a directory, glob or manifest file (or a list of them)")
        if not self.output.uri:
            raise ConfigError("output.uri is required: the directory (local or fsspec URI) to write Parquet to")
        require_positive("run.batch_size", self.run.batch_size)
        require_positive("run.shard_size", self.run.shard_size)
        if self.run.decode_threads < 0:
            raise ConfigError(f"run.decode_threads: got {self.run.decode_threads}; use 0 (auto) or a positive count")
        require_positive("run.max_attempts", self.run.max_attempts)
        require_positive("run.shards_in_flight_per_actor", self.run.shards_in_flight_per_actor)
        if self.run.actors < 0:
            raise ConfigError(f"run.actors: got {self.run.actors}; use 0 (auto) or a positive count")
        if self.model.top_k < 0:
            raise ConfigError(f"model.top_k: got {self.model.top_k}; use 0 (no predictions) or a positive count")
        if not 0.0 <= self.run.max_error_rate <= 1.0:
            raise ConfigError(f"run.max_error_rate: got {self.run.max_error_rate}; allowed: a fraction in [0, 1]")
        check_backbone(self.model.backbone)
        if self.model.draft_margin < 0:
            raise ConfigError(f"model.draft_margin: got {self.model.draft_margin}; use 0 (off) or a positive factor")
        if self.model.input_size is not None:
            require_positive("model.input_size", self.model.input_size)
        require_positive("output.row_group_size", self.output.row_group_size)
        if self.run.cpus_per_actor is not None:
            require_positive("run.cpus_per_actor", self.run.cpus_per_actor)
        if self.run.gpus_per_actor is not None and self.run.gpus_per_actor < 0:
            raise ConfigError(f"run.gpus_per_actor: got {self.run.gpus_per_actor}; use 0 (CPU only), a fraction "
                              "or a count of GPUs, or leave it unset (auto)")
        check_runtime(self.model, self.run)
        return self


@dataclass(frozen=True)
class FeaturesConfig:
    uri: tuple[str, ...] = ()  # one or more extract outputs
    label_column: str = "label"
    labels_file: str | None = None  # CSV/Parquet with `uri` and the label column, joined on uri
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ClassifierConfig:
    kind: str = choice("logistic", ("logistic", "mlp"))
    regularization: float = 1.0  # inverse strength C for logistic regression
    class_weight: str = choice("none", ("none", "balanced"))
    hidden_units: int = 256  # mlp
    dropout: float = 0.3  # mlp
    epochs: int = 100  # mlp upper bound; early stopping ends sooner
    batch_size: int = 256
    max_in_memory_rows: int = 2_000_000  # above this, train from Parquet in batches
    validation_fraction: float = 0.1  # share of the train split held back for early stopping
    patience: int = 10  # epochs without validation improvement before early stopping


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float = 0.2  # stratified holdout
    seed: int = 0
    column: str | None = None  # use a split column (values train/test) instead


@dataclass(frozen=True)
class TrainOutputConfig:
    uri: str = ""
    storage_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
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
        if not 0.0 < self.split.test_fraction < 1.0:
            raise ConfigError(f"split.test_fraction: got {self.split.test_fraction}; allowed: a fraction in (0, 1)")
        if not 0.0 < self.classifier.validation_fraction < 1.0:
            raise ConfigError(f"classifier.validation_fraction: got {self.classifier.validation_fraction}; "
                              "allowed: a fraction in (0, 1)")
        require_positive("classifier.regularization", self.classifier.regularization)
        require_positive("classifier.epochs", self.classifier.epochs)
        require_positive("classifier.batch_size", self.classifier.batch_size)
        require_positive("classifier.patience", self.classifier.patience)
        require_positive("classifier.max_in_memory_rows", self.classifier.max_in_memory_rows)
        return self


SAVED_MODEL_SUFFIXES = (".keras", ".h5")  # a whole saved Keras model; `.weights.h5` is weights only


def is_saved_model_path(backbone: str) -> bool:
    """The one rule for `model.backbone`: a saved-model file (path or URI) rather than a zoo name.
    A weights file is neither and is refused, naming where it belongs."""
    lowered = backbone.lower()
    if lowered.endswith(".weights.h5"):
        raise ConfigError(f"model.backbone: {backbone!r} is a weights file, not a model; set model.backbone to a "
                          f"zoo name (`featurize models`) and model.weights: {backbone}")
    return lowered.endswith(SAVED_MODEL_SUFFIXES)


def is_weights_file(weights: str) -> bool:
    """`model.weights` names a file (path or URI) unless it is one of the keywords."""
    return weights not in ("imagenet", "none")


def check_backbone(backbone: str) -> None:
    """A zoo name must be known (fail before any cluster starts); a saved-model file is checked by the preflight."""
    from pipeline.models.zoo import get_backbone

    if is_saved_model_path(backbone):
        return
    try:
        get_backbone(backbone)
    except ValueError as error:
        raise ConfigError(f"model.backbone: {error}") from None


def check_runtime(model: ModelConfig, run: RunConfig) -> None:
    """LiteRT is a float32 CPU runtime: GPU-only options contradict an explicit `model.runtime: litert`."""
    if model.runtime != "litert":
        return
    conflicts = [key for key, value in (("model.mixed_precision", model.mixed_precision), ("model.xla", model.xla),
                                        ("run.gpus_per_actor", (run.gpus_per_actor or 0) > 0)) if value]
    if conflicts:
        raise ConfigError(f"model.runtime: litert runs float32 on CPUs, but {', '.join(conflicts)} asks for a GPU "
                          "feature; set model.runtime: keras (or auto, which picks keras on GPUs)")


def require_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: got {value}; it must be a positive number")


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Read YAML (if given), apply `a.b=c` overrides, and build a validated `cls` instance."""
    data = read_yaml(path)
    check_override_pairs(overrides)
    for override in overrides:
        apply_override(data, override)
    config = build(cls, data, prefix="").validate()
    if cls is ExtractConfig:
        check_explicit_weights(config.model, data.get("model") or {})
    return config


def check_explicit_weights(model: ModelConfig, given: dict) -> None:
    """`model.weights` defaults to imagenet, which applies to zoo backbones only; a saved model carries its own
    weights, so an explicit `imagenet` beside one asks for something featurize cannot do."""
    if given.get("weights") == "imagenet" and is_saved_model_path(model.backbone):
        raise ConfigError(f"model.weights: imagenet applies to zoo backbones, but model.backbone {model.backbone} "
                          "is a saved model with its own weights; remove model.weights (or set it to a weights "
                          "file to load into the saved model)")


def read_yaml(path: str | Path | None) -> dict:
    """The mapping of sections in a YAML config file (empty without a file)."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {describe_yaml_error(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """`line L, column C: problem` (1-based, as editors count) instead of PyYAML's multi-line report."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (f"{problem} ({context})" if context else problem)


def check_override_pairs(overrides: typing.Sequence[str]) -> None:
    """`--set run.batch_size 64` (a space for the '='): name the exact fix instead of argparse's usage text."""
    for index, override in enumerate(overrides):
        if "=" in override:
            continue
        following = overrides[index + 1] if index + 1 < len(overrides) else None
        if following is not None and "=" not in following:
            raise ConfigError(f"--set {override} {following}: write the key and value joined by '=', "
                              f"e.g. --set {override}={following}")
        raise ConfigError(f"--set {override}: expected key=value, e.g. --set run.batch_size=64")


def apply_override(data: dict, override: str) -> None:
    key, separator, raw_value = override.partition("=")
    if not separator or not key:
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. --set run.batch_size=64")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw_value)


def build(cls: type, data: Any, prefix: str):
    """Turn a nested mapping into dataclass `cls`, checking every key, type and allowed value."""
    section = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = prefix + name
        field_type = hints[name]
        if dataclasses.is_dataclass(field_type):
            values[name] = build(field_type, value, key + ".")
            continue
        values[name] = coerce(key, value, field_type)
        allowed = fields[name].metadata.get("allowed")
        if allowed and values[name] not in allowed:
            raise ConfigError(f"{key}: got {value!r}; allowed values: {', '.join(map(str, allowed))}")
    return cls(**values)


def coerce(key: str, value: Any, field_type: Any) -> Any:
    """Check `value` against a simple annotation (str, int, float, bool, dict, tuple[str, ...], X | None)."""
    origin = typing.get_origin(field_type)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(field_type) if option is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "~")):
            return None
        return coerce(key, value, options[0])
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{key}: got {value!r}; expected a string or a list of strings")
        return tuple(items)
    if field_type is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}; allowed values: true, false")
        return value
    if field_type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}; expected a whole number")
        return value
    if field_type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}; expected a number")
        return float(value)
    if field_type is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected a mapping")
        return value
    if field_type is str:
        if isinstance(value, bool) or value is None:
            raise ConfigError(f"{key}: got {value!r}; expected a string")
        return str(value)
    raise TypeError(f"unsupported config annotation {field_type} for {key}")


def to_dict(config: Any) -> dict:
    """Plain nested dict of a config (for logs and provenance); storage options are left out (secrets)."""
    result = dataclasses.asdict(config)
    for section in result.values():
        if isinstance(section, dict):
            section.pop("storage_options", None)
    return result
