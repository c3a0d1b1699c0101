"""The keys of `featurize extract`: input, model, run and output sections, and the rules on model files.

The vocabularies (resize and preprocess modes, draft margin, label prefixes, model-file suffixes, zoo names) and
which keys change the features are the contract's (`pipeline.contract`); the sections check values against them.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator

from pipeline.contract import (
    DEFAULT_DRAFT_MARGIN,
    JSON_LABELS,
    MEMBER_LABELS,
    PREPROCESS_MODES,
    RESIZE_MODES,
    SAVED_MODEL_SUFFIXES,
    WEIGHTS_KEYWORDS,
    WEIGHTS_SUFFIX,
    feature_settings,
    unknown_backbone,
)
from pipeline.errors import ConfigError
from pipeline.sections import (
    AUTO_OR_COUNT,
    Flag,
    MaybePositive,
    MaybePositiveNumber,
    MaybeText,
    Number,
    Positive,
    PositiveNumber,
    Text,
    Texts,
    Whole,
    null_word,
    replace_keys,
    rule,
    section,
)

# ------------------------------------------------------------------------------------------ the file rules

def weights_file_as_backbone(backbone: str) -> str:
    return (f"{backbone!r} is a weights file, not a model; set model.backbone to a zoo name (`featurize models`) "
            f"and model.weights: {backbone}")


def is_saved_model_path(backbone: str) -> bool:
    """The one rule for `model.backbone`: a saved-model file (path or URI) rather than a zoo name.
    A weights file is neither and is refused, naming where it belongs."""
    lowered = backbone.lower()
    if lowered.endswith(WEIGHTS_SUFFIX):
        raise ConfigError(f"model.backbone: {weights_file_as_backbone(backbone)}")
    return lowered.endswith(SAVED_MODEL_SUFFIXES)


def is_weights_file(weights: str) -> bool:
    """`model.weights` names a file (path or URI) unless it is one of the keywords."""
    return weights not in WEIGHTS_KEYWORDS


def check_backbone(backbone: str) -> str:
    """A zoo name must be known (fail before any cluster starts); a saved-model file is checked by the preflight."""
    if backbone.lower().endswith(WEIGHTS_SUFFIX):
        raise ValueError(weights_file_as_backbone(backbone))
    if not is_saved_model_path(backbone):
        message = unknown_backbone(backbone)  # naming the known backbones
        if message:
            raise ValueError(message)
    return backbone


# ------------------------------------------------------------------------------------------ sections

Backbone = Annotated[Text, AfterValidator(check_backbone)]
TopK = Annotated[Whole, rule(lambda value: value >= 0, "use 0 (no predictions) or a positive count")]
DraftMargin = Annotated[Whole, rule(lambda value: value >= 0, "use 0 (off) or a positive factor")]
GpuShare = Annotated[Number | None, BeforeValidator(null_word),
                     rule(lambda value: value >= 0, "use 0 (CPU only), a fraction or a count of GPUs, or leave it "
                                                    "unset (auto)")]
ErrorRate = Annotated[Number, rule(lambda value: 0.0 <= value <= 1.0, "allowed: a fraction in [0, 1]")]


def check_labels(labels: str) -> str:
    """`member:EXT` needs an extension and `json:FIELD` a field; anything else is a keyword or a manifest column
    (checked against the manifest when it is read)."""
    for prefix, example, what in ((MEMBER_LABELS, "member:cls", "a member extension (no dot)"),
                                  (JSON_LABELS, "json:class", "a field of the sample's .json member")):
        value = labels[len(prefix):] if labels.startswith(prefix) else None
        if value is not None and (not value or value != value.strip() or value.startswith(".") or "/" in value):
            raise ValueError(f"got {labels!r}, which needs {what} after {prefix!r}, e.g. {example}; allowed: none, "
                             f"from_dirs, member:EXT, json:FIELD (archives) or a manifest column name")
    return labels


Labels = Annotated[Text, AfterValidator(check_labels)]


def reader_builder(path: str):
    """The builder a dotted path "package.module:name" names; a ValueError saying what is wrong otherwise."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"got {path!r}; expected 'package.module:builder'")
    try:
        builder = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"got {path!r}, which cannot be loaded ({error}); name an importable builder") from None
    if not callable(builder):
        raise ValueError(f"got {path!r}, which is not callable; name a builder function")
    return builder


def check_reader(path: str | None) -> str | None:
    if path is not None:
        reader_builder(path)  # fails now, before any cluster starts
    return path
INPUT_URI_REQUIRED = "input.uri is required: a directory, glob or manifest file (or a list of them)"


@section("input")
class InputConfig:
    # dir, glob, manifest (.csv/.parquet/.txt), or archive (.tar/.tar.gz/.tgz/.zip); a list of them is allowed;
    # braces expand first (`shards/{00000..00999}.tar`)
    uri: Texts = ()
    uri_column: Text = "uri"  # the manifests' column of image URIs (img2dataset and LAION parts call it `url`)
    labels: Labels = "none"  # none | from_dirs | name of a manifest column | member:EXT | json:FIELD (archives)
    extensions: Texts = ("jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "webp")  # listings and archive members
    storage_options: dict = field(default_factory=dict)  # fsspec options (endpoint_url, anon, profile...)
    # "package.module:builder": builder(storage_options, **reader_options) returns read(uri) -> bytes, called in
    # the workers instead of fsspec (a store of your own; the tests' failing readers); None: fsspec
    reader: Annotated[MaybeText, AfterValidator(check_reader)] = None
    reader_options: dict = field(default_factory=dict)


@section("model")
class ModelConfig:
    backbone: Backbone = "mobilenetv2"  # zoo name (`featurize models`) or path/URI of a saved .keras/.h5 model
    weights: Text = "imagenet"  # imagenet | none | path/URI of a weights file
    weights_sha256: MaybeText = None  # refuse a weights file whose checksum differs
    layer: MaybeText = None  # cut point; default: the pooled layer before the classifier
    pooling: Literal["avg", "max"] = "avg"  # applied when the cut layer is a spatial map
    top_k: TopK = 5  # 0 = no predictions
    class_names: MaybeText = None  # file with one class name a line (custom models)
    input_size: MaybePositive = None  # square input side; default: the backbone's native size
    preprocess: Literal[("auto", *PREPROCESS_MODES)] = "auto"  # auto: the zoo family's own
    resize: Literal[RESIZE_MODES] = "stretch"  # how images meet the input size
    draft_margin: DraftMargin = DEFAULT_DRAFT_MARGIN  # JPEGs decode at reduced scale, >= this x the input size
    trust: Flag = False  # allow Lambda layers (arbitrary code) in saved models
    mixed_precision: Flag = False  # mixed_float16 compute (GPU option)
    xla: Flag = False  # jit-compile the forward function (GPU option; slow on CPU)
    runtime: Literal["auto", "keras", "litert"] = "auto"  # auto: litert on CPU-only actors, keras on GPUs


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FolderName = Annotated[Text, rule(lambda value: not value or NAME_PATTERN.match(value), "use letters, digits, '.', "
                                  "'_' and '-' (it names output folders)")]


@section("models")
class NamedModelConfig(ModelConfig):
    """One entry of extract's `models:` list: every `model.*` key plus the name of its output folder."""

    name: FolderName = ""  # required: the folder OUTPUT/NAME that holds this model's extract output

    def model_config(self, **changes) -> ModelConfig:
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{**values, **changes})


def model_list(value: Any) -> Any:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"got {value!r}; expected a list of mappings (model.* keys plus name)")
    return value


def check_model_names(models: tuple, key: str) -> None:
    """Every entry named (`models`), each name once."""
    names = [entry.name for entry in models]
    for index, name in enumerate(names):
        if not name:
            raise ConfigError(f"{key}.{index}.name is required: the folder (letters, digits, '.', '_', '-') that "
                              "will hold this model's output")
        if name in names[:index]:
            raise ConfigError(f"{key}.{index}.name: {name!r} is used by more than one entry ({key}."
                              f"{names.index(name)} too); names must be unique")


@section("run")
class RunConfig:
    address: Text = ""  # Ray address; empty = start a local Ray
    actors: Annotated[Whole, AUTO_OR_COUNT] = 0  # a fixed pool; 0 = one per GPU, or one per node on CPU clusters
    min_actors: Positive = 1  # an elastic pool starts work once this many actors are ready
    max_actors: Annotated[Whole, AUTO_OR_COUNT] = 0  # > 0: an elastic pool that asks the autoscaler for up to this
    start_timeout: PositiveNumber = 900.0  # seconds to wait for min_actors to be placed before exit 3
    gpus_per_actor: GpuShare = None  # None = 1 on GPU clusters, 0 on CPU
    cpus_per_actor: MaybePositiveNumber = None  # None = the node's cores divided among its actors
    batch_size: Positive = 32
    shard_size: Positive = 1000  # images per shard: the unit of work, retry and resume
    shards_in_flight_per_actor: Positive = 2  # work is pulled: bounded shards queued per actor
    decode_threads: Annotated[Whole, AUTO_OR_COUNT] = 0  # decode threads per actor; 0 = its CPUs
    fetch_threads: Annotated[Whole, AUTO_OR_COUNT] = 0  # threads reading loose files ahead of decode; 0 = 16
    max_attempts: Positive = 3  # tries per shard before it is bisected / quarantined
    max_error_rate: ErrorRate = 0.1  # the job fails when error rows pass this fraction


@section("output")
class OutputConfig:
    uri: Text = ""  # output directory (local path or fsspec URI)
    feature_dtype: Literal["float32", "float16"] = "float32"
    mode: Literal["resume", "overwrite", "error", "append"] = "resume"  # append: only images not yet in the output
    row_group_size: Positive = 1024
    # sha256 and phash columns of every ok row (exact and verified near-duplicates in `featurize dedup`); false
    # leaves them null: the phash costs about half a decode an image (docs/performance.md, Content hashes)
    content_hashes: Flag = True
    storage_options: dict = field(default_factory=dict)


@section("")
class ExtractConfig:
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # instead of `model`: several models fed by one decode, each with its own complete output at OUTPUT/NAME/
    models: Annotated[tuple[NamedModelConfig, ...], BeforeValidator(model_list)] = ()
    run: RunConfig = field(default_factory=RunConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> ExtractConfig:
        """The keys every job needs and the rules across sections (each section checks its own keys)."""
        if not self.input.uri:
            raise ConfigError(INPUT_URI_REQUIRED)
        if not self.output.uri:
            raise ConfigError("output.uri is required: the directory (local or fsspec URI) to write Parquet to")
        check_runtime(self.model, self.run)
        check_model_names(self.models, "models")
        for index, entry in enumerate(self.models):
            check_runtime(entry, self.run, f"models.{index}")
        check_pool(self.run)
        return self


def check_pool(run: RunConfig) -> None:
    """A pool is either fixed (`run.actors`) or elastic (`run.min_actors`..`run.max_actors`)."""
    if run.actors and run.max_actors:
        raise ConfigError(f"run.actors: {run.actors} asks for a fixed pool and run.max_actors: {run.max_actors} for "
                          "an elastic one; set one of them (run.actors: 0 for an elastic pool, or run.max_actors: 0)")
    if run.max_actors and run.min_actors > run.max_actors:
        raise ConfigError(f"run.min_actors: got {run.min_actors}, more than run.max_actors: {run.max_actors}; "
                          "use a run.min_actors no larger than run.max_actors")


def check_runtime(model: ModelConfig, run: RunConfig, key: str = "model") -> None:
    """LiteRT is a float32 CPU runtime: GPU-only options contradict an explicit `model.runtime: litert`."""
    if model.runtime != "litert":
        return
    conflicts = [name for name, value in ((f"{key}.mixed_precision", model.mixed_precision), (f"{key}.xla", model.xla),
                                          ("run.gpus_per_actor", (run.gpus_per_actor or 0) > 0)) if value]
    if conflicts:
        raise ConfigError(f"{key}.runtime: litert runs float32 on CPUs, but {', '.join(conflicts)} asks for a GPU "
                          f"feature; set {key}.runtime: keras (or auto, which picks keras on GPUs)")


def model_from_provenance(provenance: dict, overrides: dict | None = None) -> ModelConfig:
    """The model that extracted features with this provenance, as a `model.*` section (every key that changes the
    features, from the contract; no predictions), with `overrides` on top."""
    config = ModelConfig(**feature_settings(provenance), weights_sha256=None, top_k=0,
                         runtime=provenance.get("runtime", "auto"))
    return replace_keys(config, overrides) if overrides else config
