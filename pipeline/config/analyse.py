"""The keys of the analyse stages: `featurize index`, `search` and `dedup`."""

from __future__ import annotations

import re
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator

from pipeline.config.extract import ModelConfig, RunConfig
from pipeline.config.train import FeaturesConfig
from pipeline.errors import ConfigError
from pipeline.sections import Number, Positive, Text, Texts, Whole, null_word, rule, section

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
