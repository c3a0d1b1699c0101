"""Each store's client as featurize configures it: which options reach which URI, and the retry bounds and
quirks of s3fs and gcsfs, set per filesystem (nothing process-wide, no environment variables)."""

from __future__ import annotations

import os
import types

import fsspec
from fsspec.core import url_to_fs
from fsspec.registry import known_implementations

# Below with_retries, S3 keeps botocore's retries (standard mode, S3_CLIENT_ATTEMPTS a call) and drops s3fs's own
# loop: the three layers multiplied to 125 attempts an object (5 x 5 x 5), minutes of backoff before a dead
# endpoint became an error row, and with botocore's 60 s connect timeout, hours.
S3_CLIENT_ATTEMPTS = 3
# gcsfs retries each request itself, 6 attempts with 1-32 s pauses, a 401 "Invalid Credentials" included (refused
# credentials took ~31 s to stop a job); bounded the same way as botocore's, below with_retries.
GCS_CLIENT_ATTEMPTS = 3

# The pip extra that installs each protocol's fsspec implementation, for the message when it is missing.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "http": "http", "https": "http"}

# Spellings of one store, so that options keyed by one spelling apply to URIs written with another.
PROTOCOL_FAMILIES = {"https": "http", "s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "local": "file"}


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


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"




def open_filesystem(uri: str, options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for `uri` with its client's retries bounded below featurize's own."""
    family = protocol_family(protocol_of(uri))
    if family == "gs" and not is_google_endpoint(options):
        fs, path = plain_gcs_filesystem(uri, options)
    else:
        fs, path = url_to_fs(uri, **(with_bounded_s3_retries(options) if family == "s3" else options))
    if family == "s3":
        fs.retries = 1  # s3fs's loop around each call (a class attribute, not an option): with_retries is ours
    if family == "gs":
        bound_gcs_retries(fs)
    return fs, path


def bound_gcs_retries(fs: fsspec.AbstractFileSystem) -> None:
    """gcsfs fixes its retry count when its class is defined (`@retry_request(retries=6)` on `_request`), with no
    option to change it: this instance gets the same request function under gcsfs's own retry loop, bounded."""
    from gcsfs.retry import retry_request

    request = getattr(type(fs)._request, "__wrapped__", None)
    if request is not None and "_request" not in vars(fs):
        fs._request = types.MethodType(retry_request(retries=GCS_CLIENT_ATTEMPTS)(request), fs)


def with_bounded_s3_retries(options: dict) -> dict:
    """botocore's retries set to S3_CLIENT_ATTEMPTS in standard mode, unless the user chose their own."""
    config_kwargs = dict(options.get("config_kwargs") or {})
    config_kwargs.setdefault("retries", {"total_max_attempts": S3_CLIENT_ATTEMPTS, "mode": "standard"})
    return {**options, "config_kwargs": config_kwargs}




GOOGLE_HOSTS = ("googleapis.com", "google.com")


def is_google_endpoint(options: dict) -> bool:
    """Whether a gs:// client talks to Google's own service: no `endpoint_url` and no STORAGE_EMULATOR_HOST (the
    variable Google's clients read), or one on a Google host."""
    endpoint = options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST") or ""
    host = endpoint.split("://")[-1].split("/")[0].split(":")[0].lower()
    return not host or host.endswith(GOOGLE_HOSTS)


def plain_gcs_filesystem(uri: str, options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    """gcsfs's plain client, for an endpoint that is not Google's (an emulator, a GCS-compatible store).

    gcsfs's default class asks Google's gRPC Storage Control API for each bucket's layout (zonal, hierarchical
    namespace) before it reads or writes; another endpoint does not serve that API, and every call waited about
    60 s for the probe to give up. The layouts are Google's own features, so the plain client is the whole of
    what such an endpoint offers."""
    from gcsfs.core import GCSFileSystem

    return GCSFileSystem(**options), GCSFileSystem._strip_protocol(uri)
