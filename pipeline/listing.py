"""Input spec -> a sorted Arrow table of image references (uri, label).

Sources: a directory (recursive), a glob, or a manifest file (.csv, .parquet, .txt) with a `uri` column
(TXT: one URI a line) and optional label column; or a list of them. Each source is sorted by uri and the
sources are concatenated in the order given; a uri listed twice is kept once (the first time). Relative
paths in a manifest are resolved against the manifest's own directory. The listing stays an Arrow table
(a few dozen bytes per image), never a list of Python objects per image.
"""

from __future__ import annotations

import io
import posixpath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError, InputConfig

MANIFEST_SUFFIXES = (".csv", ".parquet", ".txt")
LISTING_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("label", pa.string())])


def list_images(input_config: InputConfig) -> pa.Table:
    """The frozen order of every image to process."""
    tables = [list_source(uri, input_config) for uri in input_config.uri]
    listing = pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()
    return drop_repeated_uris(listing)


def list_source(uri: str, input_config: InputConfig) -> pa.Table:
    """One source's listing; a missing bucket, a missing manifest or refused credentials stop the job here
    with a StorageError (exit 2) that says which, without secrets."""
    try:
        return list_one_source(uri, input_config)
    except Exception as error:  # noqa: BLE001 - storage failures get a clear message, the rest goes on up
        if not storage.is_storage_failure(error):
            raise
        raise storage.access_error("input.uri", uri, "read", error) from None


def list_one_source(uri: str, input_config: InputConfig) -> pa.Table:
    options = input_config.storage_options
    if uri.lower().endswith(MANIFEST_SUFFIXES) and not storage.is_directory(uri, options):
        return read_manifest(uri, input_config)
    if not storage.is_glob(uri) and not storage.is_directory(uri, options):
        problem = storage.missing_bucket(uri, options)
        raise ConfigError(f"input.uri: {storage.redact(uri)} is neither a directory, a glob, nor a manifest "
                          f"({', '.join(MANIFEST_SUFFIXES)})" + (f": {problem}" if problem else "")
                          + "; check the path and input.storage_options")
    allowed = tuple("." + extension.lower().lstrip(".") for extension in input_config.extensions)
    uris = sorted(found for found in storage.find_files(uri, options) if found.lower().endswith(allowed))
    if input_config.labels == "from_dirs":
        labels = [posixpath.basename(posixpath.dirname(found)) for found in uris]
    elif input_config.labels == "none":
        labels = [None] * len(uris)
    else:
        raise ConfigError(f"input.labels: {input_config.labels!r} names a manifest column, but "
                          f"{storage.redact(uri)} is a directory or glob; use input.labels: from_dirs or none")
    return pa.table({"uri": pa.array(uris, pa.string()), "label": pa.array(labels, pa.string())})


def read_manifest(uri: str, input_config: InputConfig) -> pa.Table:
    data = storage.read_bytes(uri, input_config.storage_options)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
    elif lower.endswith(".csv"):
        table = pa_csv.read_csv(io.BytesIO(data), convert_options=pa_csv.ConvertOptions(
            column_types={"uri": pa.string()}, strings_can_be_null=False))
    else:
        lines = [line.strip() for line in data.decode("utf-8").splitlines()]
        table = pa.table({"uri": pa.array([line for line in lines if line and not line.startswith("#")],
                                          pa.string())})
    if "uri" not in table.column_names:
        raise ConfigError(f"input.uri: manifest {storage.redact(uri)} has no 'uri' column "
                          f"(columns: {', '.join(table.column_names)})")
    uris = resolve_relative(table.column("uri").cast(pa.string()), uri)
    labels = manifest_labels(table, uri, input_config.labels, uris)
    return pa.table({"uri": uris, "label": labels}).sort_by("uri")


def manifest_labels(table: pa.Table, manifest_uri: str, labels: str, uris: pa.Array) -> pa.Array:
    if labels == "none":
        return pa.nulls(len(uris), pa.string())
    if labels == "from_dirs":
        return pa.array([posixpath.basename(posixpath.dirname(uri)) for uri in uris.to_pylist()], pa.string())
    if labels not in table.column_names:
        raise ConfigError(f"input.labels: column {labels!r} is not in manifest {storage.redact(manifest_uri)} "
                          f"(columns: {', '.join(table.column_names)}); allowed: none, from_dirs, or a column name")
    return table.column(labels).cast(pa.string()).combine_chunks()


def resolve_relative(uris: pa.ChunkedArray, manifest_uri: str) -> pa.Array:
    """Make manifest entries absolute: a relative path is taken from the manifest's directory."""
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    is_absolute = pc.or_(pc.starts_with(uris, "/"), pc.match_substring(uris, "://"))
    resolved = pc.binary_join_element_wise(pa.scalar(base), uris, "/")
    return pc.if_else(is_absolute, uris, resolved).combine_chunks()


def drop_repeated_uris(listing: pa.Table) -> pa.Table:
    """Keep the first row of each uri (the same file named by two sources is one image)."""
    if listing.num_rows == 0:
        return listing
    indices = pa.array(range(listing.num_rows), pa.int64())
    first = (pa.table({"uri": listing.column("uri"), "index": indices})
             .group_by("uri", use_threads=False).aggregate([("index", "min")]).column("index_min"))
    return listing.take(pc.take(first, pc.sort_indices(first)))  # the kept rows, in their original order
