"""Runs that cannot do all their work: workers that die again and again, refused models, config errors.

Everything runs through `featurize extract` (pipeline.cli.main) on a real local Ray, on real files written here.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests import images
from tests.helpers import read_rows, write_extract_config
from tests.readers import reading

# --- poison: workers that die again and again --------------------------------------------------------


def test_workers_dying_repeatedly_do_not_stall_the_job_and_the_error_rate_fails_it_after_commit(
        tmp_path, ray_local, tiny_model, monkeypatch):
    """Two poison images in different shards, two actors, run.max_attempts 2: each poison image kills its actor
    twice and ends as one quarantined row while the other actor goes on; the other rows commit. 2 errors in 12
    rows is above run.max_error_rate 0.1, so the job exits 1 after committing. (One image a shard keeps the
    number of actor restarts, ~15 s each here, at four; bisection is covered in test_distributed.py.)"""
    folder = tmp_path / "images"
    folder.mkdir()
    photo = images.photo_bytes("PNG", 24, 24)
    names = [f"image_{index:02d}.png" for index in range(12)]
    names[1], names[8] = "image_01_POISON.png", "image_08_POISON.png"
    for name in names:
        (folder / name).write_bytes(photo)
    output = tmp_path / "features"
    config = write_extract_config(tmp_path / "config.yaml", folder, tiny_model, output,
                          input=reading("Crashing", marker="_POISON"),
                          run={"actors": 2, "cpus_per_actor": 1, "shard_size": 1, "max_attempts": 2,
                               "max_error_rate": 0.1})
    started = time.perf_counter()
    assert main(["extract", "--config", str(config)]) == 1
    seconds = time.perf_counter() - started
    rows, success = read_rows(output)
    print(f"\npoison: 2 images, 4 actor deaths, {seconds:.1f} s")
    assert sorted(rows["uri"]) == sorted(str(folder / name) for name in names) and rows["uri"].is_unique
    bad = rows[rows["status"] == "error"].sort_values("uri")
    assert bad["uri"].tolist() == [str(folder / names[1]), str(folder / names[8])]
    assert all(reason == "quarantined: the worker process crashed on this image 2 times" for reason in bad["error"])
    assert success["rows"] == {"total": 12, "ok": 10, "error": 2}
    assert success["shards"] == {"total": 12, "run": 12, "committed": 12}
    assert success["errors_by_reason"] == {"quarantined": 2}
    assert seconds < 600  # generous: a bound on retries gone wrong, not a speed (about 60 s alone here)


# --- models and configuration ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lambda_models(tmp_path_factory) -> dict[str, Path]:
    """The same small classifier with a Lambda layer (arbitrary Python code), saved as .keras and .h5."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda pixels: pixels / 255.0, name="scale_by_lambda")(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
    model = keras.Model(inputs, outputs)
    folder = tmp_path_factory.mktemp("lambda_models")
    paths = {"keras": folder / "lambda.keras", "h5": folder / "lambda.h5"}
    for path in paths.values():
        model.save(path)
    return paths


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("few_images")
    for index in range(3):
        (folder / f"image_{index}.png").write_bytes(images.photo_bytes("PNG", 20, 24, seed=index))
    return folder


@pytest.mark.parametrize("suffix", ["keras", "h5"])
def test_lambda_model_is_refused_without_trust(tmp_path, ray_local, lambda_models, few_images, suffix, capsys):
    output = tmp_path / "features"
    config = write_extract_config(tmp_path / "config.yaml", few_images, lambda_models[suffix], output)
    started = time.perf_counter()
    assert main(["extract", "--config", str(config)]) == 2
    seconds = time.perf_counter() - started
    message = " ".join(capsys.readouterr().err.split())
    assert "Lambda" in message and "scale_by_lambda" in message and "model.trust" in message, message
    assert not (output / "_SUCCESS").exists() and not list((output / "_commits").glob("*.json"))
    assert seconds < 300  # refused once, not retried as if the actor had crashed (generous: a busy machine)


def test_lambda_model_runs_with_trust(tmp_path, ray_local, lambda_models, few_images):
    output = tmp_path / "features"
    config = write_extract_config(tmp_path / "config.yaml", few_images, lambda_models["keras"], output,
                          model={"trust": True})
    assert main(["extract", "--config", str(config)]) == 0
    rows, success = read_rows(output)
    assert len(rows) == 3 and (rows["status"] == "ok").all()
    assert len(rows["features"].iloc[0]) == 4  # the pooled layer before the head


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory) -> tuple[Path, str]:
    """A real MobileNetV2 weights file (random init, as `featurize weights pull` writes it) and its sha256."""
    from pipeline.models.loading import pull_weights

    path = tmp_path_factory.mktemp("weights") / "mobilenetv2.weights.h5"
    checksum = pull_weights("mobilenetv2", str(path), weights=None)
    return path, checksum


def test_weights_file_with_another_checksum_is_refused_at_actor_start(tmp_path, ray_local, few_images,
                                                                       mobilenet_weights, capsys):
    weights, checksum = mobilenet_weights
    wrong = "0" * 64
    output = tmp_path / "features"
    config = write_extract_config(tmp_path / "config.yaml", few_images, Path("mobilenetv2"), output,
                          model={"backbone": "mobilenetv2", "weights": str(weights), "weights_sha256": wrong,
                                 "input_size": 32, "top_k": 0})
    assert main(["extract", "--config", str(config)]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "model.weights_sha256" in message and wrong in message and checksum in message, message
    assert not (output / "_SUCCESS").exists()

    # the same file with its own checksum is accepted, and the checksum is in the provenance
    assert main(["extract", "--config", str(config), "--set", f"model.weights_sha256={checksum}"]) == 0
    rows, success = read_rows(output)
    assert len(rows) == 3 and (rows["status"] == "ok").all()
    assert success["provenance"]["weights_sha256"] == checksum


@pytest.mark.parametrize(("override", "words"), [
    ("model.pooling=mean", ["model.pooling", "'mean'", "avg, max"]),
    ("model.backbone=resnet5000", ["model.backbone", "resnet5000", "resnet50,"]),
    ("input.labels=breed", ["input.labels", "'breed'", "from_dirs", "none"]),
    ("run.actors=-1", ["run.actors", "-1", "positive"]),
    ("run.max_attempts=0", ["run.max_attempts", "0", "positive"]),
    ("model.top_k=-2", ["model.top_k", "-2", "0"]),
    ("model.draft_margin=-1", ["model.draft_margin", "-1"]),
    ("output.row_group_size=0", ["output.row_group_size", "0", "positive"]),
    ("run.cpus_per_actor=-1", ["run.cpus_per_actor", "-1", "positive"]),
    ("run.gpus_per_actor=-1", ["run.gpus_per_actor", "-1"]),
    ("output.feature_dtype=float64", ["output.feature_dtype", "float64", "float32, float16"]),
])
def test_config_errors_exit_2_naming_key_value_and_allowed(tmp_path, ray_local, tiny_model, few_images, override,
                                                           words, capsys):
    config = write_extract_config(tmp_path / "config.yaml", few_images, tiny_model, tmp_path / "features")
    if override.startswith("model.backbone"):  # a zoo name: weights none so nothing is downloaded
        override_args = ["--set", override, "--set", "model.top_k=0"]
    else:
        override_args = ["--set", override]
    assert main(["extract", "--config", str(config), *override_args]) == 2
    message = " ".join(capsys.readouterr().err.split())
    for word in words:
        assert word in message, (word, message)
