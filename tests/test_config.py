import dataclasses
from pathlib import Path

import pytest

from pipeline.config import (
    FINGERPRINT_EXCLUDED,
    FINGERPRINT_NAMES,
    CompareConfig,
    ExtractConfig,
    FinetuneConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
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
    ("output.mode=merge", ["output.mode", "'merge'", "resume, overwrite, error, append"]),
    ("output.feature_dtype=float64", ["output.feature_dtype", "float32, float16"]),
    ("model.resize=zoom", ["model.resize", "stretch, center_crop, pad"]),
    ("run.batch_size=lots", ["run.batch_size", "'lots'", "whole number"]),
    ("run.batch_size=0", ["run.batch_size", "positive"]),
    ("run.max_error_rate=2", ["run.max_error_rate", "[0, 1]"]),
    ("model.trust=yes please", ["model.trust", "true, false"]),
    ("model.colour=red", ["model", "unknown key", "colour", "backbone"]),
    ("nonsense.key=1", ["unknown key", "nonsense", "input, model, models, run, output"]),
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
    configs = Path(__file__).parent.parent / "configs"
    for path in sorted(configs.glob("*.yaml")):
        kinds = {"compare": CompareConfig, "train": TrainConfig, "finetune": FinetuneConfig}
        kind = kinds.get(path.stem, ExtractConfig)
        load_config(kind, path)


def test_unknown_zoo_backbone_fails_at_load_with_the_known_names(tmp_path):
    path = write(tmp_path, "input: {uri: imgs}\noutput: {uri: out}\nmodel: {backbone: resnet51}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(ExtractConfig, path)
    assert "model.backbone" in str(raised.value) and "resnet50" in str(raised.value)
    load_config(ExtractConfig, path, ["model.backbone=s3://bucket/my_model.keras"])  # checked when loaded


def test_weights_file_as_backbone_fails_at_load(tmp_path):
    path = write(tmp_path, "input: {uri: imgs}\noutput: {uri: out}\nmodel: {backbone: x.weights.h5}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(ExtractConfig, path)
    assert "model.backbone" in str(raised.value) and "is a weights file" in str(raised.value)
    assert "model.weights: x.weights.h5" in str(raised.value)  # the fix


def test_keyword_construction_validates_and_names_the_key():
    assert ModelConfig(backbone="resnet50", input_size=96).input_size == 96
    with pytest.raises(ConfigError, match=r"model\.pooling: got 'mean'; allowed values: avg, max"):
        ModelConfig(pooling="mean")
    with pytest.raises(ConfigError, match=r"model: unknown key\(s\) bakbone; .*\(did you mean backbone\?\)"):
        ModelConfig(bakbone="resnet50")


# --- the fingerprint: every key of the config but an explicit exclusion list ---------------------------------


def extract_keys(config: ExtractConfig) -> set[str]:
    """`section.key` of every key of an extract config; `models` (a list of model sections) by its own name."""
    keys = set()
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        if dataclasses.is_dataclass(values):
            keys |= {f"{section.name}.{item.name}" for item in dataclasses.fields(values)}
        else:
            keys.add(section.name)
    return keys


def test_every_extract_key_is_fingerprinted_or_excluded_with_a_reason(tmp_path):
    from pipeline.extract.plan import fingerprint_inputs

    config = load_config(ExtractConfig, None, ["input.uri=imgs", "output.uri=out"])
    fingerprinted = set(fingerprint_inputs(config))
    keys = extract_keys(config)
    for key in keys - set(FINGERPRINT_EXCLUDED):
        assert FINGERPRINT_NAMES.get(key, key.split(".")[1]) in fingerprinted, key
    assert set(FINGERPRINT_EXCLUDED) <= keys  # no stale entries
    assert all(reason.strip() for reason in FINGERPRINT_EXCLUDED.values())
    # a new key must be classified: the fingerprinted set is the one existing outputs recorded
    assert fingerprinted == set(hand_kept_fingerprint_inputs(config))


def test_every_extract_key_is_classified_once_in_the_contract():
    """The contract says, for every key, whether it changes the features, the rows, or only how the job runs;
    the fingerprint, the provenance checks and the query model of search all derive from that one table."""
    from pipeline.contract import FEATURE_MODEL_KEYS, FEATURES, KEY_EFFECTS, PROVENANCE_KEYS, ROWS

    config = load_config(ExtractConfig, None, ["input.uri=imgs", "output.uri=out"])
    assert set(KEY_EFFECTS) == extract_keys(config)
    assert set(FINGERPRINT_EXCLUDED) == {key for key, effect in KEY_EFFECTS.items() if effect not in (FEATURES, ROWS)}
    # mixed precision changes the values: fingerprinted by extract, compared by train, index and search alike
    assert "mixed_precision" in FEATURE_MODEL_KEYS and "compute_dtype" in PROVENANCE_KEYS
    assert {"resize", "draft_margin", "weights_sha256"} <= set(PROVENANCE_KEYS)
    assert not {"runtime", "xla", "trust", "top_k", "class_names"} & set(FEATURE_MODEL_KEYS)


def test_the_query_model_is_derived_from_provenance_key_by_key():
    from pipeline.config import model_from_provenance

    provenance = {"backbone": "resnet50", "weights": "imagenet", "layer": "default", "pooling": "none",
                  "input_size": "96x96", "preprocess": "caffe", "resize": "pad", "draft_margin": "0",
                  "compute_dtype": "mixed_float16", "runtime": "keras", "top_k": "5"}
    model = model_from_provenance(provenance)
    assert (model.backbone, model.weights, model.layer, model.pooling, model.input_size) == (
        "resnet50", "imagenet", None, "avg", 96)
    assert (model.preprocess, model.resize, model.draft_margin, model.mixed_precision) == ("caffe", "pad", 0, True)
    assert (model.top_k, model.runtime) == (0, "keras")
    assert model_from_provenance({"backbone": "x.keras", "weights": "embedded"}).weights == "none"
    assert model_from_provenance(provenance, {"resize": "stretch"}).resize == "stretch"


def hand_kept_fingerprint_inputs(config: ExtractConfig) -> dict:
    """The fingerprint as it was kept by hand, key by key: what every existing _plan.json recorded."""
    from pipeline.extract.plan import model_files
    from pipeline.io import redaction, storage

    model = config.model
    checksums = {key: storage.sha256_of_uri(uri, config.input.storage_options) for key, uri in model_files(config)}
    return {
        "backbone": redaction.redact(model.backbone), "backbone_sha256": checksums.get("model.backbone"),
        "weights": redaction.redact(model.weights), "weights_sha256": checksums.get("model.weights"),
        "layer": model.layer, "pooling": model.pooling, "input_size": model.input_size,
        "preprocess": model.preprocess, "resize": model.resize, "draft_margin": model.draft_margin,
        "top_k": model.top_k, "class_names": redaction.redact(model.class_names),
        "class_names_sha256": checksums.get("model.class_names"), "mixed_precision": model.mixed_precision,
        "feature_dtype": config.output.feature_dtype,
        "content_hashes": config.output.content_hashes,  # since the sha256 and phash columns (plan.py: older plans)
        "input_uri": [redaction.redact(uri) for uri in config.input.uri], "labels": config.input.labels,
        "extensions": list(config.input.extensions), "shard_size": config.run.shard_size,
    }


FINGERPRINT_CASES = [  # overrides on top of each shipped extract config: the test configs' variety
    [], ["model.layer=block_13_expand", "model.pooling=max", "model.resize=pad", "model.draft_margin=0"],
    ["model.input_size=96", "model.preprocess=tf", "model.top_k=0", "output.feature_dtype=float16"],
    ["input.labels=from_dirs", "input.extensions=[jpg, png]", "run.shard_size=128", "model.mixed_precision=true",
     "run.batch_size=7", "run.actors=2", "model.xla=true", "model.trust=true", "output.mode=overwrite"],
    ["input.uri=['https://user:pw@host/a.csv?X-Amz-Signature=abc', 's3://bucket/b/*.jpg']", "input.labels=json:label"],
    ["model.backbone={saved}", "model.class_names={names}", "model.runtime=litert", "model.weights=none"],
    ["model.backbone={saved}", "model.weights={weights}", "model.weights_sha256=abc"],
    ["model.backbone=resnet50", "model.weights={weights}", "input.labels=member:cls"],
]


@pytest.mark.parametrize("config_name", ["demo", "densenet121", "inceptionv3", "resnet50", "vgg16"])
def test_fingerprint_equals_the_hand_kept_one_for_every_config(tmp_path, config_name):
    """Outputs written before the fingerprint was derived from the config must still resume."""
    from pipeline.extract.plan import fingerprint_inputs

    files = {"saved": tmp_path / "model.keras", "weights": tmp_path / "m.weights.h5", "names": tmp_path / "n.txt"}
    for name, path in files.items():
        path.write_bytes(name.encode())
    configs = Path(__file__).parent.parent / "configs"
    for case in FINGERPRINT_CASES:
        local = ["model.backbone={saved}", "model.class_names={names}"] if config_name == "demo" else []
        overrides = ["input.uri=imgs", "output.uri=out"] + [item.format(**files) for item in local + case]
        config = load_config(ExtractConfig, configs / f"{config_name}.yaml", overrides)
        assert fingerprint_inputs(config) == hand_kept_fingerprint_inputs(config), case


def test_replace_keys_sets_typed_values_and_validates():
    from pipeline.sections import replace_keys

    config = load_config(ExtractConfig, None, ["input.uri=imgs", "output.uri=out"])
    changed = replace_keys(config, {"input.uri": ("my #1: photos",), "model.input_size": 96, "run.batch_size": 8})
    assert changed.input.uri == ("my #1: photos",) and changed.model.input_size == 96 and changed.run.batch_size == 8
    assert changed.model.backbone == config.model.backbone
    with pytest.raises(ConfigError, match=r"model\.draft_margin: got -1"):
        replace_keys(config, {"model.draft_margin": -1})
