"""Loading: zoo networks with their weights, saved Keras models (safely), weights and class-names files.

- a zoo backbone is built by its `keras.applications` constructor with `model.weights` `imagenet` (Keras
  download cache), `none` (random init) or the path/URI of a weights file (fetched through `storage`,
  checksummed against `model.weights_sha256`);
- a saved Keras model (`.keras` or `.h5`, `pipeline.config.is_saved_model_path`) is loaded in Keras safe mode;
  a model with a `Lambda` layer (arbitrary Python code) is refused unless `model.trust: true`.

A file the user can fix raises `ConfigError`. No URLs here: files come through `pipeline.io.storage`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterator
from importlib import resources
from typing import Any

from pipeline.config import ModelConfig, is_weights_file
from pipeline.errors import ConfigError
from pipeline.io import storage
from pipeline.models.zoo import Backbone, get_backbone

logger = logging.getLogger(__name__)

WEIGHTS_FILE_SUFFIXES = (".weights.h5", ".h5", ".keras")  # what Keras's `load_weights` reads


class WeightsUnavailableError(ConfigError, RuntimeError):
    """ImageNet weights are neither in the Keras cache nor downloadable from here; the message says the fix.

    A ConfigError (the user fixes it: pull the weights elsewhere, or choose a file); still a RuntimeError for
    callers that caught it as one."""


# ---------------------------------------------------------------------------------------------- class names


@functools.lru_cache(maxsize=1)
def imagenet_class_index() -> dict[str, list[str]]:
    """{"0": ["n01440764", "tench"], ...}: Keras's imagenet_class_index.json, shipped with the package."""
    text = resources.files("pipeline.data").joinpath("imagenet_class_index.json").read_text("utf-8")
    return json.loads(text)


def imagenet_class_names() -> list[str]:
    """The 1000 human-readable names, by class index (as `decode_predictions` shows them)."""
    index = imagenet_class_index()
    return [index[str(i)][1] for i in range(len(index))]


def read_class_names(uri: str, storage_options: dict | None) -> tuple[list[str], str]:
    """(one name a line, sha256 of the very bytes the names come from)."""
    data = storage.read_bytes(uri, storage_options)
    names = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    return names, hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- files


def keras_cache_dir() -> str:
    """Where keras.applications caches downloaded weights ($KERAS_HOME/models or ~/.keras/models)."""
    try:
        from keras.src.backend.config import keras_home

        base = keras_home()
    except Exception:  # noqa: BLE001 - private accessor; fall back to Keras's documented rule
        base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(os.path.expanduser(base), "models")


def checked_sha256(path: str, uri: str, expected: str | None) -> str:
    """The file's sha256; a ConfigError when it differs from `expected` (model.weights_sha256)."""
    actual = storage.sha256_of_file(path)
    if expected and expected.strip().lower() != actual:
        raise ConfigError(
            f"model.weights_sha256: expected {expected} but {uri} has sha256 {actual}; the file changed "
            f"or the checksum is wrong (update model.weights_sha256 only if you trust the new file)"
        )
    return actual


def is_download_failure(error: Exception) -> bool:
    return "URL fetch failure" in str(error) or isinstance(error, OSError)  # ConnectionError is an OSError


@contextlib.contextmanager
def dtype_policy(mixed_precision: bool) -> Iterator[None]:
    """mixed_float16 while a keras.applications constructor builds (it takes no dtype argument; layers keep the
    policy they were built with), then Keras's global policy as it was."""
    if not mixed_precision:
        yield
        return
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# ---------------------------------------------------------------------------------------------- zoo networks


def construct(backbone: Backbone, include_top: bool, side: int, weights: str | None, mixed_precision: bool):
    kwargs: dict[str, Any] = {"include_top": include_top, "weights": weights}
    if include_top:
        if side != backbone.input_size or weights is None:
            kwargs["input_shape"] = (side, side, 3)
    else:
        kwargs["input_shape"] = (side, side, 3)
        kwargs["pooling"] = "avg"  # marks the feature map; the cut is taken before it
    with dtype_policy(mixed_precision):
        return backbone.constructor(**kwargs)


def zoo_network(config: ModelConfig, backbone: Backbone, include_top: bool, side: int,
                storage_options: dict | None) -> tuple[Any, str]:
    """(the keras.applications model with the configured weights: imagenet / none / a file, the weights file's
    sha256 or "")."""
    weights = config.weights
    if weights == "none":
        return construct(backbone, include_top, side, None, config.mixed_precision), ""
    if weights == "imagenet":
        if config.weights_sha256:
            raise ConfigError(
                "model.weights_sha256 is set but model.weights is imagenet (Keras checks its own downloads); "
                "pin a file instead: `featurize weights pull NAME --to URI`, then model.weights: URI"
            )
        try:
            return construct(backbone, include_top, side, "imagenet", config.mixed_precision), ""
        except Exception as error:  # noqa: BLE001 - classified: download failures only
            if is_download_failure(error):
                raise WeightsUnavailableError(
                    f"backbone {backbone.name}: its ImageNet weights are not in the Keras cache "
                    f"({keras_cache_dir()}) and could not be downloaded from here ({error}). Fix: on a "
                    f"machine with internet run `featurize weights pull {backbone.name} --to URI` "
                    f"(URI: a path or bucket these workers can read), then set `model.weights: URI` "
                    f"(and `model.weights_sha256` to the checksum it prints); or set `model.weights: none` "
                    f"for random weights"
                ) from error
            raise
    return zoo_network_from_file(config, backbone, include_top, side, storage_options)


def zoo_network_from_file(config: ModelConfig, backbone: Backbone, include_top: bool, side: int,
                          storage_options: dict | None) -> tuple[Any, str]:
    """Build with random init, then load a weights file (the full-model file from `featurize weights
    pull` fits with and without the head; a `_notop` file only without)."""
    uri = config.weights
    if not uri.lower().endswith(WEIGHTS_FILE_SUFFIXES):
        raise ConfigError(
            f"model.weights: {uri!r} is neither imagenet, none, nor a weights file "
            f"({', '.join(WEIGHTS_FILE_SUFFIXES)}); get one with `featurize weights pull NAME --to URI`"
        )
    with storage.local_copy(uri, storage_options) as path:
        checksum = checked_sha256(path, uri, config.weights_sha256)
        errors = []
        for with_head in [include_top] if include_top else [False, True]:
            network = construct(backbone, with_head, side, None, config.mixed_precision)
            try:
                network.load_weights(path)
                return network, checksum
            except Exception as error:  # noqa: BLE001 - reported below with both attempts
                errors.append(f"include_top={with_head}: {error}")
    raise ConfigError(
        f"model.weights: {uri} does not fit {backbone.keras_name} at {side}x{side} "
        f"({'; '.join(errors)[:1500]}). A file from `featurize weights pull {backbone.name}` holds "
        f"the whole model; a '_notop' file only fits model.top_k: 0"
    )


# ---------------------------------------------------------------------------------------------- saved models


def load_saved_model(config: ModelConfig, storage_options: dict | None) -> tuple[Any, str, str]:
    """(the Keras model in `model.backbone`, the model file's sha256, the weights' sha256: the model file's
    unless `model.weights` names a separate weights file, loaded into it)."""
    uri = config.backbone
    separate_weights = is_weights_file(config.weights)
    if separate_weights:
        logger.info("model.weights %s is loaded into the saved model %s", config.weights, uri)
    with storage.local_copy(uri, storage_options) as path:
        expected = None if separate_weights else config.weights_sha256
        backbone_sha256 = checked_sha256(path, uri, expected)
        model = read_saved_model(path, uri, config.trust)
    weights_sha256 = backbone_sha256
    if separate_weights:
        weights_sha256 = load_separate_weights(model, uri, config, storage_options)
    return model, backbone_sha256, weights_sha256


def read_saved_model(path: str, uri: str, trust: bool):
    """keras.models.load_model in safe mode (unless model.trust); a file Keras cannot load is the user's to fix."""
    import keras

    if not trust:
        refuse_lambda_layers(path, uri)
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not trust)
    except (ValueError, TypeError, OSError) as error:
        if "safe_mode" in str(error):
            raise ConfigError(
                f"model.backbone: {uri} needs unsafe deserialization ({error}); if you trust this file, "
                f"set `model.trust: true`"
            ) from error
        raise ConfigError(
            f"model.backbone: {uri} could not be loaded by Keras {keras.__version__} "
            f"({type(error).__name__}: {str(error)[:1500]}); give a whole model saved with `model.save` "
            f"(.keras or .h5) whose layers are Keras's own (custom layer classes cannot be loaded here)"
        ) from error


def find_lambda_layers(config: Any) -> list[str]:
    """Names of Lambda layers anywhere in a serialized Keras model config (nested models included)."""
    found: list[str] = []
    if isinstance(config, dict):
        if config.get("class_name") == "Lambda":
            inner = config.get("config") or {}
            found.append(str(inner.get("name", "?")) if isinstance(inner, dict) else "?")
        for value in config.values():
            found.extend(find_lambda_layers(value))
    elif isinstance(config, list):
        for value in config:
            found.extend(find_lambda_layers(value))
    return found


def saved_model_config(path: str) -> Any:
    """The architecture JSON of a .keras (config.json in the zip) or legacy .h5 (model_config attribute)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    import h5py

    with h5py.File(path, "r") as handle:
        raw = handle.attrs.get("model_config")
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    return json.loads(raw)


def refuse_lambda_layers(path: str, uri: str) -> None:
    try:
        architecture = saved_model_config(path)
    except (OSError, KeyError, ValueError) as error:  # not a zip with config.json, nor an HDF5 file
        raise ConfigError(
            f"model.backbone: {uri} is not a saved Keras model: neither a .keras archive nor an HDF5 model "
            f"file ({type(error).__name__}: {error})"
        ) from error
    lambdas = find_lambda_layers(architecture)
    if lambdas:
        raise ConfigError(
            f"model.backbone: {uri} contains Lambda layer(s) {', '.join(lambdas)}, which run arbitrary "
            f"Python code when loaded; refused in safe mode. If you trust this file, set `model.trust: true`"
        )


def load_separate_weights(model, uri: str, config: ModelConfig, storage_options: dict | None) -> str:
    """Load `model.weights` into the saved model; return the weights file's sha256."""
    weights_uri = config.weights
    with storage.local_copy(weights_uri, storage_options) as weights_path:
        checksum = checked_sha256(weights_path, weights_uri, config.weights_sha256)
        try:
            model.load_weights(weights_path)
        except (ValueError, TypeError, OSError, KeyError) as error:
            raise ConfigError(
                f"model.weights: {weights_uri} does not fit the saved model {uri} "
                f"({type(error).__name__}: {str(error)[:1500]}); give the weights of this architecture "
                f"(saved with `model.save_weights`), or leave model.weights unset to use the model's own"
            ) from error
    return checksum


# ---------------------------------------------------------------------------------------------- weights pull


def pull_weights(backbone_name: str, destination_uri: str, storage_options: dict | None = None,
                 weights: str | None = "imagenet") -> str:
    """Build a zoo backbone with its ImageNet weights (Keras download cache), save the whole model's weights
    (head included: the file fits model.top_k 0 and > 0) and upload them; return the file's sha256.

    `destination_uri` is the file to write (ending .weights.h5) or a directory, which gets
    `<name>_imagenet.weights.h5`. `weights` other than "imagenet" (None: random init, or a local file)
    exists for tests and air-gapped round trips.
    """
    backbone = get_backbone(backbone_name)
    if not destination_uri.lower().endswith(".weights.h5"):
        suffix = "_imagenet" if weights == "imagenet" else ""
        destination_uri = storage.join(destination_uri, f"{backbone.name}{suffix}.weights.h5")
    try:
        network = backbone.constructor(include_top=True, weights=weights)
    except Exception as error:  # noqa: BLE001 - classified: download failures only
        if weights == "imagenet" and is_download_failure(error):
            raise WeightsUnavailableError(
                f"backbone {backbone.name}: could not download its ImageNet weights ({error}); "
                f"`featurize weights pull` needs a machine with internet access"
            ) from error
        raise
    with tempfile.TemporaryDirectory(prefix="featurize-weights-") as directory:
        local = os.path.join(directory, f"{backbone.name}.weights.h5")
        network.save_weights(local)
        checksum = storage.sha256_of_file(local)
        storage.upload_file(local, destination_uri, storage_options)
    logger.info("pulled %s weights to %s (sha256 %s)", backbone.name, destination_uri, checksum)
    return checksum
