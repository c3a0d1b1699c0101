"""An extract from a GCS emulator to Azurite, and one back, configured as a user would: only `endpoint_url` for GCS
and a connection string for Azure in the config, featurize run in a plain environment (no credentials or emulator
variables). gcsfs's default client probes every bucket over Google's gRPC API, which an emulator does not serve;
featurize must use the plain client there itself, or each call waits about a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests import images
from tests.io.conftest import azure_connection_string

pytestmark = [pytest.mark.clouds, pytest.mark.slow]

PLAIN_ENVIRONMENT = {name: value for name, value in os.environ.items()
                     if not name.startswith(("GOOGLE_", "GCE_", "CLOUDSDK_", "AZURE_", "STORAGE_EMULATOR", "AWS_",
                                             "GCSFS_"))}


def extract(tmp_path, name: str, input_section: dict, output_section: dict) -> tuple[int, float, str]:
    config = tmp_path / f"{name}.json"
    config.write_text(json.dumps({"input": input_section, "output": output_section,
                                  "model": {"backbone": "mobilenetv2", "weights": "none", "input_size": 32,
                                            "top_k": 0},
                                  "run": {"actors": 1, "shard_size": 4, "batch_size": 4}}))
    started = time.monotonic()
    process = subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--config", str(config)],
                             capture_output=True, text=True, env=PLAIN_ENVIRONMENT, timeout=240)
    return process.returncode, time.monotonic() - started, process.stderr


def test_extract_from_a_gcs_emulator_to_azurite_and_back_with_only_endpoint_and_connection_string(
        gcs_store, azure_store, tmp_path):
    bucket = gcs_store.new_bucket()
    photos = {f"{bucket}/photos/{index}.jpg": images.photo_bytes("JPEG", 40, 48, seed=index) for index in range(6)}
    gcs_store.put_many(photos)
    container = azure_store.new_bucket()
    gcs = {"endpoint_url": gcs_store.endpoint}
    azure = {"connection_string": azure_connection_string(azure_store.endpoint)}

    code, there, errors = extract(tmp_path, "to-azure", {"uri": f"gs://{bucket}/photos/", "storage_options": gcs},
                                  {"uri": f"az://{container}/features", "storage_options": azure})
    assert code == 0, errors
    success = json.loads(azure_store.filesystem().cat(f"{container}/features/_SUCCESS"))
    assert success["rows"] == {"total": 6, "ok": 6, "error": 0}

    # and back: a manifest on Azure naming the images, features written to GCS
    manifest = "\n".join(f"gs://{path}" for path in photos).encode()
    azure_store.filesystem().pipe(f"{container}/manifest.txt", manifest)
    code, back, errors = extract(tmp_path, "to-gcs", {"uri": f"az://{container}/manifest.txt",
                                                      "storage_options": {"az": azure, "gs": gcs}},
                                 {"uri": f"gs://{bucket}/features", "storage_options": gcs})
    assert code == 0, errors
    success = json.loads(gcs_store.filesystem().cat(f"{bucket}/features/_SUCCESS"))
    assert success["rows"] == {"total": 6, "ok": 6, "error": 0}
    # each run is Ray's start-up and a model build plus a few dozen requests; with gcsfs's layout probe every
    # call waited about a minute and a run took far beyond the subprocess timeout
    print(f"GCS -> Azure {there:.1f} s, Azure -> GCS {back:.1f} s")
