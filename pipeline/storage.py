"""The fsspec edge: the only module that knows about URLs, filesystems, retries and storage options.

Object stores have no atomic rename, so nothing here relies on one: every write goes to a unique
object name and becomes visible in one PUT (or, on local disk, an atomic rename of a temp file).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")

TRANSIENT_MARKERS = ("slowdown", "503", "500", "502", "504", "reset", "timed out", "timeout",
                     "temporarily", "throttl", "incomplete read", "connection", "broken pipe")


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URI or local path."""
    return url_to_fs(uri, **(storage_options or {}))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def full_uri(fs: fsspec.AbstractFileSystem, path: str, original: str) -> str:
    """A path returned by fs.find/glob turned back into a URI of the same scheme as `original`."""
    protocol = protocol_of(original)
    if protocol == "file":
        return path if "://" not in original else f"file://{path}"
    return fs.unstrip_protocol(path)


def is_transient(error: BaseException) -> bool:
    """Errors worth retrying: throttling, 5xx, resets, short reads. 403/404 are permanent."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(error).__name__} {error}".lower()
    return any(marker in text for marker in TRANSIENT_MARKERS)


def with_retries(operation: Callable[[], T], attempts: int = 6, base_delay: float = 0.2) -> T:
    """Run `operation`, retrying transient errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return operation()
        except Exception as error:  # noqa: BLE001 - classified just below
            if attempt == attempts - 1 or not is_transient(error):
                raise
            time.sleep(base_delay * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: fs.cat_file(path))


def write_bytes(uri: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write a whole object so readers see either nothing or all of it."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        write_local_atomically(path, data)
    else:
        with_retries(lambda: fs.pipe_file(path, data))


def write_local_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def exists(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: fs.exists(path))


def list_names(directory_uri: str, storage_options: dict | None = None) -> list[str]:
    """Base names directly under a directory (empty when it does not exist)."""
    fs, path = filesystem(directory_uri, storage_options)
    try:
        fs.invalidate_cache(path)
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


def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def local_copy(uri: str, storage_options: dict | None = None) -> Iterator[str]:
    """A local file path for `uri`: the file itself when local, else a temp download removed afterwards."""
    if protocol_of(uri) == "file":
        fs, path = filesystem(uri, storage_options)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri} does not exist")
        yield path
        return
    fs, path = filesystem(uri, storage_options)
    suffix = "".join(os.path.basename(path).partition(".")[1:])  # keep .weights.h5, .keras, .h5
    with tempfile.TemporaryDirectory(prefix="featurize-") as directory:
        local_path = os.path.join(directory, "download" + ("." + suffix.lstrip(".") if suffix else ""))
        with_retries(lambda: fs.get_file(path, local_path))
        yield local_path


def upload_file(local_path: str, uri: str, storage_options: dict | None = None) -> None:
    """Copy a local file to any fsspec URI."""
    fs, path = filesystem(uri, storage_options)
    if protocol_of(uri) == "file":
        with open(local_path, "rb") as handle:
            write_local_atomically(path, handle.read())
    else:
        with_retries(lambda: fs.put_file(local_path, path))


def sha256_of_uri(uri: str, storage_options: dict | None = None) -> str:
    """Checksum of any stored object, streamed (weights files can be hundreds of MB)."""
    fs, path = filesystem(uri, storage_options)
    digest = hashlib.sha256()

    def stream() -> None:
        with fs.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)

    with_retries(stream)
    return digest.hexdigest()


def is_glob(uri: str) -> bool:
    return any(character in uri for character in "*?[")


def find_files(uri: str, storage_options: dict | None = None) -> list[str]:
    """Every file below a directory or matching a glob, as URIs of the same scheme, page by page."""
    fs, path = filesystem(uri, storage_options)
    if is_glob(uri):
        paths = with_retries(lambda: fs.glob(path))
    else:
        paths = with_retries(lambda: fs.find(path, withdirs=False))
    return [full_uri(fs, found, uri) for found in paths]


def is_directory(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: fs.isdir(path))
