"""Input spec -> a sorted Arrow table of image references (uri, label).

Sources: a directory (recursive), a glob, a single image file, or a manifest file (.csv, .parquet, .txt) with
a `uri` column (TXT: one URI a line) and optional label column; or a list of them. Each source is sorted by
uri and the sources are concatenated in the order given; a uri listed twice is kept once (the first time).
Relative paths in a manifest are resolved against the manifest's own directory. The listing stays an Arrow
table (a few dozen bytes per image), never a list of Python objects per image.

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

import functools
import io
import posixpath
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.errors import ConfigError
from pipeline.extract import archives
from pipeline.io import faults, redaction, storage

MANIFEST_SUFFIXES = (".csv", ".parquet", ".txt")
LISTING_SCHEMA = pa.schema([pa.field("uri", pa.string()), pa.field("label", pa.string())])
# A path component (below the listed root) that starts with '.', or a `__MACOSX` directory: the same text
# works as an Arrow (RE2) and a Python regular expression.
HIDDEN_COMPONENT = r"(?:^|/)(?:\.|__MACOSX/)"
# What a source is, decided once per source (it also picks the wording when nothing is found).
MANIFEST, IMAGE_FILE, FILE_TREE, ARCHIVES = "a manifest", "an image file", "a directory or glob", "an archive"


def list_images(input_config: InputConfig) -> pa.Table:
    """The frozen order of every image to process; ConfigError when there is none."""
    sources = [expanded for uri in input_config.uri for expanded in archives.expand_braces(uri)]
    kinds_and_tables = [list_source(uri, input_config) for uri in sources]
    tables = [table for _, table in kinds_and_tables]
    listing = drop_repeated_uris(pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table())
    if listing.num_rows == 0:
        kinds = [kind for kind, _ in kinds_and_tables]
        raise no_images_error(input_config, sources, kinds)
    return listing


def list_source(uri: str, input_config: InputConfig) -> tuple[str, pa.Table]:
    """One source's kind and listing; a missing bucket, a missing manifest or refused credentials stop the
    job here with a StorageError (exit 2) that says which, without secrets."""
    try:
        kind = source_kind(uri, input_config.storage_options)
        return kind, list_one_source(uri, kind, input_config)
    except Exception as error:  # noqa: BLE001 - storage failures get a clear message, the rest goes on up
        if not faults.is_storage_failure(error):
            raise
        raise faults.access_error("input.uri", uri, "read", error) from None


def source_kind(uri: str, options: dict) -> str:
    if archives.archive_format(uri):  # one archive or a glob of them: asked no more questions (10 000 shards)
        return ARCHIVES
    if uri.lower().endswith(MANIFEST_SUFFIXES) and not storage.is_directory(uri, options):
        return MANIFEST
    if storage.is_glob(uri) or storage.is_directory(uri, options):
        return FILE_TREE
    if storage.is_file(uri, options):
        return IMAGE_FILE
    problem = storage.missing_bucket(uri, options)
    raise ConfigError(f"input.uri: {redaction.redact(uri)} is neither a directory, a glob, an image file, nor a "
                      f"manifest ({', '.join(MANIFEST_SUFFIXES)})" + (f": {problem}" if problem else "")
                      + "; check the path and input.storage_options")


def list_one_source(uri: str, kind: str, input_config: InputConfig) -> pa.Table:
    if kind == MANIFEST:
        return read_manifest(uri, input_config)
    reads_members = archives.label_sidecar_extension(input_config.labels) is not None
    if reads_members and kind != ARCHIVES:
        raise ConfigError(f"input.labels: {input_config.labels!r} reads labels from archive members, but "
                          f"{redaction.redact(uri)} is {kind}; use input.labels: from_dirs or none, or point "
                          "input.uri at .tar/.zip archives")
    if kind == ARCHIVES:
        return list_archives(uri, input_config)
    if input_config.labels not in ("from_dirs", "none"):
        raise ConfigError(f"input.labels: {input_config.labels!r} names a manifest column, but "
                          f"{redaction.redact(uri)} is {kind}; use input.labels: from_dirs or none")
    uris = list_image_file(uri, input_config) if kind == IMAGE_FILE else list_file_tree(uri, input_config)
    labels = parent_directory_names(uris) if input_config.labels == "from_dirs" else pa.nulls(len(uris), pa.string())
    return pa.table({"uri": uris, "label": labels})


def list_archives(uri: str, input_config: InputConfig) -> pa.Table:
    """The member rows of one archive or of every archive a glob matches (in name order), each streamed once."""
    if input_config.labels not in ("from_dirs", "none") and archives.label_sidecar_extension(
            input_config.labels) is None:
        raise ConfigError(f"input.labels: {input_config.labels!r} names a manifest column, but "
                          f"{redaction.redact(uri)} is {ARCHIVES}; use input.labels: member:EXT (e.g. member:cls), "
                          "json:FIELD, from_dirs or none")
    options = input_config.storage_options
    found = sorted(storage.find_files(uri, options)) if storage.is_glob(uri) else [uri]
    listings = [archives.list_archive(archive_uri, input_config.extensions, input_config.labels, options)
                for archive_uri in found]
    return pa.table({"uri": pa.array([member for listing in listings for member in listing.uris], pa.string()),
                     "label": pa.array([label for listing in listings for label in listing.labels], pa.string())})


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


def list_file_tree(uri: str, input_config: InputConfig) -> pa.Array:
    """Every image below a directory or matching a glob, sorted, hidden files left out."""
    options = input_config.storage_options
    found = pa.array(storage.find_files(uri, options), pa.string())
    images = found.filter(has_image_extension(found, input_config.extensions))
    if not glob_names_hidden_component(uri):
        images = images.filter(pc.invert(is_hidden_below(images, storage.listing_root(uri, options))))
    return images.take(pc.sort_indices(images))


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


def read_manifest(uri: str, input_config: InputConfig) -> pa.Table:
    data = storage.read_bytes(uri, input_config.storage_options)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
    elif lower.endswith(".csv") and not data.strip():  # a zero-byte CSV is an empty manifest, not a parse error
        table = pa.table({"uri": pa.array([], pa.string())})
    elif lower.endswith(".csv"):
        table = pa_csv.read_csv(io.BytesIO(data), convert_options=pa_csv.ConvertOptions(
            column_types={"uri": pa.string()}, strings_can_be_null=False))
    else:
        lines = [line.strip() for line in data.decode("utf-8").splitlines()]
        table = pa.table({"uri": pa.array([line for line in lines if line and not line.startswith("#")],
                                          pa.string())})
    if "uri" not in table.column_names:
        raise ConfigError(f"input.uri: manifest {redaction.redact(uri)} has no 'uri' column "
                          f"(columns: {', '.join(table.column_names)})")
    uris = resolve_relative(table.column("uri").cast(pa.string()), uri)
    labels = manifest_labels(table, uri, input_config.labels, uris)
    return pa.table({"uri": uris, "label": labels}).sort_by("uri")


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
