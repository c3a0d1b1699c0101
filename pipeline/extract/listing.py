"""Input spec -> a stream of Arrow chunks of image references (uri, label), in a frozen order.

Sources: a directory (recursive), a glob, a single image file, or a manifest file (.csv, .parquet, .txt), or a
glob of manifest files (one manifest, its parts in name order), with a URI column (`input.uri_column`, default
`uri`; TXT: one URI a line) and optional label column; or a list of them. A directory or glob is sorted by uri;
a manifest keeps its own row order (it may be far too large to sort); sources follow in the order given.
Relative paths in a manifest are resolved against the manifest's own directory. Nothing here holds every path:
a directory is listed prefix by prefix, a manifest read chunk by chunk (`iterate_listing`); `list_images`
gathers a whole listing, each uri once, for the few uses that may cost memory per image.

Hidden files are skipped in directory and glob listings: a file whose name starts with '.' (`.thumbnail.jpg`,
macOS `._x.jpg` AppleDouble files), and every file below a directory whose name starts with '.'
(`.git/`, `.ipynb_checkpoints/`) or is `__MACOSX/` (where macOS archives put their `._` files). Only the
path below the listed directory, or below a glob's fixed directory, counts: `/home/u/.cache/images/` lists
its images. A glob that names a hidden component itself (`*/.thumbs/*.jpg`, `.*.jpg`) lists everything it
matches, and an image file or manifest entry named explicitly is always kept.

Archives (`.tar`, `.tar.gz`, `.tgz`, `.zip`; one, a glob, or a brace range) give one row per image member, in
the archive's stream order; pipeline/extract/archives.py says how they are read. Braces (`{00000..00099}`,
`{a,b}`) expand in any input uri before anything else.

A listing with no image at all is a ConfigError (exit 2) that says where it looked and what to check.
"""

from __future__ import annotations

import collections
import functools
import io
import itertools
import posixpath
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.errors import ConfigError
from pipeline.extract import archives
from pipeline.io import faults, redaction, storage

MANIFEST_SUFFIXES = (".csv", ".parquet", ".txt")
MANIFEST_BATCH_ROWS = 65_536  # rows a manifest chunk holds (a few MB of URIs)
MANIFEST_SNIFF_BYTES = 4096
LISTING_THREADS = 8  # top-level prefixes listed at once (object stores answer list requests in parallel)
LISTING_CHUNK = 65_536  # paths gathered before they are filtered, sorted and handed on
LISTING_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("label", pa.string())])
# A path component (below the listed root) that starts with '.', or a `__MACOSX` directory: the same text
# works as an Arrow (RE2) and a Python regular expression.
HIDDEN_COMPONENT = r"(?:^|/)(?:\.|__MACOSX/)"
# What a source is, decided once per source (it also picks the wording when nothing is found).
MANIFEST, IMAGE_FILE, FILE_TREE, ARCHIVES = "a manifest", "an image file", "a directory or glob", "an archive"


def list_images(input_config: InputConfig) -> pa.Table:
    """The whole listing as one table, each uri once (append's anti-join, the resume hint, compare): memory per
    image. A run freezes its listing from `iterate_listing` instead, part by part (pipeline/extract/parts.py)."""
    chunks = list(iterate_listing(input_config))
    return drop_repeated_uris(pa.concat_tables(chunks) if chunks else LISTING_SCHEMA.empty_table())


def iterate_listing(input_config: InputConfig, progress: Callable[[int], None] | None = None) -> Iterator[pa.Table]:
    """The frozen order of every image to process, chunk by chunk (never one list of every path); `progress` gets
    the number listed so far after each chunk. ConfigError when there is no image at all."""
    sources = [expanded for uri in input_config.uri for expanded in archives.expand_braces(uri)]
    kinds: list[str] = []
    num_listed = 0
    for uri in sources:
        for chunk in list_source(uri, input_config, kinds):
            num_listed += chunk.num_rows
            if chunk.num_rows:
                yield chunk
            if progress is not None:
                progress(num_listed)
    if num_listed == 0:
        raise no_images_error(input_config, sources, kinds)


def list_source(uri: str, input_config: InputConfig, kinds: list[str]) -> Iterator[pa.Table]:
    """One source's listing (its kind appended to `kinds`); a missing bucket, a missing manifest or refused
    credentials stop the job here with a StorageError (exit 2) that says which, without secrets."""
    try:
        kind = source_kind(uri, input_config.storage_options)
        kinds.append(kind)
        yield from list_one_source(uri, kind, input_config)
    except Exception as error:  # noqa: BLE001 - storage failures get a clear message, the rest goes on up
        if not faults.is_storage_failure(error):
            raise
        raise faults.access_error("input.uri", uri, "read", error) from None


def source_kind(uri: str, options: dict) -> str:
    if archives.archive_format(uri):  # one archive or a glob of them: asked no more questions (10 000 shards)
        return ARCHIVES
    if uri.lower().endswith(MANIFEST_SUFFIXES) and (storage.is_glob(uri) or not storage.is_directory(uri, options)):
        return MANIFEST  # one manifest file, or a glob of its parts
    if storage.is_glob(uri) or storage.is_directory(uri, options):
        return FILE_TREE
    if storage.is_file(uri, options):
        return IMAGE_FILE
    problem = storage.missing_bucket(uri, options)
    raise ConfigError(f"input.uri: {redaction.redact(uri)} is neither a directory, a glob, an image file, nor a "
                      f"manifest ({', '.join(MANIFEST_SUFFIXES)})" + (f": {problem}" if problem else "")
                      + "; check the path and input.storage_options")


def list_one_source(uri: str, kind: str, input_config: InputConfig) -> Iterator[pa.Table]:
    if kind == MANIFEST:
        parts = sorted(storage.find_files(uri, input_config.storage_options)) if storage.is_glob(uri) else [uri]
        for part in parts:  # a glob of manifest parts (img2dataset's, LAION's) is one manifest, in name order
            yield from read_manifest(part, input_config)
        return
    reads_members = archives.label_sidecar_extension(input_config.labels) is not None
    if reads_members and kind != ARCHIVES:
        raise ConfigError(f"input.labels: {input_config.labels!r} reads labels from archive members, but "
                          f"{redaction.redact(uri)} is {kind}; use input.labels: from_dirs or none, or point "
                          "input.uri at .tar/.zip archives")
    if kind == ARCHIVES:
        yield from list_archives(uri, input_config)
        return
    if input_config.labels not in ("from_dirs", "none"):
        raise ConfigError(f"input.labels: {input_config.labels!r} names a manifest column, but "
                          f"{redaction.redact(uri)} is {kind}; use input.labels: from_dirs or none")
    chunks = [list_image_file(uri, input_config)] if kind == IMAGE_FILE else list_file_tree(uri, input_config)
    for uris in chunks:
        labels = (parent_directory_names(uris) if input_config.labels == "from_dirs"
                  else pa.nulls(len(uris), pa.string()))
        yield pa.table({"uri": uris, "label": labels})


def list_archives(uri: str, input_config: InputConfig) -> Iterator[pa.Table]:
    """The member rows of one archive or of every archive a glob matches (in name order), each streamed once."""
    if input_config.labels not in ("from_dirs", "none") and archives.label_sidecar_extension(
            input_config.labels) is None:
        raise ConfigError(f"input.labels: {input_config.labels!r} names a manifest column, but "
                          f"{redaction.redact(uri)} is {ARCHIVES}; use input.labels: member:EXT (e.g. member:cls), "
                          "json:FIELD, from_dirs or none")
    options = input_config.storage_options
    found = sorted(storage.find_files(uri, options)) if storage.is_glob(uri) else [uri]
    for archive_uri in found:
        listing = archives.list_archive(archive_uri, input_config.extensions, input_config.labels, options)
        yield pa.table({"uri": pa.array(listing.uris, pa.string()), "label": pa.array(listing.labels, pa.string())})


def list_image_file(uri: str, input_config: InputConfig) -> pa.Array:
    """The one image a file names; a file of another kind is refused, saying what would be accepted."""
    if has_image_extension(pa.array([uri], pa.string()), input_config.extensions)[0].as_py():
        return pa.array([uri], pa.string())
    extension = posixpath.splitext(posixpath.basename(uri))[1]
    found = f"the extension {extension!r}" if extension else "no extension"
    allowed = ", ".join(normalised_extensions(input_config.extensions))
    raise ConfigError(f"input.uri: {redaction.redact(uri)} is a file with {found}, which is neither an image "
                      f"extension in input.extensions ({allowed}) nor a manifest suffix "
                      f"({', '.join(MANIFEST_SUFFIXES)}); point input.uri at an image, a manifest or a directory"
                      + (f", or add {extension.lstrip('.').lower()!r} to input.extensions" if extension else ""))


def list_file_tree(uri: str, input_config: InputConfig) -> Iterator[pa.Array]:
    """Every image below a directory or matching a glob, in sorted order, hidden files left out. A directory is
    listed one top-level prefix at a time, LISTING_THREADS prefixes at once, and handed on prefix by prefix in the
    order a sort of every path would give; a glob is one listing."""
    options = input_config.storage_options
    keep_hidden = glob_names_hidden_component(uri)
    root = storage.listing_root(uri, options)

    def images_of(found: list[str]) -> pa.Array:
        found = pa.array(found, pa.string())
        images = found.filter(has_image_extension(found, input_config.extensions))
        if not keep_hidden:
            images = images.filter(pc.invert(is_hidden_below(images, root)))
        return images.take(pc.sort_indices(images))

    if storage.is_glob(uri):
        yield images_of(storage.find_files(uri, options))
        return
    entries = [(found, is_directory) for found, is_directory in storage.list_entries(uri, options)
               if len(found) >= len(root)  # some stores list the prefix's own marker object
               and not re.search(HIDDEN_COMPONENT, found[len(root) - 1:] + ("/" if is_directory else ""))]
    # A prefix's paths all start with `name/`: sorted by that key, prefixes and files interleave as in a full sort.
    entries.sort(key=lambda entry: entry[0] + "/" if entry[1] else entry[0])

    def listed(entry: tuple[str, bool]) -> list[str]:
        found, is_directory = entry
        return storage.find_files(found, options) if is_directory else [found]

    with ThreadPoolExecutor(LISTING_THREADS, thread_name_prefix="listing") as pool:
        pending: collections.deque = collections.deque()
        batch: list[str] = []
        for entry in entries:
            pending.append(pool.submit(listed, entry))
            while len(pending) > LISTING_THREADS or (pending and pending[0].done()):
                batch.extend(pending.popleft().result())
                if len(batch) >= LISTING_CHUNK:
                    yield images_of(batch)
                    batch = []
        for future in pending:
            batch.extend(future.result())
        if batch:
            yield images_of(batch)


def normalised_extensions(extensions: tuple[str, ...]) -> list[str]:
    return [extension.lower().lstrip(".") for extension in extensions]


def has_image_extension(uris: pa.Array, extensions: tuple[str, ...]) -> pa.Array:
    matches = (pc.ends_with(uris, "." + extension, ignore_case=True) for extension in normalised_extensions(extensions))
    return functools.reduce(pc.or_, matches, pa.repeat(False, len(uris)))


def is_hidden_below(uris: pa.Array, root: str) -> pa.Array:
    """True where the path below `root` (a prefix of every uri) has a hidden component."""
    below_root = pc.utf8_slice_codeunits(uris, start=len(root))  # counts code points, as len() does
    return pc.match_substring_regex(below_root, HIDDEN_COMPONENT)


def glob_names_hidden_component(uri: str) -> bool:
    """A glob such as `*/.thumbs/*.jpg` asks for hidden files itself."""
    return storage.is_glob(uri) and re.search(HIDDEN_COMPONENT, storage.split_glob(uri)[1]) is not None


def parent_directory_names(uris: pa.Array) -> pa.Array:
    """The name of each uri's directory (`s3://b/cats/x.jpg` -> `cats`), as posixpath would give it."""
    parents = pc.extract_regex(uris, r"(?P<parent>[^/]*)/+[^/]*$").field("parent")
    return pc.fill_null(parents, "")


def no_images_error(input_config: InputConfig, sources: list[str], kinds: list[str]) -> ConfigError:
    """Nothing to process: say where we looked and what to check, instead of an empty job."""
    manifests = [uri for uri, kind in zip(sources, kinds) if kind == MANIFEST]
    trees = [uri for uri, kind in zip(sources, kinds) if kind != MANIFEST]
    problems = []
    if trees:
        extensions = ", ".join(normalised_extensions(input_config.extensions))
        problems.append(f"no images under {', '.join(redaction.redact(uri) for uri in trees)} with extensions "
                        f"{extensions} (hidden files are skipped); check the path, input.extensions and "
                        f"input.storage_options")
    if manifests:
        problems.append(f"the manifest {', '.join(redaction.redact(uri) for uri in manifests)} is empty (no rows); "
                        f"add the images' URIs to it, or point input.uri at the images' directory")
    return ConfigError("input.uri: " + "; ".join(problems))


def read_manifest(uri: str, input_config: InputConfig) -> Iterator[pa.Table]:
    """A manifest file as a stream of (uri, label) chunks in its own row order: Parquet by record batches, CSV by
    blocks, TXT by lines, so its size does not matter. Relative paths are taken from the manifest's directory."""
    options = input_config.storage_options
    lower = uri.lower()
    with storage.open_input(uri, options) as handle:
        if lower.endswith(".parquet"):
            parquet = pq.ParquetFile(handle)
            columns = manifest_columns(parquet.schema_arrow.names, uri, input_config)
            chunks = (pa.Table.from_batches([batch]) for batch in
                      parquet.iter_batches(batch_size=MANIFEST_BATCH_ROWS, columns=columns))
        elif lower.endswith(".csv"):
            chunks = read_csv_chunks(handle, uri, input_config)
        else:
            chunks = read_text_chunks(handle)
        column = "uri" if lower.endswith(".txt") else input_config.uri_column
        for chunk in chunks:
            uris = resolve_relative(chunk.column(column).cast(pa.string()), uri)
            yield pa.table({"uri": uris, "label": manifest_labels(chunk, uri, input_config.labels, uris)})


def manifest_columns(names: list[str], uri: str, input_config: InputConfig) -> list[str]:
    """The columns to read, checked before the first row: the URI column and a label column."""
    column = input_config.uri_column
    if column not in names:
        hint = " (img2dataset and LAION parts call it 'url')" if "url" in names else ""
        raise ConfigError(f"input.uri_column: manifest {redaction.redact(uri)} has no {column!r} column (columns: "
                          f"{', '.join(names)}); set input.uri_column to the column holding the image URIs{hint}")
    labels = input_config.labels
    if labels not in ("none", "from_dirs") and labels not in names:
        raise ConfigError(f"input.labels: column {labels!r} is not in manifest {redaction.redact(uri)} "
                          f"(columns: {', '.join(names)}); allowed: none, from_dirs, or a column name")
    return [column] + ([labels] if labels in names and labels != column else [])


def read_csv_chunks(handle, uri: str, input_config: InputConfig) -> Iterator[pa.Table]:
    head = handle.read(MANIFEST_SNIFF_BYTES)
    if not head.strip():  # a zero-byte (or blank) CSV is an empty manifest, not a parse error
        return
    handle.seek(0)
    reader = pa_csv.open_csv(handle, convert_options=pa_csv.ConvertOptions(
        column_types={input_config.uri_column: pa.string()}, strings_can_be_null=False))
    manifest_columns(reader.schema.names, uri, input_config)
    for batch in reader:
        yield pa.Table.from_batches([batch])


def read_text_chunks(handle) -> Iterator[pa.Table]:
    """One URI a line; blank lines and `#` comments skipped."""
    lines = (line.strip() for line in io.TextIOWrapper(handle, encoding="utf-8"))
    kept = (line for line in lines if line and not line.startswith("#"))
    while chunk := list(itertools.islice(kept, MANIFEST_BATCH_ROWS)):
        yield pa.table({"uri": pa.array(chunk, pa.string())})


def manifest_labels(table: pa.Table, manifest_uri: str, labels: str, uris: pa.Array) -> pa.Array:
    if labels == "none":
        return pa.nulls(len(uris), pa.string())
    if labels == "from_dirs":
        return parent_directory_names(uris)
    if labels not in table.column_names:
        raise ConfigError(f"input.labels: column {labels!r} is not in manifest {redaction.redact(manifest_uri)} "
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
