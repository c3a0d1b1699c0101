"""`featurize bench --scale`: the figures of large inputs, on generated data.

  (d) manifests: for Parquet manifests of 1M and 10M entries (synthetic: the first shard names real images, the
      rest objects that need not exist), the driver's peak RSS and the seconds from start to the first commit,
      each in a fresh process (pipeline/tools/plan_memory.py);
  (e) archives: images/s of the same JPEGs as WebDataset-style tar shards and as loose files, on local disk and, with
      `--s3 s3://bucket/prefix`, on that S3 store, with the object GETs each run made (listing included) where the
      store counts them (the tests' loopback server does).

A small Keras model keeps the forward pass cheap, so that (e) shows what fetching costs. Figures, never assertions.
"""

from __future__ import annotations

import collections
import json
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline import charts
from pipeline.config import ExtractConfig, InputConfig, ModelConfig, OutputConfig, RunConfig
from pipeline.io import storage
from pipeline.tools.bench import write_images
from pipeline.tools.plan_memory import first_commit, write_manifest


@dataclass(frozen=True)
class ScaleSettings:
    manifest_entries: tuple[int, ...] = (1_000_000, 10_000_000)
    shard_size: int = 1000  # images per shard in (d)
    archive_images: int = 1024  # JPEGs in (e)
    images_per_tar: int = 128  # one shard per tar in (e)
    image_size: tuple[int, int] = (160, 120)


def small_model(path: Path) -> str:
    """A real Keras classifier on 64x64 inputs, saved as .keras: the pipeline's costs without a large forward."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
    keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x)).save(path)
    return str(path)


def manifest_figures(settings: ScaleSettings, scratch: Path, model: str) -> list[dict]:
    """(d): one fresh driver per manifest size, stopped at its first commit."""
    real = [str(path) for path in write_images(scratch / "first-shard", settings.shard_size, (64, 48))]
    figures = []
    for entries in settings.manifest_entries:
        manifest = scratch / f"manifest-{entries}.parquet"
        write_manifest(str(manifest), entries, real)
        measured = first_commit(str(manifest), model, str(scratch / f"out-{entries}"), settings.shard_size)
        figures.append({"entries": entries, "manifest_bytes": manifest.stat().st_size, **measured})
        manifest.unlink()
    return figures


def write_tars(paths: list[Path], directory: Path, per_tar: int) -> None:
    """WebDataset layout: members `<key>.jpg`, `per_tar` a shard, names `shard-00000.tar`..."""
    directory.mkdir(parents=True, exist_ok=True)
    for first in range(0, len(paths), per_tar):
        with tarfile.open(directory / f"shard-{first // per_tar:05d}.tar", "w") as archive:
            for path in paths[first:first + per_tar]:
                archive.add(path, arcname=path.name)


@dataclass
class S3Target:
    """Where (e) measures on S3: a prefix the run may write under, its storage options, and the store's count of the
    requests it answered by method, where the store keeps one (the tests' loopback server does)."""

    prefix: str  # s3://bucket/some/prefix
    options: dict
    counts: collections.Counter | None = None


def timed_run(input_uri: str, options: dict, model: str, output: Path, shard_size: int) -> dict:
    """One extract on the local Ray; images/s between the first and the last commit (start-up left out)."""
    from pipeline.extract.driver import run_extract
    from pipeline.output import ledger

    config = ExtractConfig(input=InputConfig(uri=(input_uri,), storage_options=options),
                           model=ModelConfig(backbone=model, weights="none", top_k=0),
                           run=RunConfig(actors=1, shard_size=shard_size, batch_size=64),
                           output=OutputConfig(uri=str(output), mode="overwrite")).validate()
    success = run_extract(config)
    commits = sorted(ledger.read_commits(str(output)).values(), key=lambda record: record.committed_at)
    steady_rows = sum(record.rows for record in commits[1:])
    steady_seconds = commits[-1].committed_at - commits[0].committed_at
    return {"images_per_second": steady_rows / steady_seconds if steady_seconds > 0 else float("nan"),
            "rows": success["rows"], "total_seconds": success["seconds"]["total"]}


def archive_figures(settings: ScaleSettings, scratch: Path, model: str, s3: S3Target | None = None) -> dict:
    """(e): tar shards vs loose files, on local disk and, given a target, on S3."""
    paths = write_images(scratch / "loose", settings.archive_images, settings.image_size)
    write_tars(paths, scratch / "tars", settings.images_per_tar)
    figures = {}
    for name, uri in (("loose", str(scratch / "loose")), ("tar", str(scratch / "tars" / "shard-*.tar"))):
        figures[f"local {name}"] = timed_run(uri, {}, model, scratch / f"out-local-{name}", settings.images_per_tar)
    if s3 is not None:
        for folder in ("loose", "tars"):
            for path in sorted((scratch / folder).iterdir()):
                storage.upload_file(str(path), storage.join(s3.prefix, folder, path.name), s3.options)
        for name, uri in (("loose", storage.join(s3.prefix, "loose") + "/"),
                          ("tar", storage.join(s3.prefix, "tars", "shard-*.tar"))):
            if s3.counts is not None:
                s3.counts.clear()
            figure = timed_run(uri, s3.options, model, scratch / f"out-s3-{name}", settings.images_per_tar)
            if s3.counts is not None:
                figure.update(requests=dict(s3.counts), object_gets=s3.counts["GET"])
            figures[f"S3 {name}"] = figure
    figures["num_images"], figures["num_tars"] = len(paths), -(-len(paths) // settings.images_per_tar)
    return figures


def run_scale_bench(settings: ScaleSettings, output_dir: Path, console, s3: S3Target | None = None) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="featurize-bench-scale-") as scratch:
        scratch = Path(scratch)
        model = small_model(scratch / "small.keras")
        console.print(f"bench --scale: manifests of {', '.join(f'{n:,}' for n in settings.manifest_entries)} "
                      f"entries; {settings.archive_images} JPEGs as tars of {settings.images_per_tar} and loose")
        result = {"settings": asdict(settings), "manifests": manifest_figures(settings, scratch, model)}
        result["archives"] = archive_figures(settings, scratch, model, s3)
    (output_dir / "bench-scale.json").write_text(json.dumps(result, indent=2))
    print_scale(result, console)
    return result


def print_scale(result: dict, console) -> None:
    lines = []
    for figure in result["manifests"]:
        lines.append((f"(d) {figure['entries']:,}-entry manifest",
                      f"driver peak RSS {figure['peak_rss_bytes'] / 2**20:.0f} MiB, first commit after "
                      f"{figure['seconds_to_first_commit']:.1f} s (planning {figure['planning_seconds']:.1f} s)"))
    if len(result["manifests"]) > 1:
        first, last = result["manifests"][0], result["manifests"][-1]
        lines.append(("(d) peak ratio", f"{last['peak_rss_bytes'] / first['peak_rss_bytes']:.2f}x for "
                                        f"{last['entries'] / first['entries']:.0f}x the entries"))
    archives = result["archives"]
    for name in ("local loose", "local tar", "S3 loose", "S3 tar"):
        figure = archives.get(name)
        if figure is None:
            continue
        gets = f", {figure['object_gets']} object GETs" if "object_gets" in figure else ""
        lines.append((f"(e) {name}", f"{figure['images_per_second']:.0f} images/s{gets}"))
    lines.append(("(e) data", f"{archives['num_images']} JPEGs, {archives['num_tars']} tars"))
    console.print(charts.key_value_table("featurize bench --scale", lines))
