"""Object-store emulators on loopback, started by the tests, one `Store` each for the scenario table.

S3: moto's ThreadedMotoServer. Google Cloud Storage: gcp-storage-emulator, in this process on its own thread.
Azure Blob: Azurite, a Node child process installed by the README's setup into `.azurite/`.

Credentials come the way each store's users set them, planted in the environment before anything reads it:
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; a service-account file (GOOGLE_APPLICATION_CREDENTIALS, a real RSA key)
whose OAuth token a local token endpoint hands out and the fault proxy checks, with STORAGE_EMULATOR_HOST; an
Azure connection string (AZURE_STORAGE_CONNECTION_STRING) holding an account key that Azurite checks
(AZURITE_ACCOUNTS). Each store's planted secret is then searched for in everything the jobs wrote and said.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import pytest

from pipeline.output import layout
from tests.helpers import plant_aws_credentials
from tests.io.faulty_proxy import S3_REPLIES, XML, FaultyProxy, Replies, respond

REPOSITORY = Path(__file__).resolve().parents[2]
AZURITE = REPOSITORY / ".azurite" / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"


AWS_ACCESS_KEY_ID = "AKIAFEATURIZECLOUDS"
AWS_SECRET = "featurizePlantedAwsSecret+c41d7e09a2"
GCS_ACCESS_TOKEN = "ya29.featurizePlantedGcsToken-5e0b9d13f7"  # what the token endpoint hands out
AZURE_ACCOUNT = "featurize"
AZURE_KEY = base64.b64encode(b"featurizePlantedAzureKey+8a2f61c09d").decode()


def json_error(status: int, reason: str, message: str) -> tuple[int, tuple, bytes]:
    body = {"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}}
    return status, (("Content-Type", "application/json"),), json.dumps(body).encode()


def azure_error(status: int, code: str, message: str) -> tuple[int, tuple, bytes]:
    body = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return status, (*XML, ("x-ms-error-code", code)), body.encode()


# GCS throttles with 429 rateLimitExceeded (and 503); Azure with 503 ServerBusy (and 500 OperationTimedOut)
GCS_REPLIES = Replies(
    slowdown=json_error(429, "rateLimitExceeded", "The rate of change requests to the object is too high."),
    denied=json_error(403, "forbidden", "featurize@featurize-test.iam.gserviceaccount.com does not have "
                                        "storage.objects.get access to the Google Cloud Storage object."),
    refused=json_error(401, "authError", "Invalid Credentials"),
    list_marker="/o?", next_page_marker="pageToken=")
AZURE_REPLIES = Replies(
    slowdown=azure_error(503, "ServerBusy", "The server is currently unable to receive requests. Please retry."),
    denied=azure_error(403, "AuthorizationPermissionMismatch",
                       "This request is not authorized to perform this operation using this permission."),
    refused=azure_error(403, "AuthenticationFailed", "Server failed to authenticate the request."),
    list_marker="comp=list", next_page_marker="marker=")


@dataclass
class Store:
    """One object store behind its emulator, as the scenario tests see it."""

    name: str  # s3 | gcs | azure
    scheme: str  # the URI scheme users write
    endpoint: str  # the emulator's URL
    replies: Replies
    secrets: tuple[str, ...]  # planted: none may appear in any output object, log line or message
    endpoint_options: Callable[[str], dict]  # storage_options for an endpoint (the emulator or a proxy before it)
    proxy_class: type = FaultyProxy
    authorized: Callable | None = None  # the proxy's check of credentials the emulator does not check
    seed: Callable[[dict], None] | None = None  # many objects at once, straight into the emulator
    environment_options: dict | None = None  # where credentials and endpoint come from the environment alone

    def put_many(self, objects: dict[str, bytes]) -> None:
        """{bucket/key: bytes} written fast (the emulator's own storage where it has one in this process)."""
        if self.seed is not None:
            self.seed(objects)
        else:
            self.filesystem().pipe(objects)

    def options(self, endpoint: str | None = None, **extra) -> dict:
        return {**self.endpoint_options(endpoint or self.endpoint), **extra}

    def proxy(self, **behaviour) -> FaultyProxy:
        return self.proxy_class(self.endpoint, replies=self.replies, authorized=self.authorized, **behaviour)

    def filesystem(self):
        """A fresh client straight to the emulator (seeding and checking, not under test)."""
        from pipeline.io import storage

        return storage.filesystem(f"{self.scheme}://x", {**self.options(), "skip_instance_cache": True})[0]

    def new_bucket(self) -> str:
        name = f"featurize-{uuid.uuid4().hex[:10]}"
        self.filesystem().mkdir(name)
        return name

    def uri(self, path: str) -> str:
        return f"{self.scheme}://{path}"


class AzureProxy(FaultyProxy):
    """The fault proxy for Azure, asking for pages of 1,000 blobs where the client asks for none (the service's
    default page is 5,000: more objects than a test should write to cross a page)."""

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.command == "GET" and self.is_listing(handler.path) and "maxresults=" not in handler.path:
            handler.path += "&maxresults=1000"
        super().handle(handler)


class GcsProxy(FaultyProxy):
    """The fault proxy for GCS, which also pages listings as GCS does (`maxResults`, `pageToken`): the emulator
    answers every listing in one page."""

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        query = dict(parse_qsl(urlsplit(handler.path).query))
        if handler.command == "GET" and self.is_listing(handler.path) and "maxResults" in query:
            handler.page = (int(query.get("pageToken", 0)), int(query["maxResults"]))  # the emulator ignores both
        super().handle(handler)

    def reply_body(self, handler: BaseHTTPRequestHandler, data: bytes) -> bytes:
        page = getattr(handler, "page", None)
        handler.page = None
        if page is None:
            return data
        start, size = page
        listing = json.loads(data)
        items = listing.get("items", [])
        listing["items"] = items[start:start + size]
        if start + size < len(items):
            listing["nextPageToken"] = str(start + size)
        if start:
            listing.pop("prefixes", None)
        return json.dumps(listing).encode()


def has_gcs_token(headers) -> bool:
    """GCS refuses (401) a request without the bearer token its OAuth endpoint issued; the emulator checks none."""
    return headers is not None and headers.get("Authorization") == f"Bearer {GCS_ACCESS_TOKEN}"


def lose_commits_and_plant_an_orphan(fs, output: str, committed_files: list[str]) -> None:
    """What a crash leaves on a store: the commit records of shards 1 and 3 and `_SUCCESS` gone, and a data
    file of shard 2 that no commit record names (an orphan)."""
    for shard in (1, 3):
        fs.rm(f"{output}/{layout.commit_path(shard)}")
    fs.rm(f"{output}/_SUCCESS")
    fs.pipe(f"{output}/data/shard-00002-deadbeef0000.parquet", fs.cat_file(f"{output}/{committed_files[2]}"))


# --------------------------------------------------------------------------------------------------
# credentials as users set them
# --------------------------------------------------------------------------------------------------


class TokenEndpoint:
    """Google's OAuth token endpoint, for a service-account file whose `token_uri` names it: any signed JWT
    assertion gets GCS_ACCESS_TOKEN (google-auth signs it with the file's private key before sending)."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.dumps({"access_token": GCS_ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"})
                respond(self, 200, [("Content-Type", "application/json")], body.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def service_account_file(directory: Path, token_uri: str) -> tuple[Path, str]:
    """A service-account key file as the GCP console downloads it, with a real RSA key; (path, private key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    path = directory / "service-account.json"
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "featurize-test", "private_key_id": uuid.uuid4().hex,
        "private_key": private_key, "client_email": "featurize@featurize-test.iam.gserviceaccount.com",
        "client_id": "1234567890", "token_uri": token_uri}))
    return path, private_key


def azure_connection_string(endpoint: str, key: str = AZURE_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={endpoint}/{AZURE_ACCOUNT};")


def azure_sas_connection_string(endpoint: str, sas_token: str) -> str:
    return f"BlobEndpoint={endpoint}/{AZURE_ACCOUNT};SharedAccessSignature={sas_token}"


def azure_account_sas(key: str = AZURE_KEY) -> str:
    """An account SAS for blobs, read/write/list/delete, valid one hour: what a user is handed instead of a key."""
    import datetime

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    return generate_account_sas(
        AZURE_ACCOUNT, key, ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, write=True, delete=True, list=True, add=True, create=True),
        expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))


# --------------------------------------------------------------------------------------------------
# emulators
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud_environment(tmp_path_factory) -> Iterator[dict]:
    """Every store's credentials in the environment, as users set them (no profile files, no metadata servers)."""
    directory = tmp_path_factory.mktemp("credentials")
    nowhere = str(directory / "missing")
    tokens = TokenEndpoint()
    key_file, private_key = service_account_file(directory, tokens.url)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
                     "STORAGE_EMULATOR_HOST"):
            patch.delenv(name, raising=False)
        plant_aws_credentials(patch, AWS_ACCESS_KEY_ID, AWS_SECRET, nowhere)
        patch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
        patch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")  # no metadata server to wait for
        patch.setenv("CLOUDSDK_CONFIG", nowhere)
        yield {"patch": patch, "gcs_private_key": private_key}
    tokens.close()


@pytest.fixture(scope="module")
def s3_store(cloud_environment) -> Iterator[Store]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    def seed(objects: dict[str, bytes]) -> None:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        for path, data in objects.items():
            s3_backends[DEFAULT_ACCOUNT_ID]["aws"].put_object(*path.split("/", 1), data)

    yield Store("s3", "s3", f"http://{host}:{port}", S3_REPLIES, (AWS_SECRET, AWS_ACCESS_KEY_ID),
                lambda endpoint: {"client_kwargs": {"endpoint_url": endpoint}}, seed=seed)
    server.stop()


@pytest.fixture(scope="module")
def gcs_store(cloud_environment) -> Iterator[Store]:
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    endpoint = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
    # the usual switch of every Google client to an emulator; the tests' storage_options name their proxy
    cloud_environment["patch"].setenv("STORAGE_EMULATOR_HOST", endpoint)
    private_key_body = cloud_environment["gcs_private_key"].splitlines()[5]  # a line of the key's base64

    def seed(objects: dict[str, bytes]) -> None:
        from gcp_storage_emulator.handlers.objects import _checksums, _make_object_resource

        storage = server._storage  # its create_file rewrites its whole index each time: once here
        for path, data in objects.items():
            bucket, name = path.split("/", 1)
            resource = _make_object_resource(endpoint, bucket, name, "application/octet-stream", str(len(data)))
            storage._store.write_bytes(storage._object_path(bucket, name), data)
            storage.objects.setdefault(bucket, {})[name] = _checksums(data, resource)
        storage._write_config_to_file()

    yield Store("gcs", "gs", endpoint, GCS_REPLIES, (GCS_ACCESS_TOKEN, private_key_body),
                lambda url: {"endpoint_url": url, "project": "featurize-test"}, proxy_class=GcsProxy,
                authorized=has_gcs_token, seed=seed, environment_options={"project": "featurize-test"})
    server.stop()


@pytest.fixture(scope="module")
def azure_store(cloud_environment, tmp_path_factory) -> Iterator[Store]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Azurite needs Node.js (20 or later): install node, then the README's setup command")
    if not AZURITE.exists():
        pytest.fail(f"Azurite is not installed at {AZURITE.parent}: run `npm install --prefix .azurite azurite@3` "
                    "(part of the README's setup command)")
    workspace = tmp_path_factory.mktemp("azurite")
    process = subprocess.Popen(
        [node, str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence", "--silent",
         "--skipApiVersionCheck", "--loose", "--disableTelemetry"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workspace,
        env={**os.environ, "AZURITE_ACCOUNTS": f"{AZURE_ACCOUNT}:{AZURE_KEY}"})
    endpoint = None
    for line in process.stdout:  # "Azurite Blob service successfully listens on http://127.0.0.1:PORT"
        if match := re.search(r"listens on (http://[\d.]+:\d+)", line):
            endpoint = match[1]
            break
    if endpoint is None:
        process.kill()
        pytest.fail(f"Azurite did not start: {process.stdout.read()}")
    threading.Thread(target=process.stdout.read, daemon=True).start()  # drain it
    # the account key in the environment; storage_options carry a SAS (a SharedKey signature covers the query,
    # so only SAS requests survive the proxy's paging)
    cloud_environment["patch"].setenv("AZURE_STORAGE_CONNECTION_STRING", azure_connection_string(endpoint))
    sas_token = azure_account_sas()
    signature = dict(parse_qsl(sas_token))["sig"]
    yield Store("azure", "az", endpoint, AZURE_REPLIES, (AZURE_KEY, signature, quote(signature, safe="")),
                lambda url: {"connection_string": azure_sas_connection_string(url, sas_token)},
                proxy_class=AzureProxy, environment_options={})
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(params=["s3", "gcs", "azure"])
def store(request) -> Store:
    """Each store of the scenario table in turn, behind its own emulator."""
    return request.getfixturevalue(f"{request.param}_store")
