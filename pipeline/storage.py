"""The fsspec edge: the only module that knows about URLs, filesystems, retries and storage options.

Object stores have no atomic rename, so nothing here relies on one: every write goes to a unique
object name and becomes visible in one PUT (or, on local disk, an atomic rename of a temp file).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.registry import known_implementations

T = TypeVar("T")

log = logging.getLogger("featurize.storage")

REDACTED = "***"
# Option and parameter names whose values are credentials (storage_options keys, URL query parameters,
# headers): s3fs key/secret/token, client_kwargs aws_*; adlfs account_key/sas_token/connection_string/
# client_secret; gcsfs token; presigned URLs' X-Amz-Signature/Credential/Security-Token; Azure SAS `sig`.
SECRET_NAME = re.compile(r"secret|token|passw|credential|signature|auth|private|api_?key|access_?key|"
                         r"account_?key|sas|connection_?string|^key$|_key$|^sig$", re.IGNORECASE)
# Environment variables whose values are credentials (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
# AZURE_STORAGE_KEY, AZURE_CLIENT_SECRET, ...): scrubbed from any text that goes out, wherever it came from.
SECRET_ENVIRONMENT = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|ACCOUNT_KEY|STORAGE_KEY|"
                                r"CONNECTION_STRING|SAS|CREDENTIAL|API_KEY", re.IGNORECASE)
MIN_SECRET_LENGTH = 8  # shorter values ("true", "anon") would scrub ordinary words
URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@?#'\"]+@")
PARAMETER = re.compile(r"(?<![\w.\-])([\w.\-]+)=([^&\s'\"#,;)]+)")
MAPPING_ITEM = re.compile(r"""(['"])([\w.\-]+)\1(\s*:\s*)(['"])(.*?)\4""")
HEADER = re.compile(r"(?i)\b(authorization|cookie|x-amz-security-token)(\s*:\s*)([^\r\n,'\"]+)")

_remembered_secrets: set[str] = set()

# Retrying: with_retries is the layer above the clients, per object and for every fsspec backend (http has no
# retries of its own). Classified by exception class, HTTP status, S3 error code and errno; by message only as a
# last resort. Below it, S3 keeps botocore's retries (standard mode, S3_CLIENT_ATTEMPTS a call) and drops s3fs's
# own loop: the three layers multiplied to 125 attempts an object (5 x 5 x 5), minutes of backoff before a dead
# endpoint became an error row, and with botocore's 60 s connect timeout, hours.
S3_CLIENT_ATTEMPTS = 3
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                   "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException", "OperationAborted",
                   "ServerBusy", "500", "502", "503", "504"}
TRANSIENT_CLASS_NAMES = {"IncompleteRead", "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError",
                         "ClientOSError", "ServerTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                         "ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError", "ProtocolError",
                         "HTTPClientError", "FSTimeoutError", "ChunkedEncodingError", "RemoteDisconnected",
                         "ServiceResponseError", "ResponseParserError"}
CREDENTIAL_CLASS_NAMES = {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound",
                          "CredentialRetrievalError", "DefaultCredentialsError", "ClientAuthenticationError"}
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    errno.ECONNREFUSED, errno.EPIPE, getattr(errno, "EREMOTEIO", errno.EIO)}
TRANSIENT_MARKERS = ("slowdown", "reduce your request rate", "throttl", "service unavailable", "connection reset",
                     "connection aborted", "connection closed", "timed out", "temporarily", "incomplete read",
                     "broken pipe", "payload is not completed")
NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "BlobNotFound", "ContainerNotFound"}
DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                "AllAccessDisabled", "AuthorizationFailure", "AuthenticationFailed", "403", "401"}
RETRIES: collections.Counter = collections.Counter()  # retries done in this process, by reason (tests, logs)
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "http": "http", "https": "http"}
PROTOCOL_FAMILIES = {"https": "http", "s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "local": "file"}


class StorageError(ValueError):
    """A storage problem the user has to fix (missing bucket, bad or no credentials): the job stops at once.

    A ValueError, so the CLI reports it as a configuration error (exit 2). Its message is redacted."""


# --------------------------------------------------------------------------------------------------
# secrets: what is one, and keeping them out of every text that leaves the process
# --------------------------------------------------------------------------------------------------


def secret_values(options: Any) -> Iterator[str]:
    """Every string held under a secret-named key of a (nested) storage_options mapping."""
    if isinstance(options, dict):
        for name, value in options.items():
            if SECRET_NAME.search(str(name)):
                yield from string_leaves(value)
            else:
                yield from secret_values(value)
    elif isinstance(options, (list, tuple)):
        for value in options:
            yield from secret_values(value)


def string_leaves(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from string_leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from string_leaves(item)


def remember_secrets(options: dict | None) -> None:
    """Values given as credentials in storage_options are scrubbed from every later `redact` in this process."""
    for value in secret_values(options or {}):
        if len(value) >= MIN_SECRET_LENGTH:
            _remembered_secrets.add(value)


def environment_secrets() -> list[str]:
    return [value for name, value in os.environ.items()
            if SECRET_ENVIRONMENT.search(name) and len(value) >= MIN_SECRET_LENGTH]


def public_options(options: dict | None) -> dict:
    """storage_options without credential values: what may travel with every Ray task."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {name: strip(item) for name, item in value.items() if not SECRET_NAME.search(str(name))}
        if isinstance(value, (list, tuple)):
            return type(value)(strip(item) for item in value)
        return value

    return strip(dict(options or {}))


def redact(text: Any) -> Any:
    """`text` with credentials replaced by ***: URL user info, signed-URL parameters, authorization headers,
    secret-named items, and every secret value known from the environment or storage_options.

    Use it on anything that leaves the process: log lines, error messages, error rows, `_SUCCESS`, plans."""
    if text is None:
        return None
    text = str(text)
    text = URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    text = HEADER.sub(rf"\1\2{REDACTED}", text)
    text = PARAMETER.sub(lambda m: f"{m[1]}={REDACTED}" if SECRET_NAME.search(m[1]) else m[0], text)
    text = MAPPING_ITEM.sub(lambda m: f"{m[1]}{m[2]}{m[1]}{m[3]}{m[4]}{REDACTED}{m[4]}"
                            if SECRET_NAME.search(m[2]) else m[0], text)
    for value in sorted({*_remembered_secrets, *environment_secrets()}, key=len, reverse=True):
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def redact_uri(uri: str) -> str:
    """An input name as it may be shown or stored in rows: user info and signatures removed."""
    if uri is None or ("@" not in uri and "?" not in uri and ";" not in uri):
        return uri  # the common case, kept cheap: one check per row
    return redact(uri)


# --------------------------------------------------------------------------------------------------
# filesystems
# --------------------------------------------------------------------------------------------------


def protocol_family(protocol: str) -> str:
    return PROTOCOL_FAMILIES.get(protocol, protocol)


def options_for(uri: str, storage_options: dict | None) -> dict:
    """The fsspec options for one URI.

    storage_options is flat (`{anon: true}`, `{client_kwargs: {endpoint_url: ...}}`: for the object store
    the config names) or keyed by protocol where inputs mix stores (`{s3: {...}, https: {headers: {...}}}`);
    flat keys apply to every protocol but http(s) and local files, which take only their own entry (an
    S3 option means nothing to a web server and would break its client)."""
    if not storage_options:
        return {}
    family = protocol_family(protocol_of(uri))
    flat, chosen = {}, {}
    for name, value in storage_options.items():
        if name in known_implementations and isinstance(value, dict):
            if protocol_family(name) == family:
                chosen.update(value)
        else:
            flat[name] = value
    base = {} if family in ("http", "file") else flat
    return {**base, **chosen}


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URI or local path."""
    if storage_options:
        remember_secrets(storage_options)
    s3 = protocol_family(protocol_of(uri)) == "s3"
    options = options_for(uri, storage_options)
    try:
        fs, path = url_to_fs(uri, **(with_bounded_s3_retries(options) if s3 else options))
    except ImportError as error:
        extra = EXTRAS.get(protocol_of(uri))
        hint = f"pip install 'featurize[{extra}]'" if extra else "install the fsspec implementation it names"
        raise StorageError(f"{redact(uri)}: {error}; {hint}") from None
    if s3:
        fs.retries = 1  # s3fs's loop around each call (a class attribute, not an option): with_retries is ours
    return fs, path


def with_bounded_s3_retries(options: dict) -> dict:
    """botocore's retries set to S3_CLIENT_ATTEMPTS in standard mode, unless the user chose their own."""
    config_kwargs = dict(options.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", {"total_max_attempts": S3_CLIENT_ATTEMPTS, "mode": "standard"})
    return {**options, "config_kwargs": config_kwargs}


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


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


# --------------------------------------------------------------------------------------------------
# errors: transient (retry), permanent per object (an error row), or the job's (stop at once)
# --------------------------------------------------------------------------------------------------


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """The error and its causes (s3fs raises OSError/PermissionError from botocore's ClientError)."""
    seen = 0
    while error is not None and seen < 8:
        yield error
        error = error.__cause__ or error.__context__
        seen += 1


def class_names(error: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(error).__mro__}


def http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    for name in ("status", "status_code", "code"):  # aiohttp, azure-core, gcsfs
        value = getattr(error, name, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def error_code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    code = getattr(error, "error_code", None)  # azure-core
    return str(code) if code else None


def is_transient(error: BaseException) -> bool:
    """Errors worth retrying: throttling, 5xx, resets, short reads. 403/404 and credentials are permanent."""
    for cause in error_chain(error):
        names = class_names(cause)
        if names & CREDENTIAL_CLASS_NAMES:
            return False
        status, code = http_status(cause), error_code(cause)
        if code in TRANSIENT_CODES or (status is not None and (status >= 500 or status in (408, 429))):
            return True
        if status is not None and 400 <= status < 500:
            return False
        if isinstance(cause, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(cause, (ConnectionError, TimeoutError)) or names & TRANSIENT_CLASS_NAMES:
            return True
        if isinstance(cause, OSError) and cause.errno in TRANSIENT_ERRNOS:
            return True
    text = f"{type(error).__name__} {error}".lower()
    return any(marker in text for marker in TRANSIENT_MARKERS)


def describe_error(error: BaseException) -> str:
    """A short reason without secrets: "not found", "access denied", "no credentials found", or the error."""
    chain = list(error_chain(error))
    codes = {error_code(cause) for cause in chain} - {None}
    statuses = {http_status(cause) for cause in chain} - {None}
    if any(class_names(cause) & CREDENTIAL_CLASS_NAMES for cause in chain):
        return "no credentials found"
    if "NoSuchBucket" in codes:
        return "bucket not found"
    if codes & NOT_FOUND_CODES or 404 in statuses or isinstance(chain[0], FileNotFoundError):
        return "not found"
    if codes & DENIED_CODES or statuses & {401, 403} or isinstance(chain[0], PermissionError):
        return "access denied"
    detail = redact(f"{type(error).__name__}: {error}")
    detail = detail if len(detail) <= 300 else detail[:297] + "..."
    return f"still failing after retries ({detail})" if is_transient(error) else detail


def server_message(error: BaseException) -> str:
    """The server's own words (e.g. "The AWS Access Key Id you provided does not exist in our records.")."""
    for cause in error_chain(error):
        response = getattr(cause, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Message"):
            return redact(response["Error"]["Message"])
    return redact(str(error))[:300]


def access_error(key: str, uri: str, action: str, error: BaseException) -> StorageError:
    """A StorageError saying what failed, why, and what to do; no secret in it."""
    reason = describe_error(error)
    section = key.split(".", 1)[0]
    hints = {
        "bucket not found": "the bucket does not exist: create it or fix the URI",
        "not found": "it does not exist (or is invisible with these credentials): check the URI",
        "access denied": (f"the credentials in use (environment variables, the profile, the instance role, or "
                          f"{section}.storage_options) are invalid or not allowed to {action} it"),
        "no credentials found": ("set them in the environment (e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), "
                                 f"name a profile ({section}.storage_options.profile), run with an instance role, "
                                 f"or use {section}.storage_options.anon: true for a public bucket"),
    }
    hint = hints.get(reason, "the store kept failing; check that it is reachable and try again")
    detail = server_message(error)
    message = f"{key}: cannot {action} {redact(uri)}: {reason}"
    if detail and detail.lower() not in reason:
        message += f" ({detail})"
    return StorageError(f"{message}; {hint}")


def is_storage_failure(error: BaseException) -> bool:
    """An error raised by a storage client (as opposed to a bug or a config error of ours)."""
    if isinstance(error, ValueError):
        return False
    if isinstance(error, OSError):
        return True
    modules = {cls.__module__.split(".", 1)[0] for cls in type(error).__mro__}
    return bool(modules & {"botocore", "aiobotocore", "aiohttp", "fsspec", "s3fs", "gcsfs", "adlfs", "azure",
                           "google"})


def retry_reason(error: BaseException) -> str:
    """A short name for a transient error: the S3 code or HTTP status, else the exception class."""
    for cause in error_chain(error):
        if error_code(cause) or http_status(cause):
            return str(error_code(cause) or http_status(cause))
    return type(error).__name__


def with_retries(operation: Callable[[], T], attempts: int = 5, base_delay: float = 0.2) -> T:
    """Run `operation`, retrying transient errors with jittered exponential backoff (0.2 s, 0.4 s, ...)."""
    for attempt in range(attempts):
        try:
            return operation()
        except Exception as error:  # noqa: BLE001 - classified just below
            if attempt == attempts - 1 or not is_transient(error):
                raise
            RETRIES[retry_reason(error)] += 1
            log.debug("transient storage error, retry %d of %d: %s", attempt + 1, attempts - 1,
                      redact(f"{type(error).__name__}: {error}"))
            time.sleep(base_delay * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


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


# --------------------------------------------------------------------------------------------------
# reading and writing
# --------------------------------------------------------------------------------------------------


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


def is_directory(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    forget_cached_listing(fs, path)
    return with_retries(lambda: fs.isdir(path))


def is_file(uri: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    forget_cached_listing(fs, path)
    return with_retries(lambda: fs.isfile(path))


# --------------------------------------------------------------------------------------------------
# conditional writes: the primitives of the output lease (pipeline/lease.py)
# --------------------------------------------------------------------------------------------------
# Each returns or takes a token that names one version of the object: S3's ETag, or on local disk and on
# best-effort stores the bytes themselves. A precondition that does not hold is an answer (None / False), not an
# error. Local files are compared and replaced under an exclusive flock on their directory, so every operation
# on one lease is linearisable among the processes of a host (and of hosts sharing a file system with working
# locks); the first create is in any case an exclusive create (a hard link of a complete temporary file).
# S3 uses conditional requests (If-None-Match: *, If-Match: ETag), atomic on the server. Other stores (gs://,
# az://, memory://, ...) get a best-effort version: check, write, read back (CONDITIONAL_WRITES says which).

CONDITIONAL_WRITES = {"file": "exclusive create and compare-and-replace under a directory lock",
                      "s3": "conditional requests (If-None-Match: *, If-Match: ETag)"}
PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def conditional_writes(uri: str) -> str | None:
    """How `uri`'s store makes the operations below atomic; None where they are only best-effort."""
    return CONDITIONAL_WRITES.get(protocol_family(protocol_of(uri)))


def precondition_failed(error: BaseException) -> bool:
    return any(error_code(cause) in PRECONDITION_CODES or http_status(cause) in (409, 412)
               for cause in error_chain(error))


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


def as_epoch_seconds(value: Any) -> float | None:
    """A listing's modification time (datetime, ISO string or epoch number) as epoch seconds."""
    import datetime

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


def modified_time(uri: str, storage_options: dict | None = None) -> float | None:
    fs, path = filesystem(uri, storage_options)
    forget_cached_listing(fs, path)
    return entry_modified(with_retries(lambda: fs.info(path)))
