"""Loading any command's config: YAML plus `--set` overrides, built and validated; a plain dict for logs."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from pipeline.config.extract import ExtractConfig, ModelConfig, is_saved_model_path
from pipeline.errors import ConfigError
from pipeline.sections import read_settings


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Sequence[str] = ()):
    """Read YAML (if given), apply `a.b=c` overrides, and build a validated `cls` instance."""
    data = read_settings(path, overrides)
    if cls is ExtractConfig and data.get("model") is not None and data.get("models") is not None:
        raise ConfigError("model and models are both set; use model: for one network or models: (a list of "
                          "model sections, each with a name) for several, not both")
    config = build(cls, data)
    if cls is ExtractConfig:
        check_explicit_weights(config.model, data.get("model") or {})
        for index, entry in enumerate(config.models):
            check_explicit_weights(entry, (data.get("models") or [])[index] or {}, f"models.{index}")
    return config


def build(cls: type, data: dict):
    """`cls` from a nested mapping of sections (a YAML document)."""
    unknown = sorted(str(name) for name in data if not isinstance(name, str))
    if unknown:
        allowed = ", ".join(item.name for item in dataclasses.fields(cls))
        raise ConfigError(f"config: unknown key(s) {', '.join(unknown)}; allowed keys: {allowed}")
    return cls(**data)


def check_explicit_weights(model: ModelConfig, given: dict, key: str = "model") -> None:
    """`model.weights` defaults to imagenet, which applies to zoo backbones only; a saved model carries its own
    weights, so an explicit `imagenet` beside one asks for something featurize cannot do."""
    if given.get("weights") == "imagenet" and is_saved_model_path(model.backbone):
        raise ConfigError(f"{key}.weights: imagenet applies to zoo backbones, but {key}.backbone {model.backbone} "
                          "is a saved model with its own weights; remove model.weights (or set it to a weights "
                          "file to load into the saved model)")


def to_dict(config: Any) -> dict:
    """Plain nested dict of a config (for logs and provenance); storage options are left out (secrets)."""
    result = dataclasses.asdict(config)
    for section_values in result.values():
        if isinstance(section_values, dict):
            section_values.pop("storage_options", None)
    return result
