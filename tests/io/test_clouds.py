"""One scenario table, run against S3, Google Cloud Storage and Azure Blob, each behind its own real emulator
(tests/io/conftest.py): moto, gcp-storage-emulator, Azurite, with the fault proxy in front where a test needs a
flaky or strict store. Credentials come the way each store's users set them; every store's planted secret is
searched for in every object the jobs wrote, in everything they printed or logged, and in Ray's logs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
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
from pipeline.io import storage
from tests.helpers import write_labelled_images
from tests.io.conftest import lose_commits_and_plant_an_orphan
from tests.io.test_s3 import ray_session_bytes, write_config

pytestmark = pytest.mark.clouds


def upload_images(store, root: Path, destination: str, per_class: int = 4) -> dict[str, Path]:
    """Real image files written by the tests, copied to the store; {store URI: local path}."""
    paths = write_labelled_images(root, num_classes=3, per_class=per_class)
    objects = {f"{destination}/{path.relative_to(root).as_posix()}": path for path in paths}
    store.filesystem().pipe({key: path.read_bytes() for key, path in objects.items()})
    return {store.uri(key): path for key, path in objects.items()}


def every_object(store, prefix: str) -> dict[str, bytes]:
    fs = store.filesystem()
    return {path: fs.cat_file(path) for path in fs.find(prefix)}


def read_rows(store, output: str):
    fs = store.filesystem()
    success = json.loads(fs.cat_file(f"{output}/_SUCCESS"))
    tables = [pq.read_table(io.BytesIO(fs.cat_file(f"{output}/{path}"))) for path in success["files"]]
    return pa.concat_tables(tables).to_pandas(), success


def assert_no_secret(store, *texts):
    for text in texts:
        data = text if isinstance(text, bytes) else str(text).encode()
        for secret in store.secrets:
            assert secret.encode() not in data, f"a planted {store.name} secret leaked"


@pytest.fixture(scope="module")
def ray_with_credentials(request, cloud_environment):
    """A local Ray started after every store's credentials are in the environment, as `featurize extract`
    starts one for a user (local Ray workers inherit the environment of the process that starts Ray)."""
    import ray

    for emulator in ("gcs_store", "azure_store"):  # each sets its own variables; a skipped one skips no other
        with contextlib.suppress(pytest.skip.Exception):
            request.getfixturevalue(emulator)
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield Path(ray._private.worker._global_node.get_session_dir_path())
    ray.shutdown()


# --------------------------------------------------------------------------------------------------
# the storage layer against each store
# --------------------------------------------------------------------------------------------------


def test_listing_crosses_pages(store):
    """More than 1,000 objects under a prefix (class_0): listed page by page (1,000 a page), every image found once."""
    bucket = store.new_bucket()
    store.put_many({f"{bucket}/many/class_{0 if index < 1002 else index % 3}/image_{index:05d}.jpg": b"x"
                    for index in range(1005)}
                   | {f"{bucket}/many/class_0/notes_{index}.txt": b"x" for index in range(3)})
    with store.proxy() as proxy:
        started = time.perf_counter()
        listing = list_images(InputConfig(uri=(store.uri(f"{bucket}/many/"),), labels="from_dirs",
                                          storage_options=store.options(proxy.url)))
        seconds = time.perf_counter() - started
    assert listing.num_rows == 1005  # the .txt files are not images
    uris = listing.column("uri").to_pylist()
    assert uris == sorted(uris) and uris[0] == store.uri(f"{bucket}/many/class_0/image_00000.jpg")
    assert listing.column("label").to_pylist()[-1] == "class_2"
    assert proxy.counts["next pages"] >= 1, proxy.requests
    print(f"\n[{store.name} listing] 1,008 objects, {dict(proxy.counts)}, {seconds:.1f} s")


def test_transient_faults_are_retried(store):
    """The store's throttling reply (S3 503 SlowDown, GCS 429 rateLimitExceeded, Azure 503 ServerBusy) is
    retried: every object written and read back whole. One fault only: Azure's client waits 15 s before its
    first retry (azure-storage-blob's ExponentialRetry, which adlfs gives no way to change)."""
    bucket = store.new_bucket()
    payloads = {store.uri(f"{bucket}/blobs/{index:02d}.bin"): bytes([index]) * (20_000 + index) for index in range(4)}
    with store.proxy(fail_every=6, faults=("reset", "slowdown")) as proxy:  # the 6th request: slowdown
        options = store.options(proxy.url)
        started = time.perf_counter()
        for uri, data in payloads.items():
            storage.write_bytes(uri, data, options)
        assert all(storage.read_bytes(uri, options) == data for uri, data in payloads.items())
        seconds = time.perf_counter() - started
    assert proxy.counts["slowdown"] == 1 and proxy.counts["requests"] == 9, proxy.requests  # one retry
    print(f"\n[{store.name} faults] {dict(proxy.counts)}; {seconds:.1f} s")


def test_403_and_404_are_error_rows_without_retries(store, tmp_path):
    bucket = store.new_bucket()
    images = upload_images(store, tmp_path / "images", f"{bucket}/images", per_class=1)
    denied, missing = sorted(images)[1], store.uri(f"{bucket}/images/class_0/missing.jpg")
    uris = [sorted(images)[0], missing, denied]
    name = denied.split("/images/", 1)[1]
    with store.proxy(deny=(name, name.replace("/", "%2F"))) as proxy:  # GCS quotes the slashes of a name
        settings = ShardSettings(output_uri="unused", output_storage_options={},
                                 decode=DecodeSettings(store.options(proxy.url)), decode_threads=2)
        task = ShardTask(shard=0, start=0, stop=len(uris), uris=uris, labels=[None] * len(uris))
        with ThreadPoolExecutor(2) as executor:
            items = list(decoded_items(task, image_decoder((32, 32), settings.decode), settings, executor, window=4))
    errors = {item.uri: item.image.error for item in items}
    assert errors == {uris[0]: None, missing: "fetch failed: not found", denied: "fetch failed: access denied"}
    assert proxy.counts["denied"] == 1 and proxy.counts["requests"] == 3, proxy.requests  # a GET each, no retry


# --------------------------------------------------------------------------------------------------
# `featurize extract` on each store
# --------------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("store", ["gcs", "azure"], indirect=True)  # S3's: tests/io/test_s3.py, with faults
def test_extract_from_and_to_the_store_then_resume(store, ray_with_credentials, tiny_model, tmp_path, capfd, caplog):
    """Images on the store, features written back to it: one row per image; a resume with commits lost and
    an orphan planted redoes only those shards and removes the orphan; a third run does nothing. No planted
    secret anywhere: not in the objects, the output, the logs, nor Ray's session files."""
    caplog.set_level(logging.DEBUG, logger="featurize")
    bucket = store.new_bucket()
    images = upload_images(store, tmp_path / "images", f"{bucket}/images")
    output = f"{bucket}/features"
    fs = store.filesystem()
    with store.proxy() as proxy:  # GCS: the proxy checks the bearer token
        options = store.options(proxy.url)
        config = write_config(tmp_path, input={"uri": store.uri(f"{bucket}/images/"), "storage_options": options},
                              model={"backbone": str(tiny_model)}, run={"batch_size": 4, "shard_size": 3},
                              output={"uri": store.uri(output), "storage_options": options})
        started = time.perf_counter()
        assert main(["extract", "--config", str(config)]) == 0
        first_seconds = time.perf_counter() - started
        rows, success = read_rows(store, output)
        assert len(rows) == len(images) == 12 and rows["uri"].is_unique and set(rows["uri"]) == set(images)
        assert (rows["status"] == "ok").all()
        assert rows.set_index("uri").loc[sorted(images), "label"].tolist() == [
            images[uri].parent.name for uri in sorted(images)]
        assert success["shards"] == {"total": 4, "run": 4, "committed": 4}

        lose_commits_and_plant_an_orphan(fs, output, success["files"])
        assert main(["extract", "--config", str(config)]) == 0
        rows, resumed = read_rows(store, output)
        assert resumed["shards"] == {"total": 4, "run": 2, "committed": 4}
        assert len(rows) == 12 and rows["uri"].is_unique and set(rows["uri"]) == set(images)
        assert [resumed["files"][i] for i in (0, 2)] == [success["files"][i] for i in (0, 2)]
        fs.invalidate_cache()
        assert sorted(fs.ls(f"{output}/data")) == sorted(f"{output}/{path}" for path in resumed["files"])

        assert main(["extract", "--config", str(config)]) == 0  # finished: nothing to do
        assert read_rows(store, output)[1]["shards"]["run"] == 0

    objects = every_object(store, bucket)
    assert {f"{output}/_SUCCESS", f"{output}/_plan.json", f"{output}/_manifest.parquet"} <= set(objects)
    captured = capfd.readouterr()
    assert_no_secret(store, *objects.values(), captured.out, captured.err, caplog.text,
                     ray_session_bytes(ray_with_credentials))
    print(f"\n[{store.name} extract] 12 images, first run {first_seconds:.1f} s; {dict(proxy.counts)}")


def test_a_missing_bucket_or_bad_credentials_stop_at_once(store, tiny_model, tmp_path, capfd, caplog):
    """Exit 2 before Ray starts, with a message saying which; no planted secret in anything said."""
    caplog.set_level(logging.DEBUG, logger="featurize")
    bucket = store.new_bucket()
    store.filesystem().pipe(f"{bucket}/images/class_0/a.png", b"x")

    def extract(options: dict, output: str, images: str = f"{bucket}/images/") -> tuple[int, float, str]:
        config = write_config(tmp_path, input={"uri": store.uri(images), "storage_options": options},
                              model={"backbone": str(tiny_model)}, run={"batch_size": 4, "shard_size": 3},
                              output={"uri": store.uri(output), "storage_options": options})
        started = time.perf_counter()
        code = main(["extract", "--config", str(config)])
        seconds = time.perf_counter() - started
        captured = capfd.readouterr()
        assert_no_secret(store, captured.out, captured.err, caplog.text)
        return code, seconds, " ".join(captured.err.split())

    from_environment = store.options() if store.environment_options is None else store.environment_options
    code, seconds, message = extract(from_environment, "no-such-bucket-featurize/features")
    assert code == 2 and seconds < 20, message
    assert f"output.uri: cannot write to {store.uri('no-such-bucket-featurize/features')}" in message, message
    assert "bucket not found" in message and "create it or fix the URI" in message, message

    code, seconds, message = extract(from_environment, f"{bucket}/out-1", images="no-such-input-bucket/images/")
    assert code == 2 and seconds < 20, message
    assert "no-such-input-bucket" in message, message

    with store.proxy(refuse_all=True) as proxy:
        code, seconds, message = extract(store.options(proxy.url), f"{bucket}/out-2")
    # gcsfs retries GCS's 401 "Invalid Credentials" itself: clients.bound_gcs_retries keeps it to 3 attempts
    assert code == 2 and seconds < 20, message
    assert "output.uri: cannot write to" in message and "access denied" in message, message
    print(f"\n[{store.name} refused] {seconds:.1f} s, {proxy.counts['requests']} requests: {message[:300]}")
