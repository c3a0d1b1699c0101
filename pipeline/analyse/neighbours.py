"""The kNN primitives every analyse stage shares: a loaded index with its uris and `_SUCCESS`, its search-time
knobs, the k nearest of a batch of vectors, and the neighbours table search writes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.analyse import index as analyse_index
from pipeline.analyse import output as analyse_output
from pipeline.analyse.vectors import as_metric_space
from pipeline.io import storage

NEIGHBOURS_SCHEMA = pa.schema([pa.field("query_uri", pa.string(), nullable=False),
                               pa.field("rank", pa.int32(), nullable=False),
                               pa.field("uri", pa.string(), nullable=False),
                               pa.field("score", pa.float32(), nullable=False)])


@dataclass
class LoadedIndex:
    document: dict  # the index output's `_SUCCESS`
    index: object  # the faiss index
    uris: pa.Array  # row id -> uri

    @property
    def metric(self) -> str:
        return self.document["metric"]

    @property
    def provenance(self) -> dict:
        return dict(self.document.get("provenance", {}))


def load_index(uri: str, storage_options: dict | None, nprobe: int, ef_search: int, refine_factor: int = 32
               ) -> LoadedIndex:
    """The index, its uris and its `_SUCCESS`, with the search-time knobs set."""
    import pyarrow.parquet as pq

    document = analyse_output.read_finished(uri, storage_options, "index", "index.uri")
    index = analyse_index.deserialize(storage.read_bytes(storage.join(uri, analyse_index.INDEX_FILE),
                                                         storage_options))
    set_search_knobs(index, document["kind"], nprobe, ef_search, refine_factor)
    fs, path = storage.filesystem(storage.join(uri, analyse_index.IDS_FILE), storage_options)
    with fs.open(path, "rb") as handle:
        ids = pq.read_table(handle, columns=["row_id", "uri"])
    uris = ids.sort_by("row_id")["uri"].combine_chunks()
    return LoadedIndex(document, index, uris)


def set_search_knobs(index, kind: str, nprobe: int, ef_search: int, refine_factor: int = 32) -> None:
    import faiss

    if kind == "ivf_pq":
        faiss.extract_index_ivf(index).nprobe = nprobe
        if isinstance(faiss.downcast_index(index), faiss.IndexRefine):
            faiss.downcast_index(index).k_factor = refine_factor  # re-rank refine_factor x k PQ candidates
    elif kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = ef_search


def nearest(loaded: LoadedIndex, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row ids) of the k nearest, best first; row id -1 where the index has fewer than k."""
    scores, ids = loaded.index.search(as_metric_space(matrix, loaded.metric), min(k, loaded.index.ntotal))
    return scores, ids


def neighbours_table(query_uris: list[str] | pa.Array, scores: np.ndarray, ids: np.ndarray,
                     index_uris: pa.Array) -> pa.Table:
    """One row per (query, neighbour), rank 1 first."""
    found = ids >= 0
    query_rows, ranks = np.nonzero(found)
    query_uris = pa.array(query_uris, type=pa.string()) if not isinstance(query_uris, pa.Array) else query_uris
    return pa.Table.from_arrays([
        query_uris.take(pa.array(query_rows)).cast(pa.string()),
        pa.array((ranks + 1).astype(np.int32)),
        index_uris.take(pa.array(ids[found])).cast(pa.string()),
        pa.array(scores[found].astype(np.float32)),
    ], schema=NEIGHBOURS_SCHEMA)
