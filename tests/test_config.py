import pytest

from pipeline.config import CompareConfig, ExtractConfig, TrainConfig, load_config
from pipeline.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_loads_nested_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "input:\n  uri: [a, b]\nmodel:\n  backbone: resnet50\noutput:\n  uri: out\n")
    config = load_config(ExtractConfig, path, ["run.batch_size=64", "model.pooling=max", "model.layer=null"])
    assert config.input.uri == ("a", "b")
    assert config.model.backbone == "resnet50"
    assert config.run.batch_size == 64
    assert config.model.pooling == "max"
    assert config.model.layer is None


def test_single_uri_string_becomes_tuple(tmp_path):
    config = load_config(ExtractConfig, write(tmp_path, "input: {uri: imgs}\noutput: {uri: out}\n"))
    assert config.input.uri == ("imgs",)


@pytest.mark.parametrize("override, words", [
    ("model.pooling=mean", ["model.pooling", "'mean'", "avg, max"]),
    ("output.mode=append", ["output.mode", "'append'", "resume, overwrite, error"]),
    ("output.feature_dtype=float64", ["output.feature_dtype", "float32, float16"]),
    ("model.resize=zoom", ["model.resize", "stretch, center_crop, pad"]),
    ("run.batch_size=lots", ["run.batch_size", "'lots'", "whole number"]),
    ("run.batch_size=0", ["run.batch_size", "positive"]),
    ("run.max_error_rate=2", ["run.max_error_rate", "[0, 1]"]),
    ("model.trust=yes please", ["model.trust", "true, false"]),
    ("model.colour=red", ["model", "unknown key", "colour", "backbone"]),
    ("nonsense.key=1", ["unknown key", "nonsense", "input, model, run, output"]),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(tmp_path, override, words):
    path = write(tmp_path, "input: {uri: imgs}\noutput: {uri: out}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(ExtractConfig, path, [override])
    for word in words:
        assert word in str(raised.value)


def test_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="input.uri is required"):
        load_config(ExtractConfig, write(tmp_path, "output: {uri: out}\n"))
    with pytest.raises(ConfigError, match="output.uri is required"):
        load_config(ExtractConfig, write(tmp_path, "input: {uri: imgs}\n"))
    with pytest.raises(ConfigError, match="features.uri is required"):
        load_config(TrainConfig, write(tmp_path, "output: {uri: out}\n"))


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ExtractConfig, None, ["run.batch_size"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ExtractConfig, tmp_path / "missing.yaml")


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = Path(__file__).parent.parent / "configs"
    for path in sorted(configs.glob("*.yaml")):
        kind = {"compare": CompareConfig, "train": TrainConfig}.get(path.stem, ExtractConfig)
        load_config(kind, path)


def test_unknown_zoo_backbone_fails_at_load_with_the_known_names(tmp_path):
    path = write(tmp_path, "input: {uri: imgs}\noutput: {uri: out}\nmodel: {backbone: resnet51}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(ExtractConfig, path)
    assert "model.backbone" in str(raised.value) and "resnet50" in str(raised.value)
    load_config(ExtractConfig, path, ["model.backbone=s3://bucket/my_model.keras"])  # checked when loaded
