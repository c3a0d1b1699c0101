"""Conditional writes on one object: create if absent, replace or delete if unchanged since it was read.

The primitives of the output lease (pipeline/output/lease.py). A token names the version read (the S3 ETag, or
the bytes themselves elsewhere). Atomic on local disk (under a directory lock) and on S3 (conditional requests);
on other stores best-effort: check, write, and read back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import fsspec

from pipeline.io.faults import precondition_failed, with_retries
from pipeline.io.storage import (
    filesystem,
    forget_cached_listing,
    protocol_family,
    protocol_of,
    remove,
    write_local_atomically,
)

CONDITIONAL_WRITES = {"file": "exclusive create and compare-and-replace under a directory lock",
                      "s3": "conditional requests (If-None-Match: *, If-Match: ETag)"}


def conditional_writes(uri: str) -> str | None:
    """How `uri`'s store makes the operations below atomic; None where they are only best-effort."""
    return CONDITIONAL_WRITES.get(protocol_family(protocol_of(uri)))


@contextlib.contextmanager
def directory_lock(directory: str) -> Iterator[None]:
    """An exclusive flock on a local directory (created if missing). A directory removed while we waited for
    its lock is a different one from the path's: open the path again."""
    import fcntl

    while True:
        os.makedirs(directory, exist_ok=True)
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                if os.stat(directory).st_ino == os.fstat(descriptor).st_ino:
                    yield
                    return
            except FileNotFoundError:
                pass
        finally:
            os.close(descriptor)  # closing releases the lock


def _local_read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def conditional_target(uri: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str, str, str]:
    """(filesystem, path, protocol family, local directory of the path) for the operations below."""
    fs, path = filesystem(uri, storage_options)
    return fs, path, protocol_family(protocol_of(uri)), os.path.dirname(path) or "."


def _s3_conditional_put(fs, path: str, data: bytes, **condition: str) -> str | None:
    """One PUT with If-None-Match or If-Match: the new ETag, or None when the condition does not hold (for
    If-Match also when the object is gone; a missing bucket is an error)."""
    bucket, key, _ = fs.split_path(path)
    try:
        response = with_retries(lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition))
    except Exception as error:  # noqa: BLE001 - a precondition is an answer; the rest goes on up
        gone = isinstance(error, FileNotFoundError) and "IfMatch" in condition
        if gone or isinstance(error, FileExistsError) or precondition_failed(error):
            return None
        raise
    return response["ETag"]


def create_if_absent(uri: str, data: bytes, storage_options: dict | None = None) -> Any:
    """Write `data` only if nothing is at `uri`; its token, or None when something already was."""
    fs, path, protocol, directory = conditional_target(uri, storage_options)
    if protocol == "file":
        with directory_lock(directory):
            try:
                write_local_atomically(path, data, exclusive=True)
            except FileExistsError:
                return None
        return data
    if protocol == "s3":
        return _s3_conditional_put(fs, path, data, IfNoneMatch="*")
    forget_cached_listing(fs, path)
    if with_retries(lambda: fs.exists(path)):
        return None
    with_retries(lambda: fs.pipe_file(path, data))
    return data if read_with_token(uri, storage_options) == (data, data) else None


def read_with_token(uri: str, storage_options: dict | None = None) -> tuple[bytes, Any] | None:
    """(bytes, token) of the object at `uri`, or None when there is none."""
    fs, path, protocol, directory = conditional_target(uri, storage_options)
    if protocol == "file":
        if not os.path.isdir(directory):
            return None
        with directory_lock(directory):
            data = _local_read(path)
        return None if data is None else (data, data)
    if protocol == "s3":
        from fsspec.asyn import sync

        bucket, key, _ = fs.split_path(path)

        async def get() -> tuple[bytes, str]:  # body and ETag of one version, in one request
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            return await response["Body"].read(), response["ETag"]

        try:
            return with_retries(lambda: sync(fs.loop, get))
        except FileNotFoundError:
            return None
    forget_cached_listing(fs, path)
    try:
        data = with_retries(lambda: fs.cat_file(path))
    except FileNotFoundError:
        return None
    return data, data


def replace_if_match(uri: str, data: bytes, token: Any, storage_options: dict | None = None) -> Any:
    """Overwrite the object at `uri` only if it is still the version `token` names; the new token, or None."""
    fs, path, protocol, directory = conditional_target(uri, storage_options)
    if protocol == "file":
        with directory_lock(directory):
            if _local_read(path) != token:
                return None
            write_local_atomically(path, data)
        return data
    if protocol == "s3":
        return _s3_conditional_put(fs, path, data, IfMatch=token)
    current = read_with_token(uri, storage_options)
    if current is None or current[1] != token:
        return None
    with_retries(lambda: fs.pipe_file(path, data))
    return data if read_with_token(uri, storage_options) == (data, data) else None


def delete_if_match(uri: str, token: Any = None, storage_options: dict | None = None) -> bool:
    """Delete the object at `uri` if it is still the version `token` names (any version when token is None);
    whether it was deleted."""
    fs, path, protocol, directory = conditional_target(uri, storage_options)
    if protocol == "file":
        if not os.path.isdir(directory):
            return False
        with directory_lock(directory):
            if token is not None and _local_read(path) != token:
                return False
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
        return True
    if protocol == "s3":
        bucket, key, _ = fs.split_path(path)
        condition = {} if token is None else {"IfMatch": token}
        try:
            with_retries(lambda: fs.call_s3("delete_object", Bucket=bucket, Key=key, **condition))
        except Exception as error:  # noqa: BLE001 - changed meanwhile: an answer
            if precondition_failed(error):
                return False
            raise
        forget_cached_listing(fs, path)
        return True
    current = read_with_token(uri, storage_options)
    if current is None or (token is not None and current[1] != token):
        return False
    remove(uri, storage_options)
    return True
