"""extract with `models:`: one decode feeds several networks, each model gets a complete output at OUTPUT/NAME/.

Three small real Keras networks of different input sizes and resize modes; JPEGs large enough that a one-model run
of the smallest network decodes at a reduced JPEG scale (draft) while the shared decode does not, so "the same
features" is a real check (cosine >= 0.9999), besides the reference computed without featurize's pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipeline import cli
from pipeline.config import ExtractConfig, ModelConfig, load_config
from pipeline.errors import ConfigError
from pipeline.extract import model_outputs
from pipeline.extract.decode import decode_image
from pipeline.extract.multi import check_memory, decode_for_models
from pipeline.extract.plan import digest, fingerprint_inputs
from tests.helpers import ROOT, cosine_rows
from tests.images import photo_bytes, truncated
from tests.readers import reading

# name -> (input side, resize mode)
NETWORKS = {"small": (32, "stretch"), "medium": (48, "center_crop"), "large": (64, "pad")}


@pytest.fixture(scope="module")
def networks(tmp_path_factory) -> dict[str, Path]:
    """Three small saved Keras classifiers, one per input size."""
    import keras

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("networks")
    paths = {}
    for index, (name, (side, _)) in enumerate(NETWORKS.items()):
        inputs = keras.Input((side, side, 3))
        x = keras.layers.Rescaling(1 / 255)(inputs)
        x = keras.layers.Conv2D(6 + 2 * index, 3, strides=2, activation="relu")(x)
        x = keras.layers.Conv2D(12, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
        outputs = keras.layers.Dense(3, activation="softmax", name="head")(x)
        paths[name] = folder / f"{name}.keras"
        keras.Model(inputs, outputs).save(paths[name])
    return paths


def write_photos(folder: Path, count: int, height: int, width: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"photo_{index:03d}.jpg"
        path.write_bytes(photo_bytes("JPEG", height, width, seed=index, quality=90))
        paths.append(path)
    return paths


def models_section(networks: dict[str, Path]) -> list[dict]:
    return [{"name": name, "backbone": str(networks[name]), "weights": "none", "top_k": 2, "resize": resize}
            for name, (_, resize) in NETWORKS.items()]


def write_config(path: Path, images: Path, output: Path, models: list[dict] | None = None, model: dict | None = None,
                 mode: str = "resume", reader: dict | None = None, **run) -> Path:
    """`reader`: input keys that inject a reader (tests.readers.reading)."""
    config = {"input": {"uri": str(images), **(reader or {})},
              "run": {"batch_size": 8, "shard_size": 8, "actors": 1, **run},
              "output": {"uri": str(output), "mode": mode}}
    config.update({key: value for key, value in (("models", models), ("model", model)) if value is not None})
    path.write_text(json.dumps(config))
    return path


def extract(config: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=environment, check=False)


def rows_of(output: Path) -> tuple[dict[str, dict], dict]:
    """{uri: row} of a finished extract output, read as any reader does (the `_SUCCESS` file list), and `_SUCCESS`."""
    success = json.loads((output / "_SUCCESS").read_text())
    table = pq.ParquetDataset([str(output / path) for path in success["files"]]).read()
    rows = table.to_pylist()
    assert len({row["uri"] for row in rows}) == len(rows), "an image has two rows"
    return {row["uri"]: row for row in rows}, success


# --- without Ray ------------------------------------------------------------------------------------------------


def test_one_decode_gives_each_model_what_its_own_decode_gives():
    data = photo_bytes("JPEG", 120, 160, seed=3)
    targets = {name: ((side, side), resize, 4) for name, (side, resize) in NETWORKS.items()}
    decoded = decode_for_models(data, targets)
    assert (decoded.width, decoded.height, decoded.error) == (160, 120, None)
    for name, (side, resize) in NETWORKS.items():  # no draft at this size: pixel for pixel the one-model decode
        np.testing.assert_array_equal(decoded.pixels[name], decode_image(data, (side, side), resize).pixels)
    broken = decode_for_models(truncated(data), targets)
    assert broken.pixels is None and broken.error.startswith("truncated image")


def test_the_shared_draft_covers_the_largest_input():
    """A 1600x1200 JPEG: alone, the 32-pixel model decodes at 1/4 scale; with the 64-pixel one beside it, the
    shared decode keeps what the larger needs, and the smaller model's pixels stay within a grey level or two."""
    data = photo_bytes("JPEG", 1200, 1600, seed=1)
    targets = {"small": ((32, 32), "stretch", 4), "large": ((224, 224), "stretch", 4)}
    shared = decode_for_models(data, targets)
    alone = decode_image(data, (32, 32), "stretch")
    assert np.abs(shared.pixels["small"].astype(int) - alone.pixels.astype(int)).mean() < 2.0
    np.testing.assert_array_equal(shared.pixels["large"], decode_image(data, (224, 224), "stretch").pixels)


def test_model_and_models_together_is_a_config_error_naming_both(tmp_path):
    config = write_config(tmp_path / "config.json", tmp_path, tmp_path / "out", models=[{"name": "a"}],
                          model={"backbone": "mobilenetv2"})
    with pytest.raises(ConfigError, match=r"model and models are both set"):
        load_config(ExtractConfig, config)
    result = extract(config, timeout=120)
    assert result.returncode == 2 and "model and models are both set" in result.stderr


def test_each_model_output_has_the_fingerprint_of_a_one_model_run(tmp_path, networks):
    config = load_config(ExtractConfig, write_config(tmp_path / "c.json", tmp_path, tmp_path / "out",
                                                     models=models_section(networks)))
    for name, own in model_outputs.model_configs(config).items():
        single = load_config(ExtractConfig, write_config(tmp_path / "s.json", tmp_path, tmp_path / "out" / name,
                                                         model={key: value for key, value in
                                                                models_section(networks)[list(NETWORKS).index(name)]
                                                                .items() if key != "name"}))
        assert own.output.uri == str(tmp_path / "out" / name)
        assert digest(fingerprint_inputs(own)) == digest(fingerprint_inputs(single))


def test_models_that_cannot_fit_one_actor_are_refused_with_what_they_need():
    config = ExtractConfig(input={"uri": "x"}, output={"uri": "y"},
                           models=[{"name": "a", "backbone": "resnet50"}, {"name": "b", "backbone": "mobilenetv2"}])
    with pytest.raises(ConfigError, match=r"need about 0\.9 GiB \(a 0\.6 GiB, b 0\.3 GiB\), but the node has "
                                          r"0\.5 GiB available"):
        check_memory(config.models, available=2**29)
    assert check_memory(config.models, available=2**40) > 25.6e6 * 4 * 4


def test_a_models_output_keeps_its_set_of_models(tmp_path, networks):
    images = tmp_path / "images"
    write_photos(images, 4, 40, 50)
    output = tmp_path / "out"
    two = models_section(networks)[:2]
    first = load_config(ExtractConfig, write_config(tmp_path / "c.json", images, output, models=two))
    with model_outputs.held(first, time.time()) as outputs:
        plan = outputs.prepare_plan(print)
    assert plan.num_images == 4
    for name in ("small", "medium"):  # each its own plan, the same frozen listing
        assert json.loads((output / name / "_plan.json").read_text())["num_images"] == 4
        manifest = (output / name / "_manifest.parquet").read_bytes()
        assert manifest == (output / "small" / "_manifest.parquet").read_bytes()
    grown = load_config(ExtractConfig, write_config(tmp_path / "c.json", images, output,
                                                    models=models_section(networks)))
    refusal = r"holds the outputs of the models small, medium, and this config adds large\. The set of models is fixed"
    with pytest.raises(ConfigError, match=refusal), model_outputs.held(grown, time.time()) as outputs:
        outputs.prepare_plan(print)
    assert not (output / "large").exists()  # refused before anything was written for it


# --- with Ray -----------------------------------------------------------------------------------------------------


def reference_features(paths: list[Path], network: Path, resize: str) -> np.ndarray:
    """The network on each image as decoded for it alone, without featurize's pipeline (FeatureExtractor only)."""
    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(ModelConfig(backbone=str(network), weights="none", top_k=0, resize=resize),
                                 batch_size=8)
    pixels = [decode_image(path.read_bytes(), extractor.input_size, resize).pixels for path in paths]
    return extractor(np.stack(pixels)).features


def run(config: Path) -> dict:
    """`featurize extract` in this process, on the test's local Ray."""
    from pipeline.extract.driver import run_extract

    return run_extract(load_config(ExtractConfig, config))


@pytest.mark.ray
@pytest.mark.slow
def test_one_extract_over_three_models_equals_their_one_model_runs(tmp_path, networks, ray_local):
    images = tmp_path / "images"
    paths = write_photos(images, 15, 288, 320)
    (images / "broken.jpg").write_bytes(truncated(paths[0].read_bytes()))
    output = tmp_path / "out"
    done = run(write_config(tmp_path / "models.json", images, output, models=models_section(networks)))
    assert set(done["models"]) == set(NETWORKS) and done["error_rate"] == 1 / 16
    assert json.loads((output / "_models.json").read_text())["models"] == list(NETWORKS)

    hashes = {}
    for name, (side, resize) in NETWORKS.items():
        rows, success = rows_of(output / name)
        assert success["rows"] == {"total": 16, "ok": 15, "error": 1}
        assert rows[str(images / "broken.jpg")]["error"].startswith("truncated image")
        assert str(side) in success["provenance"]["input_size"]
        assert success["provenance"]["resize"] == resize
        features = np.stack([rows[str(path)]["features"] for path in paths])
        reference = reference_features(paths, networks[name], resize)
        assert cosine_rows(features, reference).min() >= 0.9999, name
        # content hashes, computed once for every model: sha256 of the bytes, phash of the shared decode
        for path in paths:
            row = rows[str(path)]
            assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            reference = imagehash.phash(ImageOps.exif_transpose(Image.open(path)))
            assert imagehash.hex_to_hash(row["phash"]) - reference <= 4, (name, path)
            first = hashes.setdefault(str(path), (row["sha256"], row["phash"]))
            assert (row["sha256"], row["phash"]) == first  # every model's rows hold the same hashes
        # the actor that wrote the rows: in each model's `_SUCCESS.actors`, commit records and data files
        assert sum(actor["images"] for actor in success["actors"]) == 16 and success["actors"][0]["node_id"]
        commits = [json.loads(path.read_text()) for path in (output / name / "_commits").glob("shard-*.json")]
        assert all(commit["actors"] for commit in commits)
        metadata = pq.read_schema(output / name / success["files"][0]).metadata
        assert metadata[b"node_id"].decode() == success["actors"][0]["node_id"]

    # each model's folder is an extract output as any other: inspect describes it
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["inspect", str(output / "large")]) == 0
    assert "16" in printed.getvalue() and "extract" in printed.getvalue().lower()

    # a one-model run of the smallest network (whose own decode drafts to half scale) writes the same rows
    entry = {key: value for key, value in models_section(networks)[0].items() if key != "name"}
    run(write_config(tmp_path / "alone.json", images, tmp_path / "alone", model=entry))
    single, _ = rows_of(tmp_path / "alone")
    multi, _ = rows_of(output / "small")
    assert set(single) == set(multi)
    assert [single[uri]["status"] for uri in sorted(single)] == [multi[uri]["status"] for uri in sorted(multi)]
    ok = sorted(uri for uri in single if single[uri]["status"] == "ok")
    assert cosine_rows(np.stack([single[uri]["features"] for uri in ok]),
                       np.stack([multi[uri]["features"] for uri in ok])).min() >= 0.9999
    assert [single[uri]["top_k_labels"] for uri in ok] == [multi[uri]["top_k_labels"] for uri in ok]

    # a model that lost a commit (a crash between two models' commits) is the only one a rerun works for
    lost = sorted((output / "medium" / "_commits").glob("shard-*.json"))[1]
    lost.unlink()
    (output / "medium" / "_SUCCESS").unlink()
    rerun = run(write_config(tmp_path / "models.json", images, output, models=models_section(networks)))
    runs = {name: success["shards"]["run"] for name, success in rerun["models"].items()}
    assert runs == {"small": 0, "medium": 1, "large": 0}
    assert len(rows_of(output / "medium")[0]) == 16

    # append: the new images, listed once, become one new generation in every model's output
    added = write_photos(images / "more", 3, 60, 80)
    appended = run(write_config(tmp_path / "models.json", images, output, models=models_section(networks),
                                mode="append"))
    for name, success in appended["models"].items():
        rows, _ = rows_of(output / name)
        assert set(rows) == {str(path) for path in [*paths, *added, images / "broken.jpg"]}
        assert success["shards"] == {"total": 3, "run": 1, "committed": 3}


@pytest.mark.ray
@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_to_every_image_once_in_every_model(tmp_path, networks):
    images = tmp_path / "images"
    paths = write_photos(images, 240, 30, 40)
    output = tmp_path / "out"
    config = write_config(tmp_path / "models.json", images, output, models=models_section(networks), shard_size=6)
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "extract", "--config", str(config)], cwd=ROOT,
                              start_new_session=True, env=environment, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((output / "large" / "_commits").glob("shard-*.json")):
            assert driver.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    committed = {name: len(list((output / name / "_commits").glob("shard-*.json"))) for name in NETWORKS}
    assert 0 < committed["large"] and min(committed.values()) < 40, committed
    assert not any((output / name / "_SUCCESS").exists() for name in NETWORKS)

    rerun = extract(config)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in NETWORKS:
        rows, success = rows_of(output / name)
        assert set(rows) == {str(path) for path in paths}  # every image once (rows_of refuses a repeat)
        assert success["shards"]["committed"] == 40
        assert success["shards"]["run"] == 40 - committed[name]


@pytest.mark.ray
@pytest.mark.slow
def test_an_image_that_kills_the_actor_is_quarantined_in_every_model(tmp_path, networks, ray_local):
    """A poison image (its worker dies on it, as on a native crash) in a shard of two: the piece is bisected and
    the image ends as one error row in each model's output, with every other image's rows beside it."""
    images = tmp_path / "images"
    paths = write_photos(images, 4, 30, 40)
    poison = images / "photo_POISON.jpg"
    poison.write_bytes(paths[0].read_bytes())
    output = tmp_path / "out"
    done = run(write_config(tmp_path / "models.json", images, output, models=models_section(networks)[:2],
                            reader=reading("Crashing", marker="_POISON"), shard_size=2, max_attempts=1,
                            max_error_rate=0.5))
    for name in ("small", "medium"):
        rows, success = rows_of(output / name)
        assert set(rows) == {str(path) for path in [*paths, poison]}
        assert rows[str(poison)]["error"] == "quarantined: the worker process crashed on this image 1 times"
        assert success["rows"] == {"total": 5, "ok": 4, "error": 1} == done["models"][name]["rows"]
        assert len(rows[str(paths[0])]["features"]) == int(success["provenance"]["feature_dim"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_model_whose_every_feature_is_non_finite_fails_the_run(tmp_path, networks, ray_local, capsys):
    """Bright images give one model (exp of the mean pixel) inf features and the other finite ones: the piece
    fails like a bug in featurize (exit 3, naming the model), not as error rows, and no output is finished."""
    import keras

    inputs = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    features = keras.layers.Activation("exponential", name="features")(pooled)
    exponential = tmp_path / "exponential.keras"
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(features)).save(exponential)
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(images / f"bright_{index}.png")
    models = [models_section(networks)[0],
              {"name": "exponential", "backbone": str(exponential), "weights": "none", "layer": "features",
               "preprocess": "none", "top_k": 1}]
    config = write_config(tmp_path / "models.json", images, tmp_path / "out", models=models, max_attempts=1)
    capsys.readouterr()
    assert cli.main(["extract", "--config", str(config)]) == 3
    message = " ".join(capsys.readouterr().err.split())
    assert "for model exponential gave non-finite features" in message
    assert not any((tmp_path / "out" / name / "_SUCCESS").exists() for name in ("small", "exponential"))
