"""`featurize dedup`: duplicate groups as connected components of verified pairs.

Exact copies first: rows with the same `sha256` (the same bytes) are joined with similarity 1.0. Then the kNN over
features proposes candidate pairs at cosine >= `dedup.threshold` (permissive), and with `dedup.verify: phash` a
candidate is kept only where the perceptual hashes are at most `dedup.max_hamming` bits apart (verify.py says why).
Groups are the components of the kept pairs only. Outputs without the hash columns fall back to cosine alone
(today's `verify: none`), with one warning.

Output (paths relative to output.uri): `groups.parquet` with every ok input row once: `uri`, `group` (int64;
a singleton is its own group), `similarity` (float32 cosine to the group's representative, 1.0 for it), `keep`
(true for exactly one representative per group: the member with the most duplicate edges, ties to the earliest
row), `reason` (`exact`: the representative's bytes; `near`: another image verified close; null for the
representative and singletons), `hamming` (int32 phash bits to the representative; null without hashes), then
`_SUCCESS` (stage "dedup", counts). The features are streamed from the Parquet files; the kNN index is chosen as
`featurize index` chooses (index.kind, index.memory_budget).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow as pa

from pipeline.analyse import output as analyse_output
from pipeline.analyse.index import build_faiss, choose_index
from pipeline.analyse.neighbours import set_search_knobs
from pipeline.analyse.vectors import as_metric_space, fingerprint_of, num_ok_rows, ok_batches, sources_document
from pipeline.analyse.verify import RowHashes, exact_pairs, hamming, read_hashes, verified
from pipeline.config import COSINE_ONLY_THRESHOLD, VERIFIED_THRESHOLD, DedupConfig, DedupOptions, memory_bytes
from pipeline.io import storage
from pipeline.output.features import open_features

GROUPS_FILE = "groups.parquet"
GROUPS_SCHEMA = pa.schema([pa.field("uri", pa.string(), nullable=False),
                           pa.field("group", pa.int64(), nullable=False),
                           pa.field("similarity", pa.float32(), nullable=False),
                           pa.field("keep", pa.bool_(), nullable=False),
                           pa.field("reason", pa.string()),
                           pa.field("hamming", pa.int32())])
IVF_NPROBE = 64
HNSW_EF_SEARCH = 128


def near_duplicate_edges(index, batches, neighbours: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(row, neighbour row) pairs with cosine >= threshold, each row's `neighbours` nearest looked at."""
    rows, columns = [], []
    start = 0
    for _, matrix in batches:
        scores, ids = index.search(as_metric_space(matrix, "cosine"), min(neighbours + 1, index.ntotal))
        own = np.arange(start, start + len(matrix))[:, None]
        close = (scores >= threshold) & (ids >= 0) & (ids != own)
        rows.append(np.broadcast_to(own, ids.shape)[close])
        columns.append(ids[close])
        start += len(matrix)
    return (np.concatenate(rows) if rows else np.zeros(0, np.int64),
            np.concatenate(columns) if columns else np.zeros(0, np.int64))


def components(num_rows: int, rows: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group of each row, representative row of each group): connected components of the edge graph; the
    representative has the most edges (ties: the earliest row)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(rows), np.int8), (rows, columns)), shape=(num_rows, num_rows))
    _, groups = connected_components(graph, directed=False)
    degree = np.bincount(np.concatenate([rows, columns]), minlength=num_rows)
    order = np.lexsort((np.arange(num_rows), -degree, groups))  # by group, most edges first, then earliest
    first_of_group = np.r_[True, groups[order][1:] != groups[order][:-1]]
    representatives = np.empty(groups.max() + 1, np.int64)
    representatives[groups[order][first_of_group]] = order[first_of_group]
    return groups.astype(np.int64), representatives


# Near-duplicates come in small groups. A group holding a large share of the collection means the threshold joins
# different images on these features: pooled CNN features of one narrow domain (small scans, one product shot)
# all sit close together, and connected components chain through them.
CHAINED_GROUP_SHARE, CHAINED_GROUP_MIN = 0.05, 10


def chaining_warning(counts: dict, threshold: float) -> str | None:
    """One line for the terminal when the largest group is too large to be near-duplicates; None otherwise."""
    largest, num_rows = counts.get("largest_group", 0), counts["rows"]
    if largest < CHAINED_GROUP_MIN or largest <= CHAINED_GROUP_SHARE * num_rows:
        return None
    return (f"warning: one group holds {largest} of {num_rows} images ({largest / num_rows:.0%}); near-duplicates "
            f"rarely do, so dedup.threshold {threshold} likely joins different images on these features. Look at "
            "it with `featurize report OUTPUT` and raise dedup.threshold (docs/analyse.md)")


def fallback_warning(num_missing: int, num_rows: int, threshold: float) -> str:
    return (f"warning: {num_missing} of {num_rows} images have no sha256/phash (an output written before them, or "
            f"with output.content_hashes: false), so dedup compares cosine alone at {threshold}: "
            "crops of one photo may join its group. Extract again (output.mode: overwrite) to verify with the "
            "hashes, or set dedup.verify: none to say so")


def effective_threshold(options: DedupOptions, verify: str) -> float:
    if options.threshold is not None:
        return options.threshold
    return VERIFIED_THRESHOLD if verify == "phash" else COSINE_ONLY_THRESHOLD


def duplicate_pairs(index, batches, options: DedupOptions, hashes: RowHashes | None, verify: str, threshold: float,
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(rows, columns, counts): exact pairs by sha256, then the kNN candidates that pass verification."""
    rows, columns = near_duplicate_edges(index, batches, options.neighbours, threshold)
    counts = {"candidates": int(len(rows))}
    if verify == "phash":
        kept = verified(hashes, rows, columns, options.max_hamming)
        counts["rejected"] = int((~kept).sum())
        rows, columns = rows[kept], columns[kept]
    if hashes is not None:
        exact_rows, exact_columns = exact_pairs(hashes.bytes_code)
        counts["exact_pairs"] = int(len(exact_rows))
        rows, columns = np.concatenate([exact_rows, rows]), np.concatenate([exact_columns, columns])
    return rows, columns, counts


def dedup(config: DedupConfig, say=print) -> dict:
    """Write (or find already written) the duplicate groups; returns the `_SUCCESS` document. `say` gets the
    fallback warning."""
    options, out, read_options = config.dedup, config.output, config.features.storage_options
    feature_set = open_features(config.features.uri, read_options)
    num_rows = num_ok_rows(feature_set, read_options)
    plan = choose_index(num_rows, feature_set.feature_dim, memory_bytes(config.index.memory_budget),
                        config.index.kind, config.index.train_sample)
    fingerprint = fingerprint_of({"sources": sources_document(feature_set, read_options), "files": feature_set.files,
                                  "dedup": asdict(options), "plan": asdict(plan)})
    done = analyse_output.finished(out, fingerprint, "dedup")
    if done is not None:
        return {**done, "already_done": True}

    def batches():
        return ok_batches(feature_set, read_options, options.batch_rows)

    hashes, num_missing = read_hashes(feature_set, read_options, options.batch_rows)
    verify = options.verify if hashes is not None else "none"
    threshold = effective_threshold(options, verify)
    if options.verify == "phash" and hashes is None:
        say(fallback_warning(num_missing, num_rows, threshold))
    index = build_faiss(plan, config.index, batches)
    set_search_knobs(index, plan.kind, IVF_NPROBE, HNSW_EF_SEARCH)
    rows, columns, pair_counts = duplicate_pairs(index, batches(), options, hashes, verify, threshold)
    del index
    groups, representatives = components(num_rows, rows, columns)
    group_sizes = np.bincount(groups)
    with analyse_output.writing(out, "dedup") as started:
        with analyse_output.parquet_writer(storage.join(out.uri, GROUPS_FILE), GROUPS_SCHEMA,
                                           out.storage_options) as writer:
            representative_vectors = gather_rows(batches(), representatives[group_sizes > 1])
            start = 0
            for uris, matrix in batches():
                row_ids = np.arange(start, start + len(matrix))
                writer.write_table(groups_table(uris, as_metric_space(matrix, "cosine"), row_ids, groups,
                                                representatives, group_sizes, representative_vectors, hashes))
                start += len(matrix)
        counts = {"rows": num_rows, "groups": int(len(group_sizes)),
                  "groups_with_duplicates": int((group_sizes > 1).sum()),
                  "duplicates": int(num_rows - len(group_sizes)), "edges": int(len(rows)),
                  "largest_group": int(group_sizes.max()) if len(group_sizes) else 0, **pair_counts}
        extras = {"rows": {"total": feature_set.num_rows, "ok": num_rows, "error": feature_set.num_rows - num_rows},
                  "counts": counts, "threshold": threshold, "verify": verify, "kind": plan.kind,
                  **({"max_hamming": options.max_hamming} if verify == "phash" else {}),
                  "provenance": feature_set.provenance}
        return analyse_output.write_success(out, "dedup", fingerprint, [GROUPS_FILE], started, extras)


def gather_rows(batches, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """{row id: normalised vector} of the wanted rows (the representatives of groups with duplicates)."""
    wanted = np.sort(wanted)
    found, start = {}, 0
    for _, matrix in batches:
        inside = wanted[(wanted >= start) & (wanted < start + len(matrix))]
        normalised = as_metric_space(matrix[inside - start], "cosine")
        found.update(zip(inside.tolist(), normalised))
        start += len(matrix)
    return found


def groups_table(uris: pa.Array, normalised: np.ndarray, row_ids: np.ndarray, groups: np.ndarray,
                 representatives: np.ndarray, group_sizes: np.ndarray,
                 representative_vectors: dict[int, np.ndarray], hashes: RowHashes | None) -> pa.Table:
    group = groups[row_ids]
    representative = representatives[group]
    similarity = np.ones(len(row_ids), np.float32)
    for position in np.nonzero(group_sizes[group] > 1)[0]:
        similarity[position] = float(normalised[position] @ representative_vectors[int(representative[position])])
    is_representative = representative == row_ids
    similarity[is_representative] = 1.0
    member = ~is_representative
    if hashes is None:
        exact, bits = np.zeros(len(row_ids), bool), pa.nulls(len(row_ids), pa.int32())
    else:
        exact = hashes.bytes_code[row_ids] == hashes.bytes_code[representative]
        bits = pa.array(hamming(hashes.phash[row_ids], hashes.phash[representative]))
    similarity[exact] = 1.0  # the same bytes: the same features
    reason = pa.array(np.where(exact, "exact", "near"), pa.string(), mask=~member)  # null for the representative
    return pa.Table.from_arrays([uris.cast(pa.string()), pa.array(group), pa.array(similarity),
                                 pa.array(is_representative), reason, bits], schema=GROUPS_SCHEMA)
