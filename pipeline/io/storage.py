"""Filesystem access through fsspec: the only module that knows URLs, filesystems and storage options.

Every read, write, listing and checksum of the package comes through here, wrapped in faults.with_retries.
Object stores have no atomic rename, so nothing here relies on one: every write goes to a unique object name
and becomes visible in one PUT (or, on local disk, an atomic rename of a temp file). Neighbours: faults.py
classifies errors and retries them, redaction.py keeps secrets out of text, conditional.py holds the
compare-and-swap writes of the output lease.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import stat
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

from pipeline.io import clients
from pipeline.io.clients import options_for, protocol_family, protocol_of  # noqa: F401 (storage's API)
from pipeline.io.faults import StorageError, access_error, describe_error, is_storage_failure, with_retries
from pipeline.io.redaction import redact, remember_secrets

log = logging.getLogger("featurize.storage")


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URI or local path."""
    if storage_options:
        remember_secrets(storage_options)
    try:
        fs, path = clients.open_filesystem(uri, options_for(uri, storage_options))
    except ImportError as error:
        extra = clients.EXTRAS.get(protocol_of(uri))
        hint = f"pip install 'featurize[{extra}]'" if extra else "install the fsspec implementation it names"
        raise StorageError(f"{redact(uri)}: {error}; {hint}") from None
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


def full_uri(fs: fsspec.AbstractFileSystem, path: str, original: str) -> str:
    """A path returned by fs.find/glob turned back into a URI of the same scheme as `original`."""
    protocol = protocol_of(original)
    if protocol == "file":
        return path if "://" not in original else f"file://{path}"
    if protocol in ("s3a", "gcs", "abfs", "abfss", "az"):  # keep the scheme the user wrote
        return f"{protocol}://{path}"
    return fs.unstrip_protocol(path)


def forget_cached_listing(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Object-store clients cache listings; other processes (actors, a previous run) change the output."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def check_writable(uri: str, storage_options: dict | None = None, key: str = "output.uri") -> None:
    """Write and delete a tiny probe object under `uri`, so a missing bucket or bad credentials stop the job
    before any listing or model loading, with a StorageError that says which and how to fix it."""
    probe = join(uri, f"_probe-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"", storage_options)
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - turned into a clear message or re-raised
        if not is_storage_failure(error):
            raise
        raise access_error(key, uri, "write to", error) from None
    try:
        remove(probe, storage_options)
    except Exception as error:  # noqa: BLE001 - a write-only role: the probe stays, the job can run
        log.warning("could not delete the probe object %s: %s", redact(probe), describe_error(error))


def missing_bucket(uri: str, storage_options: dict | None = None) -> str | None:
    """For an object-store URI whose bucket (container) does not exist or is not visible: a sentence saying so."""
    if protocol_family(protocol_of(uri)) in ("file", "http", "memory"):
        return None
    fs, path = filesystem(uri, storage_options)
    bucket = path.strip("/").split("/", 1)[0]
    try:
        if fs.exists(bucket):
            return None
    except Exception:  # noqa: BLE001 - the probe itself failed: say what is known
        pass
    return f"the bucket {bucket!r} does not exist or is not visible with these credentials"


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """A whole object in one request. On S3 that is one GET: s3fs would otherwise first ask the size (a HEAD)
    to split big objects into ranges, doubling the round trips for every small image."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        check_regular_file(path)
    single_request = {"max_concurrency": 1} if getattr(fs, "max_concurrency", 1) > 1 else {}
    return with_retries(lambda: fs.cat_file(path, **single_request))


def check_regular_file(path: str) -> None:
    """A FIFO blocks its reader forever and a device (a link to /dev/zero) never ends: read regular files only."""
    mode = os.stat(path).st_mode  # follows links; a link loop raises OSError (ELOOP)
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
        raise OSError(f"not a regular file: {path} is {kind}")


def write_bytes(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write a whole object so readers see either nothing or all of it."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        write_local_atomically(path, data)
    else:
        with_retries(lambda: fs.pipe_file(path, data))


def write_local_atomically(path: str, data: bytes, exclusive: bool = False) -> None:
    """Readers see the whole file or none; a failed write (disk full) leaves no temporary file behind.
    `exclusive`: only if nothing is at `path` (a hard link of the complete file), else FileExistsError."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        (os.link if exclusive else os.replace)(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def exists(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    forget_cached_listing(fs, path)
    return with_retries(lambda: fs.exists(path))


def list_names(directory_uri: str, storage_options: dict | None = None) -> list[str]:
    """Base names directly under a directory (empty when it does not exist)."""
    fs, path = filesystem(directory_uri, storage_options)
    try:
        forget_cached_listing(fs, path)
        entries = with_retries(lambda: fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)


def remove(uri: str, storage_options: dict | None = None, recursive: bool = False) -> None:
    fs, path = filesystem(uri, storage_options)
    with contextlib.suppress(FileNotFoundError):
        with_retries(lambda: fs.rm(path, recursive=recursive))


def make_dirs(uri: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        os.makedirs(path, exist_ok=True)
    else:
        with contextlib.suppress(Exception):  # object stores have no directories
            fs.makedirs(path, exist_ok=True)


def sha256_of_stream(handle: IO[bytes]) -> str:
    """Checksum of everything left to read in a binary file object, a block at a time."""
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_of_file(path: str) -> str:
    with open(path, "rb") as handle:
        return sha256_of_stream(handle)


def sha256_of_uri(uri: str, storage_options: dict | None = None) -> str:
    """Checksum of any stored object, streamed (weights files can be hundreds of MB)."""
    fs, path = filesystem(uri, storage_options)

    def read_whole_object() -> str:  # a retry after a read failed part-way starts again from the first byte
        with fs.open(path, "rb") as handle:
            return sha256_of_stream(handle)

    return with_retries(read_whole_object)


@contextlib.contextmanager
def local_copy(uri: str, storage_options: dict | None = None) -> Iterator[str]:
    """A local file path for `uri`: the file itself when local, else a temp download removed afterwards."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri} does not exist")
        yield path
        return
    suffix = "".join(os.path.basename(path).partition(".")[1:])  # keep .weights.h5, .keras, .h5
    with tempfile.TemporaryDirectory(prefix="featurize-") as directory:
        local_path = os.path.join(directory, "download" + ("." + suffix.lstrip(".") if suffix else ""))
        with_retries(lambda: fs.get_file(path, local_path))
        yield local_path


# Archives are read front to back in ranges this large: one GET for a shard up to this size, a handful for a
# GB-sized one, and never one request per member; memory stays bounded by one range, whatever the archive's size.
STREAM_BLOCK_SIZE = 64 * 1024 * 1024


@contextlib.contextmanager
def open_stream(uri: str, storage_options: dict | None = None) -> Iterator[IO[bytes]]:
    """A file object to read `uri` sequentially (archives): the local file itself, or a remote object read in
    STREAM_BLOCK_SIZE ranges ahead of the reader. Opening is retried; a failure mid-stream is the reader's."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        check_regular_file(path)
        with open(path, "rb") as handle:
            yield handle
        return
    handle = with_retries(lambda: fs.open(path, "rb", block_size=STREAM_BLOCK_SIZE, cache_type="readahead"))
    try:
        yield handle
    finally:
        handle.close()


def local_path_uri(uri: str) -> str:
    """A local path as an absolute `file://` URL (the outer part of a chained archive-member URL); other URIs
    unchanged."""
    if protocol_of(uri) != "file" or uri.startswith("file://"):
        return uri
    return "file://" + os.path.abspath(uri)


def upload_file(local_path: str, uri: str, storage_options: dict | None = None) -> None:
    """Copy a local file to any fsspec URI."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        with open(local_path, "rb") as handle:
            write_local_atomically(path, handle.read())
    else:
        with_retries(lambda: fs.put_file(local_path, path))


def is_glob(uri: str) -> bool:
    return any(character in uri for character in "*?[")


def split_glob(pattern: str) -> tuple[str, str]:
    """(fixed directory, pattern below it): `data/*/x*.jpg` -> (`data`, `*/x*.jpg`)."""
    first_wildcard = min((pattern.index(character) for character in "*?[" if character in pattern),
                         default=len(pattern))
    cut = pattern.rfind("/", 0, first_wildcard)
    return pattern[:max(cut, 0)], pattern[cut + 1:]


def listing_root(uri: str, storage_options: dict | None = None) -> str:
    """The directory a listing of `uri` starts from (a glob's fixed directory), ending in '/' and spelled as
    find_files spells what it finds, so that a found URI minus this prefix is its path below the root."""
    fs, path = filesystem(uri, storage_options)
    directory = split_glob(path)[0] if is_glob(path) else path
    return full_uri(fs, directory.rstrip("/"), uri) + "/"


def find_files(uri: str, storage_options: dict | None = None) -> list[str]:
    """Every file below a directory or matching a glob, as URIs of the same scheme, page by page."""
    fs, path = filesystem(uri, storage_options)
    forget_cached_listing(fs, path)
    if is_glob(uri):
        paths = with_retries(lambda: fs.glob(path))
    else:
        paths = with_retries(lambda: fs.find(path, withdirs=False))
    return [full_uri(fs, found, uri) for found in paths]


def list_entries(directory_uri: str, storage_options: dict | None = None) -> list[tuple[str, bool]]:
    """(URI, is a directory) of what lies directly under a directory: a listing split by its top-level prefixes."""
    fs, path = filesystem(directory_uri, storage_options)
    forget_cached_listing(fs, path)
    entries = with_retries(lambda: fs.ls(path, detail=True))
    return [(full_uri(fs, entry["name"].rstrip("/"), directory_uri), entry.get("type") == "directory")
            for entry in entries]


def open_input(uri: str, storage_options: dict | None = None) -> IO[bytes]:
    """A file opened for reading in pieces (a manifest read as a stream, a part's row groups); close it."""
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: fs.open(path, "rb"))


def remove_many(uris: list[str], storage_options: dict | None = None) -> None:
    """Delete files of one store at once: object stores take up to 1,000 keys a request."""
    if not uris:
        return
    fs, _ = filesystem(uris[0], storage_options)
    paths = [filesystem(uri, storage_options)[1] for uri in uris]
    with contextlib.suppress(FileNotFoundError):
        with_retries(lambda: fs.rm(paths))


def is_directory(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    forget_cached_listing(fs, path)
    return with_retries(lambda: fs.isdir(path))


def is_file(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    forget_cached_listing(fs, path)
    return with_retries(lambda: fs.isfile(path))


def as_epoch_seconds(value: Any) -> float | None:
    """A listing's modification time (datetime, ISO string or epoch number) as epoch seconds."""
    if isinstance(value, datetime.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)).timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return as_epoch_seconds(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")))
    return None


def entry_modified(entry: dict) -> float | None:
    """The store's own modification time of a listing entry (local mtime, S3 LastModified, GCS updated, ...)."""
    for name in ("LastModified", "mtime", "last_modified", "updated", "created"):
        if entry.get(name) is not None:
            return as_epoch_seconds(entry[name])
    return None


def modified_times(directory_uri: str, storage_options: dict | None = None) -> dict[str, float | None]:
    """{base name: modification time on the store's clock, None where the store gives none} for the objects
    directly under a directory (empty when it does not exist)."""
    fs, path = filesystem(directory_uri, storage_options)
    try:
        forget_cached_listing(fs, path)
        entries = with_retries(lambda: fs.ls(path, detail=True))
    except FileNotFoundError:
        return {}
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry_modified(entry) for entry in entries}


def size_of(uri: str, storage_options: dict | None = None) -> int | None:
    """Bytes of a file; None when it does not exist."""
    fs, path = filesystem(uri, storage_options)
    forget_cached_listing(fs, path)
    try:
        return with_retries(lambda: fs.size(path))
    except FileNotFoundError:
        return None


def modified_time(uri: str, storage_options: dict | None = None) -> float | None:
    fs, path = filesystem(uri, storage_options)
    forget_cached_listing(fs, path)
    return entry_modified(with_retries(lambda: fs.info(path)))
