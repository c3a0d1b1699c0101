"""`featurize index`: a faiss index over one or more extract outputs, with row id -> uri beside it.

Output layout (paths relative to output.uri):
    index.faiss     the faiss index (faiss.serialize_index); row id = position of the ok row in `_SUCCESS` file order
    ids.parquet     `row_id` int64, `uri` string: one row per vector
    _SUCCESS        JSON: stage "index", files, rows, kind and parameters, metric, provenance, sources, fingerprint

`index.kind: auto` chooses as autofaiss does: exact (flat) while the collection is small and fits the memory
budget, HNSW (full vectors plus a graph: fast, high recall) while that fits, else IVF-PQ with the largest code
that fits (compressed, approximate). IVF-PQ trains on a sample; vectors are added from the Parquet files batch by
batch, never all in memory. Error rows are skipped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from pipeline.analyse import output as analyse_output
from pipeline.analyse.vectors import (
    as_metric_space,
    fingerprint_of,
    num_ok_rows,
    ok_batches,
    open_features,
    sources_document,
)
from pipeline.config import IndexConfig, IndexOptions, memory_bytes
from pipeline.errors import ConfigError
from pipeline.io import storage

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
IDS_SCHEMA = pa.schema([pa.field("row_id", pa.int64(), nullable=False), pa.field("uri", pa.string(), nullable=False)])
FLAT_MAX_VECTORS = 100_000  # exact search below this: brute force is fast enough and recall is 1
HNSW_NEIGHBOURS = 32  # graph degree M: ~0.95+ recall@10 at ef_search 128 on 1,280-d features
HNSW_EF_CONSTRUCTION = 64
ID_BYTES = 8  # IVF lists store an int64 id beside each code
MIN_TRAIN_PER_CENTROID = 39  # faiss's k-means wants at least this many training points per centroid


@dataclass(frozen=True)
class IndexPlan:
    kind: str  # flat | hnsw | ivf_pq
    num_vectors: int
    dim: int
    estimated_bytes: int
    nlist: int = 0  # ivf_pq: inverted lists (coarse centroids)
    pq_m: int = 0  # ivf_pq: bytes per code (sub-quantizers of 8 bits each)
    pq_bits: int = 8
    refine: bool = False  # ivf_pq: re-rank the shortlist with 8-bit scalar-quantised vectors (dim bytes each)
    hnsw_m: int = 0

    def factory(self) -> str:
        """The faiss index_factory string."""
        if self.kind == "flat":
            return "Flat"
        if self.kind == "hnsw":
            return f"HNSW{self.hnsw_m}"
        return f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_bits}" + (",Refine(SQ8)" if self.refine else "")


def flat_bytes(num_vectors: int, dim: int) -> int:
    return num_vectors * dim * 4


def hnsw_bytes(num_vectors: int, dim: int, neighbours: int = HNSW_NEIGHBOURS) -> int:
    """Full vectors plus the graph: 2M links on level 0, ~M/(M-1) more above, 4 bytes each."""
    return num_vectors * (dim * 4 + int(2 * neighbours * 4 * 1.05))


def ivf_pq_bytes(num_vectors: int, dim: int, nlist: int, pq_m: int, refine: bool = False) -> int:
    return num_vectors * (pq_m + ID_BYTES + (dim if refine else 0)) + nlist * dim * 4 + dim * 256 * 4


def number_of_lists(num_vectors: int, train_sample: int | None = None) -> int:
    """~4 sqrt(n) lists as a power of two (autofaiss' rule), at most one per 39 training vectors."""
    wanted = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_vectors))))
    return max(1, min(wanted, min(num_vectors, train_sample or num_vectors) // MIN_TRAIN_PER_CENTROID))


def code_sizes(dim: int) -> list[int]:
    """PQ code sizes faiss can use for `dim`: divisors of it, with sub-vectors of 4 dims or more, largest first."""
    return [m for m in range(min(dim // 4, 256), 0, -1) if dim % m == 0] or [1]


def choose_index(num_vectors: int, dim: int, memory_budget: int, kind: str = "auto",
                 train_sample: int | None = None) -> IndexPlan:
    """The index for `num_vectors` vectors of `dim` dims within `memory_budget` bytes (a pure function)."""
    if num_vectors < 1:
        raise ConfigError("features.uri holds no ok rows: there is nothing to index")
    if kind == "auto":
        if num_vectors <= FLAT_MAX_VECTORS and flat_bytes(num_vectors, dim) <= memory_budget:
            kind = "flat"
        elif hnsw_bytes(num_vectors, dim) <= memory_budget:
            kind = "hnsw"
        else:
            kind = "ivf_pq"
    if kind == "flat":
        plan = IndexPlan("flat", num_vectors, dim, flat_bytes(num_vectors, dim))
    elif kind == "hnsw":
        plan = IndexPlan("hnsw", num_vectors, dim, hnsw_bytes(num_vectors, dim), hnsw_m=HNSW_NEIGHBOURS)
    else:
        plan = ivf_pq_plan(num_vectors, dim, memory_budget, train_sample)
    if plan.estimated_bytes > memory_budget:
        raise ConfigError(f"index.memory_budget: {kind} needs about {plan.estimated_bytes / 2**30:.2f} GiB for "
                          f"{num_vectors} vectors of {dim} dims, above the budget of {memory_budget / 2**30:.2f} "
                          "GiB; raise index.memory_budget or use index.kind: auto (it compresses with IVF-PQ)")
    return plan


def ivf_pq_plan(num_vectors: int, dim: int, memory_budget: int, train_sample: int | None = None) -> IndexPlan:
    """IVF-PQ re-ranked with 8-bit vectors where those fit the budget (recall near exact search at a quarter of
    flat's memory); else the largest PQ code that fits (recall grows with the code size)."""
    nlist = number_of_lists(num_vectors, train_sample)
    # 2^bits centroids per sub-quantizer, each wanting 39 training vectors: tiny collections get fewer bits
    bits = max(1, min(8, int(math.log2(max(2, num_vectors // MIN_TRAIN_PER_CENTROID)))))
    sizes = code_sizes(dim)
    shortlist_m = next((m for m in sizes if m <= max(dim // 20, 1)), sizes[-1])  # a coarse code to shortlist
    if ivf_pq_bytes(num_vectors, dim, nlist, shortlist_m, refine=True) <= memory_budget:
        return IndexPlan("ivf_pq", num_vectors, dim, ivf_pq_bytes(num_vectors, dim, nlist, shortlist_m, refine=True),
                         nlist=nlist, pq_m=shortlist_m, pq_bits=bits, refine=True)
    fitting = [m for m in sizes if ivf_pq_bytes(num_vectors, dim, nlist, m) <= memory_budget]
    pq_m = fitting[0] if fitting else sizes[-1]
    return IndexPlan("ivf_pq", num_vectors, dim, ivf_pq_bytes(num_vectors, dim, nlist, pq_m), nlist=nlist,
                     pq_m=pq_m, pq_bits=bits)


def faiss_metric(metric: str) -> int:
    import faiss

    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def new_index(plan: IndexPlan, metric: str):
    import faiss

    index = faiss.index_factory(plan.dim, plan.factory(), faiss_metric(metric))
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if plan.kind == "ivf_pq":
        # the factory turns on polysemous training (Hamming filtering we never use): minutes of training for nothing
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    return index


def training_sample(batches, num_vectors: int, sample_size: int, metric: str, seed: int = 0) -> np.ndarray:
    """About `sample_size` vectors drawn uniformly from a stream of batches (each row kept with one probability)."""
    generator = np.random.default_rng(seed)
    keep = min(1.0, sample_size / max(num_vectors, 1))
    parts = [matrix[generator.random(len(matrix)) < keep] for _, matrix in batches]
    return as_metric_space(np.concatenate(parts) if parts else np.zeros((0, 0), np.float32), metric)


def build_faiss(plan: IndexPlan, options: IndexOptions, batches_factory, on_batch=None):
    """A filled faiss index: trained on a sample (IVF-PQ), then vectors added batch by batch.
    `batches_factory()` yields (uris, matrix) afresh each call; `on_batch(start_row, uris)` sees every batch."""
    index = new_index(plan, options.metric)
    if not index.is_trained:
        sample = training_sample(batches_factory(), plan.num_vectors, options.train_sample, options.metric)
        index.train(sample)
        del sample
    start = 0
    for uris, matrix in batches_factory():
        index.add(as_metric_space(matrix, options.metric))
        if on_batch is not None:
            on_batch(start, uris)
        start += len(matrix)
    return index


def serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def build_index(config: IndexConfig) -> dict:
    """Build (or find already built) the index output; returns its `_SUCCESS` document."""
    options, out = config.index, config.output
    read_options = config.features.storage_options
    feature_set = open_features(config.features.uri, read_options)
    num_vectors = num_ok_rows(feature_set, read_options)
    plan = choose_index(num_vectors, feature_set.feature_dim, memory_bytes(options.memory_budget), options.kind,
                        options.train_sample)
    sources = sources_document(feature_set, read_options)
    fingerprint = fingerprint_of({"sources": sources, "files": feature_set.files, "metric": options.metric,
                                  "plan": asdict(plan), "train_sample": options.train_sample})
    done = analyse_output.finished(out, fingerprint, "index")
    if done is not None:
        return {**done, "already_done": True}
    with analyse_output.writing(out, "index") as started:
        ids_uri = storage.join(out.uri, IDS_FILE)
        with analyse_output.parquet_writer(ids_uri, IDS_SCHEMA, out.storage_options) as ids_writer:
            def write_ids(start: int, uris: pa.Array) -> None:
                row_ids = pa.array(np.arange(start, start + len(uris), dtype=np.int64))
                ids_writer.write_table(pa.Table.from_arrays([row_ids, uris.cast(pa.string())], schema=IDS_SCHEMA))

            index = build_faiss(plan, options, lambda: ok_batches(feature_set, read_options, options.batch_rows),
                                write_ids)
        data = serialize(index)
        storage.write_bytes(storage.join(out.uri, INDEX_FILE), data, out.storage_options)
        extras = {"rows": {"total": feature_set.num_rows, "ok": int(index.ntotal),
                           "error": feature_set.num_rows - int(index.ntotal)},
                  "kind": plan.kind, "factory": plan.factory(), "metric": options.metric, "plan": asdict(plan),
                  "index_bytes": len(data), "feature_dim": feature_set.feature_dim,
                  "provenance": feature_set.provenance, "sources": sources}
        return analyse_output.write_success(out, "index", fingerprint, [INDEX_FILE, IDS_FILE], started, extras)
