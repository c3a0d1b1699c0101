"""Configuration: the keys of every command as sections that validate themselves, loaded from YAML plus
`--set a.b=c` overrides (one parser for every command; `candidates.1.weights=none` reaches into a list).

The sections are the one source of truth for every key: its type, its default (commented) and its rule;
`pipeline.sections` says how they are checked. Defaults that belong to the code that applies them are
taken from there (resize modes and draft margin from decoding, preprocess modes from the zoo).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator

from pipeline.errors import ConfigError
from pipeline.extract.decode import DEFAULT_DRAFT_MARGIN, RESIZE_MODES
from pipeline.models.zoo import PREPROCESS_MODES, get_backbone, is_zoo_name
from pipeline.sections import (
    AUTO_OR_COUNT,
    FRACTION_OPEN,
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
    read_settings,
    rule,
    section,
)

# ------------------------------------------------------------------------------------------ the file rules

SAVED_MODEL_SUFFIXES = (".keras", ".h5")  # a whole saved Keras model; `.weights.h5` is weights only
WEIGHTS_SUFFIX = ".weights.h5"
WEIGHTS_KEYWORDS = ("imagenet", "none")  # the values of model.weights that are not a file


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
        get_backbone(backbone)  # a ConfigError naming the known backbones
    return backbone


# ------------------------------------------------------------------------------------------ extract

Backbone = Annotated[Text, AfterValidator(check_backbone)]
TopK = Annotated[Whole, rule(lambda value: value >= 0, "use 0 (no predictions) or a positive count")]
DraftMargin = Annotated[Whole, rule(lambda value: value >= 0, "use 0 (off) or a positive factor")]
GpuShare = Annotated[Number | None, BeforeValidator(null_word),
                     rule(lambda value: value >= 0, "use 0 (CPU only), a fraction or a count of GPUs, or leave it "
                                                    "unset (auto)")]
ErrorRate = Annotated[Number, rule(lambda value: 0.0 <= value <= 1.0, "allowed: a fraction in [0, 1]")]
# Prefixes of input.labels that read a label from an archive: a sibling member (`member:cls`, its text) or a field
# of the sample's .json member (`json:class`, `json:meta.class` for a nested one).
MEMBER_LABELS, JSON_LABELS = "member:", "json:"


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


@section("run")
class RunConfig:
    address: Text = ""  # Ray address; empty = start a local Ray
    actors: Annotated[Whole, AUTO_OR_COUNT] = 0  # 0 = one per GPU, or one per node on CPU clusters
    gpus_per_actor: GpuShare = None  # None = 1 on GPU clusters, 0 on CPU
    cpus_per_actor: MaybePositiveNumber = None  # None = the node's cores divided among its actors
    batch_size: Positive = 32
    shard_size: Positive = 1000  # images per shard: the unit of work, retry and resume
    shards_in_flight_per_actor: Positive = 2  # work is pulled: bounded shards queued per actor
    decode_threads: Annotated[Whole, AUTO_OR_COUNT] = 0  # fetch+decode threads per actor; 0 = its CPUs (min 4)
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
    run: RunConfig = field(default_factory=RunConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> ExtractConfig:
        """The keys every job needs and the rules across sections (each section checks its own keys)."""
        if not self.input.uri:
            raise ConfigError(INPUT_URI_REQUIRED)
        if not self.output.uri:
            raise ConfigError("output.uri is required: the directory (local or fsspec URI) to write Parquet to")
        check_runtime(self.model, self.run)
        return self


SCHEDULING = "scheduling only: where and how fast rows are computed, not their values"
FINGERPRINT_EXCLUDED = {  # the ExtractConfig keys that do not change the rows; every other key is fingerprinted
    "input.storage_options": "how the input is reached (endpoint, credentials), not what it holds",
    "input.uri_column": "where a manifest keeps its URIs; input.uri is fingerprinted and the listing frozen",
    "model.weights_sha256": "a guard on the weights file, whose actual checksum is fingerprinted instead",
    "model.trust": "permission to load Lambda layers; the model files themselves are fingerprinted",
    "model.xla": "compiles the same computation",
    "model.runtime": "keras and litert compute the same features (float32, within tolerance)",
    "run.address": SCHEDULING, "run.actors": SCHEDULING, "run.gpus_per_actor": SCHEDULING,
    "run.cpus_per_actor": SCHEDULING, "run.batch_size": SCHEDULING, "run.shards_in_flight_per_actor": SCHEDULING,
    "run.decode_threads": SCHEDULING, "run.max_attempts": "retries only",
    "run.max_error_rate": "when the job fails, not what it writes",
    "output.uri": "where the rows go, not what they are", "output.mode": "what happens to an existing output",
    "output.row_group_size": "Parquet layout, not values",
    "output.storage_options": "how the output is reached (endpoint, credentials)",
}
FINGERPRINT_NAMES = {"input.uri": "input_uri"}  # a key's name in `_plan.json` where it is not its last part


def check_runtime(model: ModelConfig, run: RunConfig, key: str = "model") -> None:
    """LiteRT is a float32 CPU runtime: GPU-only options contradict an explicit `model.runtime: litert`."""
    if model.runtime != "litert":
        return
    conflicts = [name for name, value in ((f"{key}.mixed_precision", model.mixed_precision), (f"{key}.xla", model.xla),
                                          ("run.gpus_per_actor", (run.gpus_per_actor or 0) > 0)) if value]
    if conflicts:
        raise ConfigError(f"{key}.runtime: litert runs float32 on CPUs, but {', '.join(conflicts)} asks for a GPU "
                          f"feature; set {key}.runtime: keras (or auto, which picks keras on GPUs)")


# ------------------------------------------------------------------------------------------ train


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


# ------------------------------------------------------------------------------------------ compare

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_name(candidate: CandidateConfig) -> str:
    """The file stem or zoo name; `-random` for a random-init baseline, `-none`/`-custom` for zoo weights."""
    stem = candidate.backbone.rstrip("/").rsplit("/", 1)[-1]
    for suffix in SAVED_MODEL_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    if candidate.random_init:
        return f"{stem}-random"
    if is_zoo_name(candidate.backbone) and candidate.weights != "imagenet":
        return f"{stem}-none" if candidate.weights == "none" else f"{stem}-custom"
    return stem


@section("candidate")
class CandidateConfig(ModelConfig):
    """One row of the comparison: every `model.*` key, plus a name and the random-init switch."""

    top_k: TopK = 0  # predictions are not needed to compare features
    name: Annotated[Text, rule(lambda value: not value or NAME_PATTERN.match(value), "use letters, digits, '.', "
                               "'_' and '-' (it names output folders)")] = ""  # default: from the backbone
    random_init: Flag = False  # the no-transfer baseline: same architecture, weights re-initialised
    seed: Whole = 0  # seed of the random initialisation (random_init only)

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", default_name(self))  # frozen: set once, while being built

    def model_config(self, **changes) -> ModelConfig:
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{**values, **changes})


def candidate_list(value: Any) -> Any:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"got {value!r}; expected a list of mappings (model.* keys plus name)")
    return value


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


# ------------------------------------------------------------------------------------------ analyse: index, search, dedup

MEMORY_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
                "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def memory_bytes(value: Any) -> int:
    """"4GiB", "512MB" or a count of bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if unit not in MEMORY_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"got {value!r}; give a size such as 4GiB, 512MiB or 8GB")
    return int(float(match.group(1)) * MEMORY_UNITS[unit])


MemorySize = Annotated[Text, AfterValidator(lambda value: memory_bytes(value) and value)]


@section("index")
class IndexOptions:
    metric: Literal["cosine", "inner_product", "l2"] = "cosine"  # cosine: vectors are L2-normalised first
    kind: Literal["auto", "flat", "ivf_pq", "hnsw"] = "auto"  # auto: by collection size and memory_budget
    memory_budget: MemorySize = "4GiB"  # what the index may take in memory (auto's choice, IVF-PQ code size)
    train_sample: Positive = 100_000  # vectors sampled to train IVF-PQ (centroids, codebooks)
    batch_rows: Positive = 16_384  # vectors read and added at a time (the build never holds them all)


@section("output")
class AnalyseOutputConfig:
    uri: Text = ""  # output directory (local path or fsspec URI)
    mode: Literal["resume", "overwrite"] = "resume"  # resume: a finished output with the same config is kept
    storage_options: dict = field(default_factory=dict)


OUTPUT_URI_REQUIRED = "output.uri is required: the directory (local or fsspec URI) to write to"


def require_features_and_output(features: FeaturesConfig, output: AnalyseOutputConfig) -> None:
    if not features.uri:
        raise ConfigError("features.uri is required: the output directory of `featurize extract` (or a list)")
    if not output.uri:
        raise ConfigError(OUTPUT_URI_REQUIRED)


@section("")
class IndexConfig:
    features: FeaturesConfig = field(default_factory=FeaturesConfig)  # uri: one or more extract outputs
    index: IndexOptions = field(default_factory=IndexOptions)
    output: AnalyseOutputConfig = field(default_factory=AnalyseOutputConfig)

    def validate(self) -> IndexConfig:
        require_features_and_output(self.features, self.output)
        return self


@section("index")
class SearchIndexOptions:
    uri: Text = ""  # output directory of `featurize index`
    storage_options: dict = field(default_factory=dict)


@section("search")
class SearchOptions:
    k: Positive = 10  # neighbours per query
    nprobe: Positive = 32  # ivf_pq: inverted lists visited per query
    ef_search: Positive = 128  # hnsw: candidate list length per query
    refine_factor: Positive = 32  # ivf_pq with re-ranking: PQ candidates re-ranked per neighbour (0.96 recall@10)
    batch_rows: Positive = 4096  # queries searched at a time
    show: Whole = 10  # queries shown in the terminal table (0 = none)


@section("")
class SearchConfig:
    index: SearchIndexOptions = field(default_factory=SearchIndexOptions)
    # image files, folders, URIs already in the index, or `all` (every item against the index, on Ray actors)
    queries: Texts = ()
    model: dict = field(default_factory=dict)  # model.* keys for image queries; default: the index's provenance
    search: SearchOptions = field(default_factory=SearchOptions)
    run: RunConfig = field(default_factory=RunConfig)  # address and actors for `queries: all`
    output: AnalyseOutputConfig = field(default_factory=AnalyseOutputConfig)

    def validate(self) -> SearchConfig:
        if not self.index.uri:
            raise ConfigError("index.uri is required: the output directory of `featurize index`")
        if not self.queries:
            raise ConfigError("queries is required: image files, a folder, URIs already in the index, or all")
        if not self.output.uri:
            raise ConfigError(OUTPUT_URI_REQUIRED)
        ModelConfig(**self.model)  # the keys and values of model.* are checked now; they apply on the index's own
        return self


Cosine = Annotated[Number | None, BeforeValidator(null_word),
                   rule(lambda value: value is None or -1.0 <= value <= 1.0, "allowed: a cosine in [-1, 1], or null")]
# The defaults below were measured on real photos with planted copies (half size, JPEG q25, 5% crop, all three, an
# exact copy) and each photo's four quadrant crops as distinct images (docs/analyse.md): with phash verification,
# pair precision 1.0 and recall 0.97; cosine alone at 0.78, precision 0.67 (the quadrants join their photo's group).
VERIFIED_THRESHOLD, COSINE_ONLY_THRESHOLD = 0.5, 0.78


@section("dedup")
class DedupOptions:
    # phash: a kNN pair is a duplicate only if the same bytes or phashes at most max_hamming bits apart;
    # none: cosine alone (also what outputs without the sha256/phash columns get, with a warning)
    verify: Literal["phash", "none"] = "phash"
    # cosine at or above which a pair is a candidate (verify: phash) or a duplicate (none); null: 0.5 with phash
    # (permissive: the hash decides), 0.78 with cosine alone
    threshold: Cosine = None
    max_hamming: Annotated[Whole, rule(lambda value: 0 <= value <= 64, "allowed: 0 to 64 bits")] = 20
    neighbours: Positive = 16  # kNN edges looked at per image (a group may still be larger: components chain)
    batch_rows: Positive = 16_384


@section("")
class DedupConfig:
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    dedup: DedupOptions = field(default_factory=DedupOptions)
    index: IndexOptions = field(default_factory=IndexOptions)  # kind and memory_budget of the kNN index
    output: AnalyseOutputConfig = field(default_factory=AnalyseOutputConfig)

    def validate(self) -> DedupConfig:
        require_features_and_output(self.features, self.output)
        if self.index.metric != "cosine":
            raise ConfigError(f"index.metric: got {self.index.metric!r}; dedup compares cosine similarity: "
                              "remove index.metric")
        return self


# ------------------------------------------------------------------------------------------ loading


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Read YAML (if given), apply `a.b=c` overrides, and build a validated `cls` instance."""
    data = read_settings(path, overrides)
    config = build(cls, data)
    if cls is ExtractConfig:
        check_explicit_weights(config.model, data.get("model") or {})
    return config


def build(cls: type, data: dict):
    """`cls` from a nested mapping of sections (a YAML document)."""
    unknown = sorted(str(name) for name in data if not isinstance(name, str))
    if unknown:
        allowed = ", ".join(item.name for item in dataclasses.fields(cls))
        raise ConfigError(f"config: unknown key(s) {', '.join(unknown)}; allowed keys: {allowed}")
    return cls(**data)


def check_explicit_weights(model: ModelConfig, given: dict) -> None:
    """`model.weights` defaults to imagenet, which applies to zoo backbones only; a saved model carries its own
    weights, so an explicit `imagenet` beside one asks for something featurize cannot do."""
    if given.get("weights") == "imagenet" and is_saved_model_path(model.backbone):
        raise ConfigError(f"model.weights: imagenet applies to zoo backbones, but model.backbone {model.backbone} "
                          "is a saved model with its own weights; remove model.weights (or set it to a weights "
                          "file to load into the saved model)")


def to_dict(config: Any) -> dict:
    """Plain nested dict of a config (for logs and provenance); storage options are left out (secrets)."""
    result = dataclasses.asdict(config)
    for section_values in result.values():
        if isinstance(section_values, dict):
            section_values.pop("storage_options", None)
    return result
