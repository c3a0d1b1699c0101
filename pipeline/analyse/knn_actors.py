"""Batch kNN for `featurize search` with `queries: all`: Ray actors that each load the index once and search
one features file at a time (Ray appears only here among the analyse modules; pipeline/ray_cluster.py starts or joins it)."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import ray

from pipeline.config import SearchConfig
from pipeline.ray_cluster import connect


class KnnActor:
    """Holds one loaded index; `search_file` returns the neighbours of every ok row of one features file."""

    def __init__(self, index_uri: str, storage_options: dict, nprobe: int, ef_search: int, refine_factor: int):
        import faiss

        from pipeline.analyse.neighbours import load_index

        faiss.omp_set_num_threads(1)  # one core per actor: the actors are the parallelism
        self.loaded = load_index(index_uri, storage_options, nprobe, ef_search, refine_factor)

    def search_file(self, file_uri: str, feature_dim: int, k: int, batch_rows: int) -> pa.Table:
        from pipeline.analyse.neighbours import NEIGHBOURS_SCHEMA, nearest, neighbours_table
        from pipeline.analyse.vectors import ok_batches
        from pipeline.output.features import FeatureSet

        one_file = FeatureSet((), (file_uri,), 0, feature_dim, (), {})
        tables = [neighbours_table(uris, *nearest(self.loaded, matrix, k), self.loaded.uris)
                  for uris, matrix in ok_batches(one_file, None, batch_rows)]
        return pa.concat_tables(tables) if tables else NEIGHBOURS_SCHEMA.empty_table()


def neighbours_of_every_item(config: SearchConfig, index_document: dict) -> Iterator[pa.Table]:
    """Tables of neighbours, one per features file, as the actors finish them (at most two queued per actor)."""
    from pipeline.output.features import open_features

    connect(config.run.address)
    feature_set = open_features(tuple(source["uri"] for source in index_document["sources"]))
    files = list(feature_set.files)
    num_cpus = int(ray.cluster_resources().get("CPU", 1))
    num_actors = max(1, min(config.run.actors or num_cpus, len(files)))
    remote = ray.remote(num_cpus=1)(KnnActor)
    knobs = config.search
    actors = [remote.remote(config.index.uri, dict(config.index.storage_options), knobs.nprobe, knobs.ef_search,
                            knobs.refine_factor) for _ in range(num_actors)]
    pending: dict = {}
    next_file = 0
    try:
        while next_file < len(files) or pending:
            while next_file < len(files) and len(pending) < 2 * num_actors:
                actor = actors[next_file % num_actors]
                pending[actor.search_file.remote(files[next_file], feature_set.feature_dim, knobs.k,
                                                 knobs.batch_rows)] = next_file
                next_file += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ready[0])
            yield ray.get(ready[0])
    finally:
        for actor in actors:
            ray.kill(actor)
