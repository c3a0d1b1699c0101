"""The fsspec edge without a server: redaction of secrets, options per protocol, error classes, retries."""

from __future__ import annotations

import errno
import http.client

import aiohttp
import pytest
from botocore.exceptions import ClientError, NoCredentialsError
from multidict import CIMultiDict, CIMultiDictProxy
from s3fs.errors import translate_boto_error
from yarl import URL

from pipeline.io import clients, faults, redaction, storage

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYPLANTED"


def client_error(code: str, status: int, message: str = "boom") -> ClientError:
    """botocore's own error object, as a real S3 response produces it."""
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def http_error(status: int) -> aiohttp.ClientResponseError:
    """What fsspec's HTTP filesystem raises for a non-404 error status."""
    url = URL("https://images.example.com/a.jpg")
    info = aiohttp.RequestInfo(url, "GET", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=status, message=http.client.responses[status])


def s3fs_error(code: str, status: int, message: str = "boom") -> BaseException:
    """What s3fs raises for that response: a Python error whose cause is the ClientError."""
    return translate_boto_error(client_error(code, status, message))


@pytest.mark.parametrize("text, hidden, kept", [
    ("https://alice:hunter2hunter2@example.com/a.jpg", "hunter2", "example.com/a.jpg"),
    ("https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F2024"
     "&X-Amz-Date=20240101T000000Z&X-Amz-SignedHeaders=host&X-Amz-Signature=0f1e2d3c4b5a69788796a5b4c3d2e1f0",
     "0f1e2d3c4b5a", "X-Amz-Date=20240101T000000Z"),
    ("http://127.0.0.1:5000/b/k.bin?AWSAccessKeyId=AKIAEXAMPLE&Signature=nqZpwvBO%3D&Expires=1795863042",
     "nqZpwvBO", "Expires=1795863042"),
    ("https://acct.blob.core.windows.net/c/x.png?sv=2022-11-02&sig=AbCdEf%2BGh%3D&se=2030-01-01",
     "AbCdEf", "sv=2022-11-02"),
    ("Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20240101, SignedHeaders=host, Signature=deadbeef",
     "deadbeef", "SignedHeaders=host"),
    ("{'key': 'AKIAEXAMPLE', 'secret': 'abc', 'client_kwargs': {'endpoint_url': 'http://x'}}",
     "AKIAEXAMPLE", "'endpoint_url': 'http://x'"),
    ("aws_secret_access_key=verysecret region=us-east-1", "verysecret", "region=us-east-1"),
])
def test_redact_removes_credentials_and_keeps_the_rest(text, hidden, kept):
    redacted = redaction.redact(text)
    assert hidden not in redacted and kept in redacted and redaction.REDACTED in redacted


def test_redact_scrubs_secrets_from_the_environment_and_from_storage_options(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert redaction.redact(f"botocore said: {SECRET} is wrong") == "botocore said: *** is wrong"
    redaction.remember_secrets({"client_kwargs": {"aws_session_token": "session-token-from-options"}})
    assert "session-token-from-options" not in redaction.redact("token session-token-from-options leaked")
    redaction.remember_secrets({"token": "anon"})  # too short to be a secret: words stay readable
    assert redaction.redact("anonymous access") == "anonymous access"


@pytest.mark.parametrize("uri", ["s3://bucket/a@b.jpg", "/tmp/x@y/a.jpg", "gs://b/images/0001.png",
                                 "https://example.com/a.jpg?width=200"])
def test_plain_uris_are_kept_as_they_are(uri):
    assert redaction.redact_uri(uri) == uri


def test_public_options_travel_without_credentials():
    options = {"key": "AKIAEXAMPLE", "secret": SECRET, "anon": False, "profile": "research",
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": "tok"},
               "https": {"headers": {"Authorization": "Bearer xyz", "User-Agent": "featurize"}}}
    public = redaction.public_options(options)
    assert public == {"anon": False, "profile": "research", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
                      "https": {"headers": {"User-Agent": "featurize"}}}
    assert options["secret"] == SECRET  # the original is untouched


def test_storage_options_flat_or_per_protocol():
    flat = {"anon": True, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert storage.options_for("s3://bucket/key", flat) == flat
    assert storage.options_for("s3a://bucket/key", flat) == flat
    assert storage.options_for("https://example.com/a.jpg", flat) == {}  # S3 options would break aiohttp
    assert storage.options_for("/data/a.jpg", flat) == {}
    mixed = {"anon": True, "s3": {"profile": "research"}, "https": {"headers": {"User-Agent": "featurize"}}}
    assert storage.options_for("s3://bucket/key", mixed) == {"anon": True, "profile": "research"}
    assert storage.options_for("http://example.com/a.jpg", mixed) == {"headers": {"User-Agent": "featurize"}}
    assert storage.options_for("gs://bucket/key", mixed) == {"anon": True}


def test_an_uninstalled_backend_says_what_to_install(monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(clients, "url_to_fs", missing)
    with pytest.raises(faults.StorageError, match=r"featurize\[gcs\]"):
        storage.filesystem("gs://bucket/images/")


TRANSIENT = [
    s3fs_error("SlowDown", 503, "Please reduce your request rate."),
    s3fs_error("503", 503), s3fs_error("InternalError", 500), s3fs_error("RequestTimeout", 400),
    s3fs_error("502", 502),  # no s3fs mapping: a generic OSError(EIO) whose cause says 502
    client_error("SlowDown", 503), client_error("ThrottlingException", 400),
    OSError(errno.EBUSY, "Please reduce your request rate."), ConnectionResetError(errno.ECONNRESET, "reset"),
    TimeoutError("read timed out"), http.client.IncompleteRead(b"abc", 10),
    aiohttp.ClientPayloadError("Response payload is not completed"), aiohttp.ServerDisconnectedError(),
    http_error(503),
]
PERMANENT = [
    s3fs_error("NoSuchKey", 404), s3fs_error("AccessDenied", 403), s3fs_error("InvalidAccessKeyId", 403),
    s3fs_error("NoSuchBucket", 404), client_error("AccessDenied", 403), FileNotFoundError("s3://b/k"),
    PermissionError("denied"), NoCredentialsError(),
    http_error(403),
    ValueError("not an image"), IsADirectoryError("s3://b/dir"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda error: f"{type(error).__name__}-{error}"[:60])
def test_transient_errors_are_retried(error):
    assert faults.is_transient(error)


@pytest.mark.parametrize("error", PERMANENT, ids=lambda error: f"{type(error).__name__}-{error}"[:60])
def test_permanent_errors_are_not_retried(error):
    assert not faults.is_transient(error)


@pytest.mark.parametrize("error, reason", [
    (s3fs_error("NoSuchKey", 404), "not found"), (FileNotFoundError("x"), "not found"),
    (http_error(404), "not found"),
    (s3fs_error("NoSuchBucket", 404, "The specified bucket does not exist"), "bucket not found"),
    (s3fs_error("AccessDenied", 403), "access denied"), (s3fs_error("InvalidAccessKeyId", 403), "access denied"),
    (http_error(403), "access denied"),
    (NoCredentialsError(), "no credentials found"),
])
def test_permanent_errors_have_short_reasons(error, reason):
    assert faults.describe_error(error) == reason


@pytest.mark.parametrize("uri, names", [
    ("s3://bucket/out", ("AWS_ACCESS_KEY_ID", "anon: true")),
    ("gs://bucket/out", ("GOOGLE_APPLICATION_CREDENTIALS", "token: anon")),
    ("az://container/out", ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN")),
])
def test_missing_credentials_are_explained_in_each_stores_words(uri, names):
    message = str(faults.access_error("output.uri", uri, "write to", NoCredentialsError()))
    assert message.startswith(f"output.uri: cannot write to {uri}: no credentials found")
    assert all(name in message for name in names), message


def test_a_write_that_finds_nothing_on_an_object_store_names_the_bucket(tmp_path):
    remote = str(faults.access_error("output.uri", "gs://gone/out", "write to", FileNotFoundError()))
    assert "bucket not found" in remote and "create it or fix the URI" in remote
    local = str(faults.access_error("output.uri", str(tmp_path / "out"), "write to", FileNotFoundError()))
    assert ": not found;" in local


def test_other_errors_are_described_without_secrets(monkeypatch):
    monkeypatch.setenv("AZURE_STORAGE_KEY", SECRET)
    reason = faults.describe_error(RuntimeError(f"bad header {SECRET}"))
    assert reason == "RuntimeError: bad header ***"
    assert faults.describe_error(s3fs_error("SlowDown", 503, "Please reduce your request rate.")).startswith(
        "still failing after retries")


def test_with_retries_retries_transient_errors_then_succeeds():
    outcomes = [s3fs_error("SlowDown", 503), ConnectionResetError(), b"bytes"]
    before = faults.RETRIES["SlowDown"]

    def operation():
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    assert faults.with_retries(operation, base_delay=0) == b"bytes"
    assert faults.RETRIES["SlowDown"] == before + 1


def test_with_retries_stops_at_once_on_permanent_errors_and_gives_up_after_attempts():
    calls = []

    def denied():
        calls.append(1)
        raise s3fs_error("AccessDenied", 403)

    with pytest.raises(PermissionError):
        faults.with_retries(denied, base_delay=0)
    assert len(calls) == 1

    def throttled():
        calls.append(1)
        raise s3fs_error("SlowDown", 503)

    calls.clear()
    with pytest.raises(OSError):
        faults.with_retries(throttled, attempts=3, base_delay=0)
    assert len(calls) == 3


def test_access_errors_say_what_to_fix_without_the_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    error = faults.access_error("output.uri", "s3://results/features", "write to",
                                 s3fs_error("InvalidAccessKeyId", 403, "The AWS Access Key Id you provided does "
                                            f"not exist in our records ({SECRET})."))
    text = str(error)
    assert isinstance(error, ValueError) and SECRET not in text
    assert "output.uri: cannot write to s3://results/features: access denied" in text
    assert "does not exist in our records" in text and "output.storage_options" in text
    missing = str(faults.access_error("input.uri", "s3://nope/images/", "read",
                                       s3fs_error("NoSuchBucket", 404, "The specified bucket does not exist")))
    assert "bucket not found" in missing and "create it or fix the URI" in missing


def test_object_store_semantics_on_the_memory_filesystem():
    base = "memory://featurize-test-storage/out"
    storage.check_writable(base)
    assert storage.list_names(base) == []  # the probe is gone
    storage.write_bytes(storage.join(base, "_commits", "shard-00000.json"), b"{}")
    storage.write_bytes(storage.join(base, "data", "shard-00000-abc.parquet"), b"data")
    assert storage.list_names(storage.join(base, "_commits")) == ["shard-00000.json"]
    assert storage.read_bytes(storage.join(base, "data", "shard-00000-abc.parquet")) == b"data"
    found = storage.find_files(base)  # memory:// lists as memory:///...: the same objects
    assert [uri.split("/out/", 1)[1] for uri in found] == ["_commits/shard-00000.json", "data/shard-00000-abc.parquet"]
    assert storage.read_bytes(found[1]) == b"data"
    assert [uri.split("/out/", 1)[1] for uri in storage.find_files(f"{base}/data/*.parquet")] == [
        "data/shard-00000-abc.parquet"]
    storage.remove(base, recursive=True)
    assert not storage.exists(storage.join(base, "data", "shard-00000-abc.parquet"))


def test_check_writable_on_local_disk(tmp_path):
    storage.check_writable(str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_ray_tasks_carry_no_credentials():
    """Shard settings go with every task: they hold the endpoint but not the keys (actors get those once)."""
    import pickle

    from pipeline.config import ExtractConfig, InputConfig, OutputConfig
    from pipeline.extract.driver import Driver
    from pipeline.extract.progress import ProgressReporter

    options = {"key": "AKIAEXAMPLEKEYID", "secret": SECRET, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    config = ExtractConfig(input=InputConfig(uri=("s3://bucket/images/",), storage_options=options),
                           output=OutputConfig(uri="s3://bucket/features", storage_options=options)).validate()
    settings = pickle.dumps(Driver(config, ProgressReporter(False)).settings)
    assert SECRET.encode() not in settings and b"AKIAEXAMPLEKEYID" not in settings
    assert b"http://127.0.0.1:9000" in settings


def test_a_failed_local_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Local outputs and the LiteRT model cache share this write: disk full leaves neither a file nor a temp."""
    def disk_full(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        storage.write_local_atomically(str(tmp_path / "cache" / "model.tflite"), b"flatbuffer")
    assert list((tmp_path / "cache").iterdir()) == []
