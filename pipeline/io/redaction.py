"""Secrets: what counts as one, and keeping them out of every text that leaves the process.

Used wherever text goes out (logs, error rows, _SUCCESS, messages), not only by storage code; public_options
strips credentials from storage_options before they travel with Ray tasks."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

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

# Where credentials stand in text: user info in a URL, name=value parameters, 'name': 'value' items of a
# printed mapping, HTTP headers.
URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@?#'\"]+@")
PARAMETER = re.compile(r"(?<![\w.\-])([\w.\-]+)=([^&\s'\"#,;)]+)")
MAPPING_ITEM = re.compile(r"""(['"])([\w.\-]+)\1(\s*:\s*)(['"])(.*?)\4""")
HEADER = re.compile(r"(?i)\b(authorization|cookie|x-amz-security-token)(\s*:\s*)([^\r\n,'\"]+)")

_remembered_secrets: set[str] = set()  # values given as credentials in storage_options, in this process


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
