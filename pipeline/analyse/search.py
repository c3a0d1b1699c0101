"""`featurize search`: the k nearest neighbours of queries in an index built by `featurize index`.

Queries are uris already in the index (their stored features), image files or folders (extracted here with the
model the index's provenance names: an index built from other features is refused, naming the difference), or
`all`: every item against the index, spread across Ray actors (pipeline/analyse/knn_actors.py).

Output (paths relative to output.uri): `neighbours.parquet` with `query_uri`, `rank` (1 = nearest), `uri`, `score`
(cosine similarity, inner product, or squared L2 distance for `l2`: smaller is nearer), then `_SUCCESS` (stage
"search"). A query image that cannot be read or decoded has no rows; its reason is in `_SUCCESS` `query_errors`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.analyse import output as analyse_output
from pipeline.analyse.neighbours import NEIGHBOURS_SCHEMA, LoadedIndex, load_index, nearest, neighbours_table
from pipeline.analyse.vectors import fingerprint_of, ok_batches
from pipeline.config import InputConfig, ModelConfig, SearchConfig, model_from_provenance
from pipeline.contract import FEATURE_MODEL_KEYS, provenance_differences
from pipeline.errors import ConfigError
from pipeline.io import redaction, storage
from pipeline.output.features import open_features

NEIGHBOURS_FILE = "neighbours.parquet"
ALL_QUERIES = "all"


# --- the query model ---------------------------------------------------------------------------------


def check_overrides(provenance: dict, overrides: dict, index_uri: str) -> None:
    """A `model.*` key that differs from what the index's features were extracted with is refused before any
    model loads, naming each difference."""
    derived = model_from_provenance(provenance)
    differences = []
    for key, value in overrides.items():
        if key in FEATURE_MODEL_KEYS and str(value) != str(getattr(derived, key)):  # the others: how it runs
            differences.append(f"model.{key}: {value!r} (query model) vs {getattr(derived, key)!r} (index)")
    if differences:
        raise_refusal(index_uri, differences)


def raise_refusal(index_uri: str, differences: list[str]) -> None:
    raise ConfigError(f"index.uri: {redaction.redact(index_uri)} was built from features extracted differently "
                      f"from the query model: {'; '.join(differences)}. Search with the index's own model (drop "
                      "these model.* keys), or build an index from features extracted this way")


def extract_images(uris: list[str], model_config: ModelConfig, index_provenance: dict, index_uri: str,
                   batch_size: int = 16) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(uris, features, {uri: reason} of the images that failed) for image queries, with the query model
    checked against the index's provenance once it is built."""
    from pipeline.extract.items import DecodeSettings, fetch_and_decode, image_decoder
    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(model_config, batch_size=batch_size)
    differences = provenance_differences(index_provenance, extractor.provenance, "index", "query model")
    if differences:
        raise_refusal(index_uri, differences)
    settings = DecodeSettings(input_storage_options={}, resize=model_config.resize,
                              draft_margin=model_config.draft_margin, content_hashes=False)  # a query needs pixels
    decode = image_decoder(extractor.input_size, settings)
    done, parts, failures = [], [], {}
    for start in range(0, len(uris), batch_size):
        items = [fetch_and_decode(uri, None, decode, settings) for uri in uris[start:start + batch_size]]
        good = [item for item in items if item.image.error is None]
        failures.update({item.uri: item.image.error for item in items if item.image.error is not None})
        if good:
            parts.append(extractor(np.stack([item.image.pixels for item in good])).features)
            done.extend(item.uri for item in good)
    dim = extractor.feature_dim
    return done, (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)), failures


# --- queries -------------------------------------------------------------------------------------------


def split_queries(queries: tuple[str, ...], index_uris: pa.Array) -> tuple[list[str], list[str]]:
    """(queries that are uris in the index, the rest: image files, folders, globs)."""
    present = pc.is_in(pa.array(list(queries), pa.string()), value_set=index_uris).to_pylist()
    indexed = [query for query, is_present in zip(queries, present) if is_present]
    return indexed, [query for query, is_present in zip(queries, present) if not is_present]


def indexed_vectors(loaded: LoadedIndex, uris: list[str], batch_rows: int) -> tuple[list[str], np.ndarray]:
    """The stored features of uris already in the index, read from the extract outputs it was built from."""
    sources = tuple(source["uri"] for source in loaded.document["sources"])
    feature_set = open_features(sources)
    found_uris, parts = [], []
    for batch_uris, matrix in ok_batches(feature_set, None, batch_rows, pa.array(uris, pa.string())):
        found_uris.extend(batch_uris.to_pylist())
        parts.append(matrix)
    return found_uris, (np.concatenate(parts) if parts else np.zeros((0, feature_set.feature_dim), np.float32))


def image_query_uris(queries: list[str]) -> list[str]:
    from pipeline.extract.listing import list_images

    return list_images(InputConfig(uri=tuple(queries))).column("uri").to_pylist() if queries else []


def search(config: SearchConfig) -> tuple[dict, pa.Table | None]:
    """Run (or find already done) a search; returns its `_SUCCESS` and the neighbours of the listed queries
    (None for `queries: all`, whose output may be large)."""
    knobs = config.search
    fingerprint = fingerprint_of({"index": config.index.uri, "queries": config.queries, "model": config.model,
                                  "k": knobs.k, "nprobe": knobs.nprobe, "ef_search": knobs.ef_search,
                                  "refine_factor": knobs.refine_factor,
                                  "index_fingerprint": analyse_output.read_finished(
                                      config.index.uri, config.index.storage_options, "index", "index.uri"
                                  ).get("fingerprint")})
    done = analyse_output.finished(config.output, fingerprint, "search")
    if done is not None:
        return {**done, "already_done": True}, None
    if config.queries == (ALL_QUERIES,):
        return search_all(config, fingerprint), None
    loaded = load_index(config.index.uri, config.index.storage_options, knobs.nprobe, knobs.ef_search,
                        knobs.refine_factor)
    check_overrides(loaded.provenance, config.model, config.index.uri)
    indexed, others = split_queries(config.queries, loaded.uris)
    query_uris, matrix = indexed_vectors(loaded, indexed, knobs.batch_rows)
    failures: dict[str, str] = {}
    image_uris = image_query_uris(others)
    if image_uris:
        model_config = model_from_provenance(loaded.provenance, config.model)
        extracted_uris, extracted, failures = extract_images(image_uris, model_config, loaded.provenance,
                                                             config.index.uri)
        query_uris, matrix = query_uris + extracted_uris, np.concatenate([matrix, extracted])
    tables = [neighbours_table(query_uris[start:start + knobs.batch_rows],
                               *nearest(loaded, matrix[start:start + knobs.batch_rows], knobs.k), loaded.uris)
              for start in range(0, len(query_uris), knobs.batch_rows)]
    table = pa.concat_tables(tables) if tables else NEIGHBOURS_SCHEMA.empty_table()
    with analyse_output.writing(config.output, "search") as started:
        with analyse_output.parquet_writer(storage.join(config.output.uri, NEIGHBOURS_FILE), NEIGHBOURS_SCHEMA,
                                           config.output.storage_options) as writer:
            writer.write_table(table)
        document = analyse_output.write_success(config.output, "search", fingerprint, [NEIGHBOURS_FILE], started,
                                                search_extras(loaded.document, config, len(query_uris),
                                                              table.num_rows, failures))
    return document, table


def search_extras(index_document: dict, config: SearchConfig, num_queries: int, num_rows: int,
                  failures: dict[str, str]) -> dict:
    return {"rows": {"total": num_rows, "queries": num_queries, "query_errors": len(failures)},
            "query_errors": failures, "k": config.search.k, "metric": index_document["metric"],
            "kind": index_document["kind"], "index": redaction.redact(config.index.uri),
            "provenance": index_document.get("provenance", {})}


def search_all(config: SearchConfig, fingerprint: str) -> dict:
    """Every item of the index against the index, on Ray actors that each load the index once."""
    from pipeline.analyse.knn_actors import neighbours_of_every_item

    index_document = analyse_output.read_finished(config.index.uri, config.index.storage_options, "index",
                                                  "index.uri")
    num_rows = num_queries = 0
    with analyse_output.writing(config.output, "search") as started:
        with analyse_output.parquet_writer(storage.join(config.output.uri, NEIGHBOURS_FILE), NEIGHBOURS_SCHEMA,
                                           config.output.storage_options) as writer:
            for table in neighbours_of_every_item(config, index_document):
                writer.write_table(table)
                num_rows += table.num_rows
                num_queries += len(pc.unique(table["query_uri"]))
        return analyse_output.write_success(config.output, "search", fingerprint, [NEIGHBOURS_FILE], started,
                                            search_extras(index_document, config, num_queries, num_rows, {}))


def print_neighbours(table: pa.Table, console, show: int) -> None:
    """The first `show` queries with their neighbours, as a terminal table."""
    from rich.table import Table

    if table is None or not show or not table.num_rows:
        return
    queries = pc.unique(table["query_uri"]).to_pylist()[:show]
    view = Table(title=f"nearest neighbours ({len(queries)} of {len(pc.unique(table['query_uri']))} queries)")
    for column in ("query", "rank", "neighbour", "score"):
        view.add_column(column, overflow="fold")
    shown = table.filter(pc.is_in(table["query_uri"], value_set=pa.array(queries, pa.string())))
    for row in shown.to_pylist():
        view.add_row(row["query_uri"] if row["rank"] == 1 else "", str(row["rank"]), row["uri"],
                     f"{row['score']:.4f}")
    console.print(view)
