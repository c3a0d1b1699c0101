"""Several models fed by one decode (extract's `models:`), on the actor's side: the models one actor holds, one
decode of each image for them all, then each model's resize, forward pass, rows and data file. No Ray.

An image is fetched and decoded once (JPEG draft at the scale that covers the largest input any model needs, see
decode.open_decoded), then resized for each model by its own `resize` and input size (pipeline/extract/pixels.py);
a model that needs far fewer pixels than the decode holds resizes from a box-reduced copy (reduction_factor).
Everything per image after the decode is the one-model worker's own (worker.forward, add_rows, check_finite_rows,
worker.write_shard), so a model's rows hold what a one-model run of it writes, error rows and content hashes
included (sha256 from the bytes, phash from the largest `stretch` input or else the shared decode: each computed once,
the same in every model's rows). Each model's data file goes to its own output, `OUTPUT/NAME/`, named with the run
tag of that output's lease; pipeline/extract/model_outputs.py commits.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
from PIL import Image

from pipeline.config import NamedModelConfig, is_saved_model_path
from pipeline.errors import ConfigError
from pipeline.extract import items, worker
from pipeline.extract.decode import DecodedImage, DecodedSource, open_decoded
from pipeline.extract.hashes import perceptual_hash as phash_of
from pipeline.extract.pixels import scaled_source_size
from pipeline.extract.rows import ShardRows
from pipeline.io import storage
from pipeline.models.zoo import get_backbone

log = logging.getLogger("featurize")

# What one model costs an actor beyond its float32 weights: the built Keras graph and the runtime's own copy (LiteRT
# converts and keeps a flatbuffer), the conversion's peak, then activations and buffers for a batch.
WEIGHT_COPIES = 4
PER_MODEL_BYTES = 256 * 2**20
GIB = 2**30

Target = tuple[tuple[int, int], str, int]  # (input size (height, width), resize mode, draft margin)


@dataclass
class ModelsResult:
    """One piece of a shard, every model it ran for: each model's result names that model's data file."""

    shard: int
    start: int
    stop: int
    results: dict[str, worker.ShardResult]

    @property
    def rows(self) -> int:  # the piece's images: every model writes a row for each
        return self.stop - self.start

    @property
    def error(self) -> int:  # for the progress display: the most error rows any model wrote
        return max((result.error for result in self.results.values()), default=0)


def decode_for_models(data: bytes, targets: dict[str, Target], perceptual_hash: bool = False) -> DecodedImage:
    """One decode of `data`, resized for every model: `pixels` maps a model's name to its input (an error applies
    to them all: the bytes are the same); the phash, when asked for, once for them all (hashes.perceptual_hash)."""
    with open_decoded(data, list(targets.values())) as source:
        if source.error is not None:
            return DecodedImage(None, None, None, source.error)
        reduced: dict[int, Image.Image] = {}  # reduction factor -> the decoded image reduced by it
        stretched = [(size, name) for name, (size, resize, _) in targets.items() if resize == "stretch"]
        hashed_by = max(stretched)[1] if perceptual_hash and stretched else None  # the largest stretch: cheapest
        pixels, phash = {}, None
        for name, (size, resize, margin) in targets.items():
            factor = reduction_factor(source, size, resize, margin)
            if factor not in reduced:
                reduced[factor] = source.rgb.reduce(factor) if factor > 1 else source.rgb
            image = dataclasses.replace(source, rgb=reduced[factor]).resized(size, resize,
                                                                             perceptual_hash=name == hashed_by)
            pixels[name], phash = image.pixels, phash or image.phash
        if perceptual_hash and hashed_by is None:
            phash = phash_of(source.rgb)
        width, height = source.original_size
        return DecodedImage(pixels, width, height, None, phash)


def reduction_factor(source: DecodedSource, size: tuple[int, int], resize: str, margin: int) -> int:
    """How far a model's resize may start from a box-reduced copy of the shared decode: the largest of 8, 4, 2 that
    keeps it >= margin x what the resize needs, as the JPEG draft of a one-model run would (1 for the formats that
    run decodes in full). The resize reads a quarter or less of the pixels, and the model gets pixels close to
    those of its one-model run, whose draft reduced the image by a like factor."""
    if not source.draftable or margin <= 0:
        return 1
    needed_width, needed_height = scaled_source_size(source.original_size, size, resize)
    width, height = source.rgb.size
    for factor in (8, 4, 2):
        if width // factor >= margin * needed_width and height // factor >= margin * needed_height:
            return factor
    return 1


def for_model(item: items.Item, name: str) -> items.Item:
    """The item as a one-model worker sees it: its pixels for that model."""
    if item.image.error is not None:
        return item
    return dataclasses.replace(item, image=dataclasses.replace(item.image, pixels=item.image.pixels[name]))


def estimated_bytes(model: NamedModelConfig, storage_options: dict | None = None) -> int:
    """About what one model takes in an actor: WEIGHT_COPIES of its float32 weights (the zoo's parameter count, or
    a saved model's file size) plus PER_MODEL_BYTES."""
    if is_saved_model_path(model.backbone):
        weights = storage.size_of(model.backbone, storage_options) or 0
    else:
        weights = int(get_backbone(model.backbone).parameters_millions * 1e6 * 4)
    return WEIGHT_COPIES * weights + PER_MODEL_BYTES


def check_memory(models: tuple[NamedModelConfig, ...], storage_options: dict | None = None,
                 available: int | None = None) -> int:
    """Refuse, before building any, models that together cannot fit in this actor's memory (one actor holds them
    all); returns the estimate in bytes."""
    needs = {model.name: estimated_bytes(model, storage_options) for model in models}
    total = sum(needs.values())
    available = psutil.virtual_memory().available if available is None else available
    if total > available:
        each = ", ".join(f"{name} {size / GIB:.1f} GiB" for name, size in needs.items())
        raise ConfigError(f"models: one actor holds every model and these need about {total / GIB:.1f} GiB "
                          f"({each}), but the node has {available / GIB:.1f} GiB available; list fewer models "
                          "(run several extracts over the same input), or use nodes with more memory")
    return total


class ModelSet:
    """Every model of a `models:` run, built once in one actor, and the processing of a shard piece for the models
    it still lacks (task.models). The batch size is the smallest of the models' own (each halves its own after
    running out of accelerator memory)."""

    def __init__(self, models: tuple[NamedModelConfig, ...], batch_size: int, storage_options: dict | None = None,
                 num_threads: int | None = None):
        from pipeline.models.extractor import FeatureExtractor  # TensorFlow only inside actors

        self.memory_bytes = check_memory(models, storage_options)
        self.models = {model.name: model for model in models}
        self.extractors = {model.name: FeatureExtractor(model.model_config(), batch_size=batch_size,
                                                        storage_options=storage_options, num_threads=num_threads)
                           for model in models}

    def description(self) -> dict:
        """What the driver needs of every model: provenance and feature size (quarantine rows, `_SUCCESS`)."""
        first = next(iter(self.extractors.values()))
        models = {name: {"provenance": extractor.provenance, "feature_dim": extractor.feature_dim}
                  for name, extractor in self.extractors.items()}
        runtimes = sorted({extractor.runtime for extractor in self.extractors.values()})
        return {"models": models, "provenance": first.provenance, "feature_dim": first.feature_dim,
                "runtime": "+".join(runtimes), "memory_bytes": self.memory_bytes}

    def targets(self, names: tuple[str, ...]) -> dict[str, Target]:
        return {name: (self.extractors[name].input_size, self.models[name].resize, self.models[name].draft_margin)
                for name in names}

    def piece_batches(self, task: worker.ShardTask, settings: worker.ShardSettings,
                      timings: collections.Counter) -> Iterator[list[items.Item]]:
        """The piece's images decoded once for the models it lacks, in batches of the smallest batch size."""
        names = task.models or tuple(self.extractors)
        decode = functools.partial(decode_for_models, targets=self.targets(names),
                                   perceptual_hash=settings.decode.content_hashes)
        batch_size = min(self.extractors[name].batch_size for name in names)
        return worker.decoded_batches(task, decode, batch_size, settings, timings)

    def process(self, task: worker.ShardTask, settings: worker.ShardSettings,
                decoded: Iterator[list[items.Item]] | None = None, timings: collections.Counter | None = None,
                model_turn: contextlib.AbstractContextManager | None = None) -> ModelsResult:
        """Each model its rows and its data file in `OUTPUT/NAME/`, from one decode of the piece: `decoded` (with its
        seconds in `timings`), or decoded here; `model_turn` held while the models run (as worker.process_shard)."""
        names = task.models or tuple(self.extractors)
        piece_started = time.perf_counter()
        shared = collections.Counter() if timings is None else timings  # wait, fetch, decode: once for every model
        rows = {name: ShardRows() for name in names}
        forward = {name: collections.Counter() for name in names}
        with model_turn or contextlib.nullcontext():
            if decoded is None:
                decoded = self.piece_batches(task, settings, shared)
            for group in worker.waited(decoded, shared):
                for name in names:
                    extractor = self.extractors[name]
                    started = time.perf_counter()
                    own = [for_model(item, name) for item in group]
                    worker.add_rows(rows[name], own, worker.forward(own, extractor), extractor.class_names,
                                    settings.feature_dtype)
                    forward[name]["forward"] += time.perf_counter() - started
        for name in names:  # before any file is written: a model gone non-finite fails the piece like a bug
            worker.check_finite_rows(task, rows[name], name)
        run_tags = dict(settings.model_run_tags)
        results = {}
        for name in names:
            own = dataclasses.replace(settings, output_uri=storage.join(settings.output_uri, name),
                                      run_tag=run_tags.get(name, settings.run_tag))
            results[name] = worker.write_shard(task, rows[name], self.extractors[name], own, shared + forward[name],
                                               piece_started)
        return ModelsResult(task.shard, task.start, task.stop, results)
