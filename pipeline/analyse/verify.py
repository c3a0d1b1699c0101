"""What makes a near-duplicate candidate a duplicate: the rows' content hashes, read beside their features.

Exact copies share `sha256` (the same bytes under another name); a candidate pair from the feature kNN is kept only
where the perceptual hashes (`phash`, 64 bits) differ in at most `dedup.max_hamming` bits. Pooled CNN features put
the crops of one self-similar photo (the moon's quadrants) as close as a photo and its 5% crop; their phashes are
far apart (docs/analyse.md has the figures). Outputs written before the hash columns, or with
`output.content_hashes: false`, have none: dedup falls back to cosine alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.output.features import FeatureSet, parquet_file

HASH_COLUMNS = ("sha256", "phash")


@dataclass(frozen=True)
class RowHashes:
    """The content hashes of the ok rows, in the row order of `ok_batches`."""

    bytes_code: np.ndarray  # int64: rows with equal sha256 share a code
    phash: np.ndarray  # uint64


def read_hashes(feature_set: FeatureSet, storage_options: dict | None, batch_rows: int,
                ) -> tuple[RowHashes | None, int]:
    """(the hashes of every ok row, 0), or (None, how many ok rows lack them) when any does."""
    sha256, phash, missing = [], [], 0
    for file_uri in feature_set.files:
        with parquet_file(file_uri, storage_options) as parquet:
            present = set(HASH_COLUMNS) <= set(parquet.schema_arrow.names)
            columns = ["status", *HASH_COLUMNS] if present else ["status"]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                batch = batch.filter(pc.equal(batch.column("status"), "ok"))
                if not present:
                    missing += batch.num_rows
                    continue
                missing += max(batch.column("sha256").null_count, batch.column("phash").null_count)
                sha256.append(batch.column("sha256"))
                phash.append(batch.column("phash"))
    if missing:
        return None, missing
    codes = pa.chunked_array(sha256, pa.string()).combine_chunks().dictionary_encode().indices
    values = np.array([int(text, 16) for array in phash for text in array.to_pylist()], dtype=np.uint64)
    return RowHashes(codes.to_numpy().astype(np.int64), values), 0


def exact_pairs(bytes_code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, the first row with the same bytes) for every row whose bytes an earlier row already has."""
    order = np.argsort(bytes_code, kind="stable")
    ordered = bytes_code[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]] if len(order) else np.zeros(0, bool)
    leader = order[first][np.cumsum(first) - 1]
    return order[~first], leader[~first]


def hamming(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Bits that differ between two arrays of 64-bit hashes."""
    differing = np.bitwise_xor(left.astype(np.uint64), right.astype(np.uint64))
    return np.unpackbits(differing.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).astype(np.int32)


def verified(hashes: RowHashes, rows: np.ndarray, columns: np.ndarray, max_hamming: int) -> np.ndarray:
    """Which candidate pairs are duplicates: the same bytes, or phashes at most `max_hamming` bits apart."""
    same_bytes = hashes.bytes_code[rows] == hashes.bytes_code[columns]
    return same_bytes | (hamming(hashes.phash[rows], hashes.phash[columns]) <= max_hamming)
