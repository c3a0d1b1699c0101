"""Storage faults: transient (retried here), permanent per object (an error row), or the job's (stop at once).

with_retries is the retry layer above the storage clients, per object and for every fsspec backend (http has
no retries of its own); storage.py bounds the clients' own retries below it. Errors are classified by exception
class, HTTP status, store error code and errno; by message only as a last resort. StorageError and
access_error turn the job's faults (a missing bucket, bad credentials) into a message that says what to fix.
"""

from __future__ import annotations

import collections
import errno
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from pipeline.errors import StorageError
from pipeline.io.redaction import redact

T = TypeVar("T")

log = logging.getLogger("featurize.storage")

# Transient: worth another attempt.
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                   "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException", "OperationAborted",
                   "ServerBusy", "500", "502", "503", "504"}
TRANSIENT_CLASS_NAMES = {"IncompleteRead", "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError",
                         "ClientOSError", "ServerTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                         "ReadTimeoutError", "ConnectTimeoutError", "ResponseStreamingError", "ProtocolError",
                         "HTTPClientError", "FSTimeoutError", "ChunkedEncodingError", "RemoteDisconnected",
                         "ServiceResponseError", "ResponseParserError"}
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    errno.ECONNREFUSED, errno.EPIPE, getattr(errno, "EREMOTEIO", errno.EIO)}
TRANSIENT_MARKERS = ("slowdown", "reduce your request rate", "throttl", "service unavailable", "connection reset",
                     "connection aborted", "connection closed", "timed out", "temporarily", "incomplete read",
                     "broken pipe", "payload is not completed")

# Permanent: told, never retried (per object an error row; for the job's own output, a StorageError).
CREDENTIAL_CLASS_NAMES = {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound",
                          "CredentialRetrievalError", "DefaultCredentialsError", "ClientAuthenticationError"}
NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "BlobNotFound", "ContainerNotFound"}
DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                "AllAccessDisabled", "AuthorizationFailure", "AuthenticationFailed", "403", "401"}

# A conditional request whose condition did not hold (S3 If-Match / If-None-Match): an answer, not a fault.
PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}

RETRIES: collections.Counter = collections.Counter()  # retries done in this process, by reason (tests, logs)



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


def precondition_failed(error: BaseException) -> bool:
    return any(error_code(cause) in PRECONDITION_CODES or http_status(cause) in (409, 412)
               for cause in error_chain(error))


def gcs_forbidden(chain: list[BaseException]) -> bool:
    """gcsfs raises a 403 as a plain OSError("Forbidden: URL\nthe server's message"), without its status."""
    return any(type(cause) is OSError and str(cause).startswith("Forbidden: ") for cause in chain)


def describe_error(error: BaseException) -> str:
    """A short reason without secrets: "not found", "access denied", "no credentials found", or the error."""
    chain = list(error_chain(error))
    codes = {error_code(cause) for cause in chain} - {None}
    statuses = {http_status(cause) for cause in chain} - {None}
    if any(class_names(cause) & CREDENTIAL_CLASS_NAMES and http_status(cause) is None for cause in chain):
        return "no credentials found"  # with a status, the store refused them (Azure: 403 AuthenticationFailed)
    if codes & {"NoSuchBucket", "ContainerNotFound"}:  # S3's bucket, Azure's container
        return "bucket not found"
    if codes & NOT_FOUND_CODES or 404 in statuses or isinstance(chain[0], FileNotFoundError):
        return "not found"
    if codes & DENIED_CODES or statuses & {401, 403} or isinstance(chain[0], PermissionError) or gcs_forbidden(chain):
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
    if reason == "not found" and action == "write to" and is_object_store(uri):
        reason = "bucket not found"  # a write misses no object, only its bucket (gcsfs: a bare FileNotFoundError)
    section = key.split(".", 1)[0]
    hints = {
        "bucket not found": "the bucket does not exist: create it or fix the URI",
        "not found": "it does not exist (or is invisible with these credentials): check the URI",
        "access denied": (f"the credentials in use (environment variables, the profile, the instance role, or "
                          f"{section}.storage_options) are invalid or not allowed to {action} it"),
        "no credentials found": credentials_hint(uri, section),
    }
    hint = hints.get(reason, "the store kept failing; check that it is reachable and try again")
    detail = server_message(error)
    message = f"{key}: cannot {action} {redact(uri)}: {reason}"
    if detail and detail.lower() not in reason:
        message += f" ({detail})"
    return StorageError(f"{message}; {hint}")


def credentials_hint(uri: str, section: str) -> str:
    """Where credentials come from for the store `uri` names, in that store's own words."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("gs", "gcs"):
        return ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run where application-default "
                f"credentials exist, or use {section}.storage_options.token: anon for a public bucket")
    if scheme in ("az", "abfs", "abfss"):
        return ("set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or "
                f"AZURE_STORAGE_SAS_TOKEN, or give them in {section}.storage_options (account_name, account_key, ...)")
    return ("set them in the environment (e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), "
            f"name a profile ({section}.storage_options.profile), run with an instance role, "
            f"or use {section}.storage_options.anon: true for a public bucket")


def is_object_store(uri: str) -> bool:
    return "://" in uri and not uri.startswith(("file://", "memory://", "local://"))


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
