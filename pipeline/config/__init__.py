"""Configuration: the keys of every command as sections that validate themselves, loaded from YAML plus
`--set a.b=c` overrides (one parser for every command; `candidates.1.weights=none` reaches into a list).

The sections are the one source of truth for every key: its type, its default (commented) and its rule;
`pipeline.sections` says how they are checked. One module per command (extract, train, compare, analyse) and
`loading`; the vocabularies they check against and which keys change the features are `pipeline.contract`'s.
Every name is re-exported here: `from pipeline.config import X` is the way in.
"""

from pipeline.config.analyse import (
    COSINE_ONLY_THRESHOLD,
    MEMORY_UNITS,
    OUTPUT_URI_REQUIRED,
    VERIFIED_THRESHOLD,
    AnalyseOutputConfig,
    DedupConfig,
    DedupOptions,
    IndexConfig,
    IndexOptions,
    MemorySize,
    SearchConfig,
    SearchIndexOptions,
    SearchOptions,
    memory_bytes,
    require_features_and_output,
)
from pipeline.config.compare import (
    CandidateConfig,
    CompareConfig,
    ProbeConfig,
    SampleConfig,
    candidate_list,
    default_name,
)
from pipeline.config.extract import (
    INPUT_URI_REQUIRED,
    NAME_PATTERN,
    Backbone,
    DraftMargin,
    ErrorRate,
    ExtractConfig,
    GpuShare,
    InputConfig,
    Labels,
    ModelConfig,
    NamedModelConfig,
    OutputConfig,
    RunConfig,
    TopK,
    check_backbone,
    check_labels,
    check_runtime,
    is_saved_model_path,
    is_weights_file,
    model_from_provenance,
    reader_builder,
    weights_file_as_backbone,
)
from pipeline.config.finetune import (
    AugmentConfig,
    FinetuneConfig,
    FinetuneOptions,
    FinetuneOutputConfig,
    FinetuneRunConfig,
    load_finetune_config,
)
from pipeline.config.loading import build, check_explicit_weights, load_config, to_dict
from pipeline.config.train import (
    ClassifierConfig,
    FeaturesConfig,
    SplitConfig,
    TrainConfig,
    TrainOutputConfig,
)
from pipeline.contract import (
    DEFAULT_DRAFT_MARGIN,
    FINGERPRINT_EXCLUDED,
    FINGERPRINT_NAMES,
    JSON_LABELS,
    MEMBER_LABELS,
    PREPROCESS_MODES,
    RESIZE_MODES,
    SAVED_MODEL_SUFFIXES,
    SCHEDULING,
    WEIGHTS_KEYWORDS,
    WEIGHTS_SUFFIX,
)
from pipeline.errors import ConfigError  # importable from here as before

__all__ = [
    "COSINE_ONLY_THRESHOLD", "VERIFIED_THRESHOLD", "ConfigError", "AnalyseOutputConfig", "Backbone",
    "CandidateConfig", "ClassifierConfig", "CompareConfig", "DEFAULT_DRAFT_MARGIN",
    "DedupConfig", "DedupOptions", "DraftMargin", "ErrorRate", "ExtractConfig", "FINGERPRINT_EXCLUDED",
    "FINGERPRINT_NAMES", "AugmentConfig", "FinetuneConfig", "FinetuneOptions", "FinetuneOutputConfig",
    "FinetuneRunConfig", "load_finetune_config", "FeaturesConfig", "GpuShare", "INPUT_URI_REQUIRED", "IndexConfig", "IndexOptions",
    "InputConfig", "JSON_LABELS", "Labels", "MEMBER_LABELS", "MEMORY_UNITS", "MemorySize", "ModelConfig",
    "NAME_PATTERN", "NamedModelConfig", "OUTPUT_URI_REQUIRED", "OutputConfig", "PREPROCESS_MODES", "ProbeConfig",
    "RESIZE_MODES",
    "RunConfig", "SAVED_MODEL_SUFFIXES", "SCHEDULING", "SampleConfig", "SearchConfig", "SearchIndexOptions",
    "SearchOptions", "SplitConfig", "TopK", "TrainConfig", "TrainOutputConfig", "WEIGHTS_KEYWORDS", "WEIGHTS_SUFFIX",
    "build", "candidate_list", "check_backbone", "check_explicit_weights", "check_labels", "check_runtime",
    "default_name", "is_saved_model_path", "is_weights_file", "load_config", "memory_bytes", "model_from_provenance",
    "reader_builder",
    "require_features_and_output", "to_dict", "weights_file_as_backbone",
]
