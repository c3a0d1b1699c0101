"""Inputs and outputs on a real S3 server on loopback (moto's ThreadedMotoServer, as s3fs's own suite does).

A small fault-injecting HTTP proxy (tests/io/faulty_proxy.py) stands between the clients and moto where a test
needs a flaky store: it answers chosen requests with 503 SlowDown, resets the connection, cuts a response short,
or refuses a key with 403 AccessDenied, deterministically (every n-th request), and counts what it did.

Credentials come the way a user's do: planted in the environment before Ray starts (local Ray workers
inherit the environment of the process that starts Ray), never in the config. A planted secret is then
searched for in every object the jobs wrote, in everything they printed or logged, and in Ray's logs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import InputConfig
from pipeline.extract.items import DecodeSettings
from pipeline.extract.listing import list_images
from pipeline.extract.worker import ShardSettings, ShardTask, decoded_items, image_decoder
from pipeline.io import clients, faults, storage
from pipeline.output import layout
from tests.helpers import ACCESS_KEY_ID, PLANTED_SECRET, write_labelled_images
from tests.io.conftest import lose_commits_and_plant_an_orphan
from tests.io.faulty_proxy import FaultyProxy

pytestmark = pytest.mark.s3

OPTIONS_SECRET = "featurizeOptionsSecret+77d01c2aa9e3f5"  # a secret a user put into storage_options

@pytest.fixture(scope="module")
def ray_with_credentials(aws_environment):
    """A local Ray started after the credentials are in the environment, as `featurize extract` starts one
    for a user (a Ray started earlier, without them, is shut down first; `ray_local` starts a fresh one for
    the tests after this module)."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    session = Path(ray._private.worker._global_node.get_session_dir_path())  # logs, metadata, runtime envs
    yield session
    ray.shutdown()


def upload_images(s3, root: Path, destination: str) -> dict[str, Path]:
    """Real image files written by the tests, copied to S3; {s3 uri: local path}."""
    paths = write_labelled_images(root, num_classes=3, per_class=10)
    objects = {f"{destination}/{path.relative_to(root).as_posix()}": path for path in paths}
    s3.pipe({key: path.read_bytes() for key, path in objects.items()})
    return {f"s3://{key}": path for key, path in objects.items()}


def write_config(tmp_path: Path, **sections) -> Path:
    config = {"input": {"labels": "from_dirs"}, "model": {"weights": "none", "top_k": 2},
              "run": {"batch_size": 8, "shard_size": 7, "actors": 1, "cpus_per_actor": 1},
              "output": {}}
    for section, values in sections.items():
        config[section].update(values)
    path = tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(json.dumps(config))
    return path


def every_object(s3, prefix: str) -> dict[str, bytes]:
    s3.invalidate_cache()
    return {path: s3.cat_file(path) for path in s3.find(prefix)}


def read_success(s3, output_key: str) -> dict:
    s3.invalidate_cache()
    return json.loads(s3.cat_file(f"{output_key}/_SUCCESS"))


def read_rows(s3, output_key: str):
    success = read_success(s3, output_key)
    tables = [pq.read_table(io.BytesIO(s3.cat_file(f"{output_key}/{path}"))) for path in success["files"]]
    return pa.concat_tables(tables).to_pandas(), success


def ray_session_bytes(session: Path) -> bytes:
    """Every regular file Ray wrote for this session: worker and raylet logs, metadata, runtime envs."""
    return b"".join(path.read_bytes() for path in session.rglob("*") if path.is_file() and not path.is_symlink())


def assert_no_secret(*texts, secrets=(PLANTED_SECRET,)):
    for text in texts:
        data = text if isinstance(text, bytes) else str(text).encode()
        for secret in secrets:
            assert secret.encode() not in data


# --------------------------------------------------------------------------------------------------
# the storage layer against a real server
# --------------------------------------------------------------------------------------------------


def test_a_large_prefix_is_listed_page_by_page_through_a_flaky_store(s3, bucket, moto_endpoint):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]  # seed the server directly: 1,100 PUTs take ~30 s here
    for index in range(1100):
        backend.put_object(bucket, f"many/class_{index % 3}/image_{index:05d}.jpg", b"x")
    for index in range(5):
        backend.put_object(bucket, f"many/class_0/notes_{index}.txt", b"x")

    with FaultyProxy(moto_endpoint, fail_every=3) as proxy:
        options = proxy.options()
        listing = list_images(InputConfig(uri=(f"s3://{bucket}/many/",), labels="from_dirs",
                                          storage_options=options))
        assert listing.num_rows == 1100  # the .txt files are not images
        uris = listing.column("uri").to_pylist()
        assert uris == sorted(uris) and uris[0] == f"s3://{bucket}/many/class_0/image_00000.jpg"
        assert listing.column("label").to_pylist()[-1] == "class_2"
        assert proxy.counts["list pages"] >= 2 and proxy.counts["injected"] >= 1  # > 1000 keys: two pages

        globbed = list_images(InputConfig(uri=(f"s3://{bucket}/many/class_1/image_0001*.jpg",),
                                          storage_options=options))
        assert globbed.num_rows == len([i for i in range(10, 20) if i % 3 == 1])  # image_00010 .. 00019


def test_transient_faults_are_retried_per_object(s3, bucket, moto_endpoint):
    """503 SlowDown, connection resets and short reads, on S3 and on presigned https-style URLs."""
    payloads = {f"s3://{bucket}/blobs/{index:02d}.bin": os.urandom(20_000 + index) for index in range(12)}
    with FaultyProxy(moto_endpoint, fail_every=3, faults=("slowdown", "reset", "short")) as proxy:
        options = proxy.options()
        for uri, data in payloads.items():
            storage.write_bytes(uri, data, options)
        assert all(storage.read_bytes(uri, options) == data for uri, data in payloads.items())
        s3_faults = proxy.counts["injected"]

        # http(s) URLs have no client-side retries below ours: with_retries is what saves them
        signer = type(s3)(client_kwargs={"endpoint_url": proxy.url}, skip_instance_cache=True)
        retries_before = sum(faults.RETRIES.values())
        for uri, data in payloads.items():
            assert storage.read_bytes(signer.url(uri.removeprefix("s3://")), options) == data
        http_retries = sum(faults.RETRIES.values()) - retries_before

    assert s3_faults >= 5 and {"slowdown", "reset", "short"} <= set(proxy.counts)
    assert http_retries >= 1
    print(f"\n[s3 faults] {dict(proxy.counts)}; featurize retries on presigned URLs: {http_retries}")


def test_a_checksum_read_cut_short_part_way_is_retried_from_the_first_byte(s3, bucket, moto_endpoint):
    """A weights file is read in several ranged GETs; the second one cut short makes the read start again, and
    the checksum (frozen into the plan's fingerprint) must be the object's, not two partial reads run together."""
    data = os.urandom(3 * 2**20 + 12_345)
    s3.pipe(f"{bucket}/models/big.weights.h5", data)
    get = f"GET /{bucket}/models/big.weights.h5"
    with FaultyProxy(moto_endpoint, at={(get, 2): "short"}) as proxy:
        options = proxy.options(default_block_size=2**20)  # 1 MiB ranges: several GETs for one object
        checksum = storage.sha256_of_uri(f"s3://{bucket}/models/big.weights.h5", options)
    assert proxy.counts["short"] == 1 and proxy.requests[get] >= 3  # cut, then read again from the start
    assert checksum == hashlib.sha256(data).hexdigest()


def test_permanent_errors_are_not_retried(s3, bucket, moto_endpoint):
    s3.pipe(f"{bucket}/images/secret.png", b"private")
    with FaultyProxy(moto_endpoint, deny=("images/secret.png",)) as proxy:
        options = proxy.options()
        with pytest.raises(PermissionError) as denied:
            storage.read_bytes(f"s3://{bucket}/images/secret.png", options)
        assert faults.describe_error(denied.value) == "access denied" and proxy.counts["denied"] == 1
        with pytest.raises(FileNotFoundError) as missing:
            storage.read_bytes(f"s3://{bucket}/images/missing.png", options)
        assert faults.describe_error(missing.value) == "not found"
        # one GET each: no retry of a 403 or a 404
        assert proxy.requests == {f"GET /{bucket}/images/secret.png": 1, f"GET /{bucket}/images/missing.png": 1}


def test_a_store_that_keeps_failing_costs_a_bounded_number_of_requests(s3, bucket, moto_endpoint):
    """Retry layers do not multiply: featurize's attempts x botocore's, s3fs's own loop is off (it made 125)."""
    s3.pipe(f"{bucket}/images/busy.png", b"never served")
    with FaultyProxy(moto_endpoint, fail_every=1, faults=("slowdown",)) as proxy:
        started = time.perf_counter()
        with pytest.raises(OSError) as failed:
            storage.read_bytes(f"s3://{bucket}/images/busy.png", proxy.options())
        seconds = time.perf_counter() - started
    assert faults.describe_error(failed.value).startswith("still failing after retries")
    attempts = 5 * clients.S3_CLIENT_ATTEMPTS  # with_retries' default attempts x botocore's
    assert proxy.requests == {f"GET /{bucket}/images/busy.png": attempts}
    print(f"\n[dead store] {attempts} requests, {seconds:.1f} s before the error row")


def test_a_users_own_botocore_retries_are_kept(moto_endpoint):
    fs, _ = storage.filesystem("s3://bucket/key", {"config_kwargs": {"retries": {"max_attempts": 7}},
                                                   "client_kwargs": {"endpoint_url": moto_endpoint}})
    assert fs.config_kwargs["retries"] == {"max_attempts": 7} and fs.retries == 1
    fs, _ = storage.filesystem("s3a://bucket/key", {"config_kwargs": {"connect_timeout": 5},
                                                    "client_kwargs": {"endpoint_url": moto_endpoint}})
    assert fs.config_kwargs == {"connect_timeout": 5, "retries": {"total_max_attempts": clients.S3_CLIENT_ATTEMPTS,
                                                                  "mode": "standard"}}


def test_fetches_run_concurrently_inside_an_actor(s3, bucket, moto_endpoint, tmp_path):
    """Many small objects must not serialise on latency: 16 fetches of 0.5 s each (8 s in a row) through 8 fetch
    threads, while only 2 threads decode (a decode thread a core), one request per object."""
    images = upload_images(s3, tmp_path / "images", f"{bucket}/images")
    uris = sorted(images)[:16]
    with FaultyProxy(moto_endpoint, latency=0.5) as proxy:
        settings = ShardSettings(output_uri="unused", output_storage_options={},
                                 decode=DecodeSettings(proxy.options()), decode_threads=2, fetch_threads=8)
        task = ShardTask(shard=0, start=0, stop=len(uris), uris=uris, labels=[None] * len(uris))
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as decoders, ThreadPoolExecutor(8) as fetchers:
            items = list(decoded_items(task, image_decoder((32, 32), settings.decode), settings, decoders, window=16,
                                       fetchers=fetchers))
        elapsed = time.perf_counter() - started
    assert [item.uri for item in items] == uris and all(item.image.error is None for item in items)
    assert proxy.counts["most in flight"] >= 4, f"{elapsed:.2f} s: fetches were serialised"  # 8 threads, a slow store
    assert proxy.counts["requests"] == 16  # a GET each, no size probe first
    print(f"\n[s3 fetch] 16 objects x 0.5 s latency, 8 fetch threads, 2 decode threads: {elapsed:.2f} s "
          "(8 s one after another)")


# --------------------------------------------------------------------------------------------------
# `featurize extract` on S3
# --------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_s3_to_s3_through_a_store_failing_10_percent_then_resume(
        s3, bucket, moto_endpoint, ray_with_credentials, tiny_model, tmp_path, capfd, caplog):
    """Done-when: images on S3, features written back to it through a proxy failing every 10th request
    with 503 SlowDown: exit 0, one row per image, the planted secret in no output object and no log."""
    caplog.set_level(logging.DEBUG, logger="featurize")  # ours in full; botocore at the default INFO
    images = upload_images(s3, tmp_path / "images", f"{bucket}/images")
    output = f"{bucket}/features"
    with FaultyProxy(moto_endpoint, fail_every=10) as proxy:
        config = write_config(
            tmp_path, input={"uri": f"s3://{bucket}/images/", "storage_options": proxy.options()},
            model={"backbone": str(tiny_model)},
            output={"uri": f"s3://{output}", "storage_options": proxy.options()})
        started = time.perf_counter()
        assert main(["extract", "--config", str(config)]) == 0
        first_seconds = time.perf_counter() - started
        first_faults = proxy.counts["injected"]

        rows, success = read_rows(s3, output)
        assert len(rows) == len(images) == 30 and rows["uri"].is_unique
        assert set(rows["uri"]) == set(images) and (rows["status"] == "ok").all()
        assert rows.set_index("uri").loc[sorted(images), "label"].tolist() == [
            images[uri].parent.name for uri in sorted(images)]
        assert success["rows"] == {"total": 30, "ok": 30, "error": 0}
        assert success["shards"] == {"total": 5, "run": 5, "committed": 5}
        assert first_faults >= 3, proxy.counts

        # resume on S3 exactly as on disk: two commit records and _SUCCESS lost, an orphan left behind
        lose_commits_and_plant_an_orphan(s3, output, success["files"])
        assert main(["extract", "--config", str(config)]) == 0
        rows, resumed = read_rows(s3, output)
        assert resumed["shards"] == {"total": 5, "run": 2, "committed": 5}
        assert len(rows) == 30 and rows["uri"].is_unique and set(rows["uri"]) == set(images)
        assert [resumed["files"][i] for i in (0, 2, 4)] == [success["files"][i] for i in (0, 2, 4)]
        assert sorted(s3.ls(f"{output}/data", refresh=True)) == sorted(f"{output}/{path}" for path in resumed["files"])
        assert resumed["fingerprint"] == success["fingerprint"]

        assert main(["extract", "--config", str(config)]) == 0  # finished: nothing to do
        assert read_success(s3, output)["shards"]["run"] == 0
        total_faults = proxy.counts["injected"]
        total_requests = proxy.counts["requests"]

    # the planted secret (and the access key id) in no object the jobs wrote, and in nothing they said
    objects = every_object(s3, bucket)
    assert {f"{output}/_SUCCESS", f"{output}/_plan.json", f"{output}/_manifest.parquet"} <= set(objects)
    captured = capfd.readouterr()
    assert_no_secret(*objects.values(), captured.out, captured.err, caplog.text,
                     ray_session_bytes(ray_with_credentials), secrets=(PLANTED_SECRET, ACCESS_KEY_ID))
    print(f"\n[s3 done-when] 30 images, first run {first_seconds:.1f} s, {first_faults} faults injected; "
          f"all three runs: {total_faults} of {total_requests} requests failed with 503 SlowDown; "
          f"{len(objects)} objects scanned for the secret")


@pytest.mark.ray
def test_manifest_with_missing_denied_and_signed_urls(
        s3, bucket, moto_endpoint, ray_with_credentials, tiny_model, tmp_path, capfd, caplog):
    """A CSV manifest on S3 naming S3 keys and presigned URLs: a missing key and a denied key become error
    rows with their reasons; signatures and the keys given in storage_options never reach rows or logs."""
    caplog.set_level(logging.DEBUG, logger="featurize")  # ours in full; botocore at the default INFO
    images = upload_images(s3, tmp_path / "images", f"{bucket}/images")
    s3.put_file(str(tiny_model), f"{bucket}/models/tiny.keras")
    good = sorted(images)[:8]
    with FaultyProxy(moto_endpoint, fail_every=10, deny=("class_2/image_009",)) as proxy:
        signer = type(s3)(client_kwargs={"endpoint_url": proxy.url}, skip_instance_cache=True)
        signed = [signer.url(uri.removeprefix("s3://")) for uri in sorted(images)[10:12]]
        signatures = [url.split("Signature=", 1)[1].split("&", 1)[0] for url in signed]
        entries = [(uri, images[uri].parent.name) for uri in good]
        entries += [(f"s3://{bucket}/images/class_0/missing.jpg", "class_0"),
                    (f"s3://{bucket}/images/class_2/image_009.png", "class_2")]
        entries += [(url, "class_1") for url in signed]
        manifest = "uri,kind\n" + "".join(f"{uri},{label}\n" for uri, label in entries)
        s3.pipe(f"{bucket}/lists/manifest.csv", manifest.encode())
        with_keys = proxy.options(key=ACCESS_KEY_ID, secret=OPTIONS_SECRET)  # what the README advises against
        config = write_config(
            tmp_path, input={"uri": f"s3://{bucket}/lists/manifest.csv", "labels": "kind",
                             "storage_options": with_keys},
            model={"backbone": f"s3://{bucket}/models/tiny.keras"},
            run={"max_error_rate": 0.5},
            output={"uri": f"s3://{bucket}/features", "storage_options": with_keys})
        assert main(["extract", "--config", str(config)]) == 0
        assert proxy.counts["denied"] == 1  # a 403 is not retried

    rows, success = read_rows(s3, f"{bucket}/features")
    assert len(rows) == len(entries) == 12 and rows["uri"].is_unique
    assert success["rows"] == {"total": 12, "ok": 10, "error": 2}
    errors = rows[rows["status"] == "error"].set_index("uri")["error"].to_dict()
    assert errors == {f"s3://{bucket}/images/class_0/missing.jpg": "fetch failed: not found",
                      f"s3://{bucket}/images/class_2/image_009.png": "fetch failed: access denied"}
    signed_rows = rows[rows["uri"].str.startswith("http")]
    assert len(signed_rows) == 2 and (signed_rows["status"] == "ok").all()
    assert all("Signature=***" in uri for uri in signed_rows["uri"])
    assert success["provenance"]["backbone"] == f"s3://{bucket}/models/tiny.keras"

    objects = every_object(s3, f"{bucket}/features")
    captured = capfd.readouterr()
    logs = ray_session_bytes(ray_with_credentials)
    assert_no_secret(*objects.values(), captured.out, captured.err, caplog.text, logs,
                     secrets=(PLANTED_SECRET, OPTIONS_SECRET))
    # the frozen manifest keeps the URLs as given (a resume fetches them again); nothing else holds a signature
    assert_no_secret(*(data for path, data in objects.items() if not path.endswith(layout.MANIFEST_FILE)),
                     captured.out, captured.err, caplog.text, secrets=signatures)


@pytest.mark.ray
def test_missing_bucket_or_bad_credentials_stop_the_job_at_once(
        s3, bucket, moto_endpoint, ray_with_credentials, tiny_model, tmp_path, capfd, monkeypatch):
    s3.pipe(f"{bucket}/images/class_0/a.png", b"x")
    endpoint = {"client_kwargs": {"endpoint_url": moto_endpoint}}

    def extract(**sections) -> tuple[int, float, str]:
        config = write_config(tmp_path, model={"backbone": str(tiny_model)}, **sections)
        started = time.perf_counter()
        code = main(["extract", "--config", str(config)])
        seconds = time.perf_counter() - started
        captured = capfd.readouterr()
        assert_no_secret(captured.out, captured.err)
        return code, seconds, " ".join(captured.err.split())

    code, seconds, message = extract(input={"uri": f"s3://{bucket}/images/", "storage_options": endpoint},
                                     output={"uri": "s3://no-such-bucket-featurize/features",
                                             "storage_options": endpoint})
    assert code == 2 and seconds < 20
    assert "output.uri: cannot write to s3://no-such-bucket-featurize/features: bucket not found" in message
    assert "create it or fix the URI" in message

    code, seconds, message = extract(input={"uri": "s3://no-such-input-bucket/images/", "storage_options": endpoint},
                                     output={"uri": f"s3://{bucket}/out-1", "storage_options": endpoint})
    assert code == 2 and seconds < 20
    assert "the bucket 'no-such-input-bucket' does not exist" in message
    assert not s3.find(f"{bucket}/out-1")  # nothing written: the probe is gone

    with FaultyProxy(moto_endpoint, refuse_all=True) as proxy:
        code, seconds, message = extract(input={"uri": f"s3://{bucket}/images/", "storage_options": proxy.options()},
                                         output={"uri": f"s3://{bucket}/out-2", "storage_options": proxy.options()})
    assert code == 2 and seconds < 20 and proxy.counts["refused"] == 1  # refused credentials: no retry
    assert "output.uri: cannot write to s3://" in message and "access denied" in message
    assert "does not exist in our records" in message

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fresh = {**endpoint, "skip_instance_cache": True}  # a client that has not resolved credentials yet
    code, seconds, message = extract(input={"uri": f"s3://{bucket}/images/", "storage_options": fresh},
                                     output={"uri": f"s3://{bucket}/out-3", "storage_options": fresh})
    assert code == 2 and seconds < 20
    assert "no credentials found" in message and "AWS_ACCESS_KEY_ID" in message and "anon: true" in message


def test_anonymous_access_to_a_public_object(s3, bucket, moto_endpoint):
    s3.pipe(f"{bucket}/public/a.png", b"public bytes", ACL="public-read")
    anonymous = {"anon": True, "client_kwargs": {"endpoint_url": moto_endpoint}}
    assert storage.read_bytes(f"s3://{bucket}/public/a.png", anonymous) == b"public bytes"
