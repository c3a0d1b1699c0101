"""The `featurize` command line: what a user sees."""

from pipeline.backbones import BACKBONES
from pipeline.cli import main


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
    assert "model.pooling" in capsys.readouterr().out
