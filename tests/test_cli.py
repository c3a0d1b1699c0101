"""The `featurize` command line: what a user sees, exit codes, and errors found before Ray starts."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ExtractConfig, load_config
from pipeline.models.zoo import BACKBONES
from tests.helpers import write_labelled_images

ROOT = Path(__file__).resolve().parent.parent


def test_models_prints_every_backbone_with_its_feature_dim(capsys):
    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    for name, backbone in BACKBONES.items():
        line = next(line for line in printed.splitlines() if f" {name} " in line)
        assert f" {backbone.feature_dim} " in line and f" {backbone.input_size} " in line


def test_config_error_exits_2_with_the_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("input: {uri: x}\noutput: {uri: y}\nmodel: {pooling: mean}\n")
    assert main(["extract", "--config", str(config)]) == 2
    assert "model.pooling" in capsys.readouterr().err


# --- problems a user can fix: exit 2, named key and fix, before Ray starts ------------------------------------


def run_featurize(arguments: list[str], tmp_path: Path, **environment: str) -> tuple[int, str, float, bool]:
    """`featurize ARGS` in a fresh process: (exit code, stderr, seconds, whether a Ray session was started)."""
    ray_directory = tmp_path / "ray-sessions"
    env = {**os.environ, "RAY_TMPDIR": str(ray_directory), **environment}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *arguments], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    seconds = time.perf_counter() - started
    ray_started = ray_directory.exists() and any(ray_directory.iterdir())
    return done.returncode, " ".join(done.stderr.split()), seconds, ray_started


def extract_config(tmp_path: Path, model: str, **model_keys) -> dict:
    return {"input": {"uri": str(tmp_path / "images"), "labels": "from_dirs"},
            "model": {"backbone": model, **model_keys}, "output": {"uri": str(tmp_path / "features")}}


@pytest.fixture
def images(tmp_path) -> Path:
    write_labelled_images(tmp_path / "images", num_classes=2, per_class=2)
    return tmp_path / "images"


USER_ERRORS = {  # name: (config changes, words the message must hold)
    "missing saved model": ({"model": {"backbone": "/nowhere/model.h5"}}, ["model.backbone", "/nowhere/model.h5",
                                                                           "does not exist"]),
    "missing weights file": ({"model": {"backbone": "mobilenetv2", "weights": "/nowhere/m.weights.h5"}},
                             ["model.weights", "/nowhere/m.weights.h5", "does not exist"]),
    "missing class names": ({"model": {"class_names": "/nowhere/classes.txt"}},
                            ["model.class_names", "/nowhere/classes.txt", "does not exist"]),
    "weights file as backbone": ({"model": {"backbone": "/models/resnet50.weights.h5"}},
                                 ["model.backbone", "is a weights file", "model.weights: /models/resnet50.weights.h5"]),
    "imagenet with a saved model": ({"model": {"weights": "imagenet"}},
                                    ["model.weights: imagenet applies to zoo backbones", "remove model.weights"]),
    "no images": ({"input": {"extensions": ["heic"]}}, ["input.uri", "no images", "heic"]),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_exit_2_naming_the_key_before_ray_starts(case, tmp_path, images, tiny_model):
    changes, words = USER_ERRORS[case]
    config = extract_config(tmp_path, str(tiny_model))
    for section, values in changes.items():
        config[section].update(values)
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    code, message, seconds, ray_started = run_featurize(["extract", "--config", str(tmp_path / "config.yaml")],
                                                        tmp_path)
    assert code == 2, message
    assert not ray_started and "Traceback" not in message
    for word in words:
        assert word in message, (word, message)


def test_finished_output_refusals_come_before_ray_starts(tmp_path, images, tiny_model):
    """output.mode error and a changed fingerprint are answered from the frozen plan, without a cluster."""
    from pipeline.extract.plan import prepare

    config = extract_config(tmp_path, str(tiny_model), weights="none", top_k=0)
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    prepare(load_config(ExtractConfig, tmp_path / "config.yaml"))  # the plan a first run freezes
    for override, words in (("output.mode=error", ["output.uri", "output.mode is 'error'", "resume"]),
                            ("model.pooling=max", ["different configuration", "pooling: 'avg' -> 'max'"])):
        code, message, _, ray_started = run_featurize(
            ["extract", "--config", str(tmp_path / "config.yaml"), "--set", override], tmp_path)
        assert code == 2 and not ray_started, message
        assert all(word in message for word in words), message


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("input:\n  uri: images\noutput: {uri: out\nmodel: {}\n")
    code, message, _, ray_started = run_featurize(["extract", "--config", str(config)], tmp_path)
    assert code == 2 and not ray_started and "Traceback" not in message, message
    assert f"config file {config} is not valid YAML: line 4, column 6: expected ','" in message


def test_set_without_equals_names_the_fix(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("input: {uri: x}\noutput: {uri: y}\n")
    assert main(["extract", "--config", str(config), "--set", "run.batch_size", "64"]) == 2
    message = capsys.readouterr().err
    assert "--set run.batch_size=64" in message and "unrecognized arguments" not in message


def test_train_on_a_mistyped_features_uri_says_it_does_not_exist(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"features": {"uri": str(tmp_path / "featurs")},
                                  "output": {"uri": str(tmp_path / "classifier")}}))
    assert main(["train", "--config", str(config)]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert f"features.uri: {tmp_path / 'featurs'} does not exist" in message
    (tmp_path / "featurs").mkdir()
    assert main(["train", "--config", str(config)]) == 2
    assert "is not a featurize extract output" in " ".join(capsys.readouterr().err.split())


def test_inspect_of_a_folder_that_is_no_output_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is not a featurize output" in " ".join(capsys.readouterr().err.split())


def test_bench_help_explains_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--backbone", "mobilenetv2"), ("--input-size", "224"), ("--batch-size", "32"),
                            ("--images", "1024"), ("--runtime", "auto"), ("--output", "results/bench")):
        assert option in text and f"(default: {default})" in text, option


def test_models_table_has_a_size_for_every_backbone(capsys):
    assert main(["models"]) == 0
    assert " None " not in capsys.readouterr().out


def test_predict_with_a_missing_model_or_features_names_the_option(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path / "nope"), "--features", str(tmp_path),
                 "--output", str(tmp_path / "out")]) == 2
    assert "--model:" in capsys.readouterr().err


def test_inspect_help_names_every_output_it_reads(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(stage in text for stage in ("extract", "predict", "train"))


def test_lease_break_takes_set_like_every_config_command(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("input: {uri: x}\noutput: {uri: y}\n")
    arguments = ["lease", "break", str(tmp_path), "--config", str(config)]
    assert main([*arguments, "--set", "output.storage_options={auto_mkdir: true}"]) == 0
    assert "has no lease: nothing to break" in " ".join(capsys.readouterr().out.split())
    assert main([*arguments, "--set", "output.storage_options", "{}"]) == 2
    assert "--set output.storage_options={}" in " ".join(capsys.readouterr().err.split())
