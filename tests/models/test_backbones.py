"""The zoo registry against real Keras: every backbone builds (weights=None) and gives its feature_dim."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.models.zoo import BACKBONES, PREPROCESS_MODES, get_backbone, model_table

# Every keras.applications image classifier, in the Keras docs table's order (MobileNetV3 after V2).
KERAS_APPLICATIONS = [
    "Xception", "VGG16", "VGG19", "ResNet50", "ResNet50V2", "ResNet101", "ResNet101V2", "ResNet152",
    "ResNet152V2", "InceptionV3", "InceptionResNetV2", "MobileNet", "MobileNetV2", "MobileNetV3Small",
    "MobileNetV3Large", "DenseNet121", "DenseNet169", "DenseNet201", "NASNetMobile", "NASNetLarge",
    *[f"EfficientNetB{index}" for index in range(8)],
    *[f"EfficientNetV2{variant}" for variant in ("B0", "B1", "B2", "B3", "S", "M", "L")],
    *[f"ConvNeXt{variant}" for variant in ("Tiny", "Small", "Base", "Large", "XLarge")],
]

# Big builds (several seconds each on 2 cores): run with the slow marker.
SLOW = {"resnet152", "resnet152v2", "nasnetlarge", "efficientnetb5", "efficientnetb6", "efficientnetb7",
        "efficientnetv2m", "efficientnetv2l", "convnextlarge", "convnextxlarge"}

pytestmark = pytest.mark.usefixtures("free_keras_memory")


def zoo_params(names):
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in names]


def random_images(count: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def test_registry_covers_every_keras_application():
    import keras

    assert [backbone.keras_name for backbone in BACKBONES.values()] == KERAS_APPLICATIONS
    for name, backbone in BACKBONES.items():
        assert name == backbone.keras_name.lower()
        assert backbone.constructor.resolve() is getattr(keras.applications, backbone.keras_name)
        assert backbone.preprocess in PREPROCESS_MODES
        assert backbone.min_input_size <= backbone.input_size


@pytest.mark.parametrize(("name", "mode"), [
    ("vgg16", "caffe"), ("resnet50", "caffe"), ("resnet50v2", "tf"), ("densenet121", "torch"),
    ("inceptionv3", "tf"), ("xception", "tf"), ("mobilenetv2", "tf"), ("nasnetlarge", "tf"),
    ("mobilenetv3large", "none"), ("efficientnetb3", "none"), ("efficientnetv2s", "none"),
    ("convnextbase", "none"),
])
def test_each_family_carries_its_own_preprocessing(name, mode):
    assert get_backbone(name).preprocess == mode


@pytest.mark.parametrize(("name", "size"), [
    ("resnet50", 224), ("inceptionv3", 299), ("xception", 299), ("nasnetlarge", 331),
    ("efficientnetb1", 240), ("efficientnetb7", 600), ("efficientnetv2s", 384), ("efficientnetv2l", 480),
])
def test_native_input_sizes(name, size):
    assert get_backbone(name).input_size == size


def test_get_backbone_is_case_insensitive():
    assert get_backbone("ResNet50") is get_backbone(" resnet50 ") is BACKBONES["resnet50"]
    assert get_backbone("EfficientNetV2B0").keras_name == "EfficientNetV2B0"


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError) as raised:
        get_backbone("resnet51")
    message = str(raised.value)
    assert "'resnet51'" in message
    for known in ("resnet50", "mobilenetv2", "convnextxlarge", "efficientnetv2l"):
        assert known in message


def test_model_table_lists_every_family_with_its_numbers():
    rows = model_table()
    assert [row["keras_name"] for row in rows] == KERAS_APPLICATIONS
    for row in rows:
        assert isinstance(row["input_size"], int) and isinstance(row["feature_dim"], int)
        assert row["parameters_millions"] > 0
        assert 0.5 < row["top1"] < 1.0
        assert row["top5"] is None or row["top1"] < row["top5"] < 1.0
        assert row["preprocess"] in PREPROCESS_MODES
    by_name = {row["name"]: row for row in rows}
    # spot checks against the Keras applications docs table
    assert (by_name["resnet50"]["parameters_millions"], by_name["resnet50"]["top1"]) == (25.6, 0.749)
    assert (by_name["vgg16"]["depth"], by_name["vgg16"]["size_mb"]) == (16, 528)
    assert (by_name["efficientnetv2l"]["parameters_millions"], by_name["efficientnetv2l"]["top5"]) == (119.0, 0.975)
    assert (by_name["convnextxlarge"]["size_mb"], by_name["convnextxlarge"]["top1"]) == (1310, 0.867)


def test_importing_the_registry_does_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys; from pipeline.models.zoo import model_table; model_table(); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", zoo_params(BACKBONES))
def test_every_backbone_gives_its_feature_dim(name):
    """Every zoo entry's feature_dim against a real Keras build (weights=None, smallest accepted input, no head).

    Built in a stateless scope that leaves the variables uninitialised: Keras still builds every layer and
    infers every shape, but draws no random weights (most of the build time of the big models). The cut the
    extractor takes (`pooled_feature_tensor`) and Keras's own pooled output both have feature_dim channels;
    the extractor's pooling and forward pass over real weights are tested below and in test_extractor.py.
    """
    import keras

    from pipeline.models.surgery import pooled_feature_tensor

    backbone = get_backbone(name)
    side = backbone.min_input_size
    with keras.StatelessScope(initialize_variables=False):
        network = backbone.constructor(include_top=False, weights=None, input_shape=(side, side, 3), pooling="avg")
    assert tuple(network.output.shape) == (None, backbone.feature_dim)
    assert pooled_feature_tensor(network).shape[-1] == backbone.feature_dim


@pytest.mark.parametrize("name", ["vgg16", "mobilenetv2", "mobilenetv3small", "convnexttiny"])
def test_max_pooling_gives_the_same_dim(name):
    from pipeline.models.extractor import FeatureExtractor

    backbone = get_backbone(name)
    side = backbone.min_input_size
    extractor = FeatureExtractor(ModelConfig(backbone=name, runtime="keras", weights="none", input_size=side, top_k=0,
                                             pooling="max"), batch_size=2)
    output = extractor(random_images(2, side, seed=1))
    assert output.features.shape == (2, backbone.feature_dim)
    assert output.top_k_indices.shape == (2, 0)
    assert extractor.provenance["pooling"] == "max"


@pytest.mark.parametrize("name", ["vgg16", "mobilenet", "mobilenetv3small", "efficientnetb0", "convnexttiny"])
def test_features_do_not_depend_on_the_head(name, tmp_path):
    """With the classifier head (top_k > 0) the cut is the same tensor as without it: same features.

    These families end their heads differently (VGG: Flatten + Dense; MobileNet v1/v3: 1x1 convolutions
    after pooling; ConvNeXt: LayerNormalization after pooling), so the cut is found for each.
    """
    import keras

    from pipeline.models.extractor import FeatureExtractor
    from pipeline.models.loading import imagenet_class_names

    backbone = get_backbone(name)
    side = 32
    keras.utils.set_random_seed(0)
    full = backbone.constructor(include_top=True, weights=None, input_shape=(side, side, 3))
    weights = str(tmp_path / f"{name}.weights.h5")
    full.save_weights(weights)
    images = random_images(3, side, seed=2)

    without_head = FeatureExtractor(ModelConfig(backbone=name, runtime="keras", weights=weights, input_size=side, top_k=0), batch_size=4)
    with_head = FeatureExtractor(ModelConfig(backbone=name, runtime="keras", weights=weights, input_size=side, top_k=5), batch_size=4)
    plain, headed = without_head(images), with_head(images)

    np.testing.assert_allclose(headed.features, plain.features, rtol=1e-5, atol=1e-5)
    assert headed.top_k_indices.shape == (3, 5)
    assert (np.diff(headed.top_k_scores, axis=1) <= 0).all()
    assert with_head.class_names == imagenet_class_names()
    assert with_head.provenance["feature_dim"] == without_head.provenance["feature_dim"] == str(backbone.feature_dim)
    assert with_head.provenance["layer"] == without_head.provenance["layer"] == "default"


def test_every_zoo_row_has_size_parameters_and_feature_dim():
    """`featurize models` shows no `None` in these columns (MobileNetV3 once had no size)."""
    for row in model_table():
        for column in ("size_mb", "parameters_millions", "feature_dim"):
            assert isinstance(row[column], (int, float)) and row[column] > 0, (row["name"], column)
    by_name = {row["name"]: row for row in model_table()}
    sizes = [by_name[name]["size_mb"] for name in ("mobilenetv3small", "mobilenetv2", "mobilenetv3large")]
    assert sizes == sorted(sizes)  # as their parameter counts: 2.9M, 3.5M, 5.4M


def test_unknown_backbone_is_a_config_error():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown backbone 'resnet51'"):
        get_backbone("resnet51")


def test_saved_model_path_rule_needs_no_keras():
    """The extractor's saved-model rule is config's: applied before any worker exists, without TensorFlow."""
    import subprocess
    import sys

    code = (
        "import sys, pytest\n"
        "from pipeline.config import ConfigError, is_saved_model_path\n"
        "assert is_saved_model_path('s3://bucket/trucks.keras') and is_saved_model_path('/models/Dog.H5')\n"
        "assert not is_saved_model_path('resnet50')\n"
        "with pytest.raises(ConfigError, match='is a weights file, not a model'):\n"
        "    is_saved_model_path('gs://bucket/resnet50.weights.h5')\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
