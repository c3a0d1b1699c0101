"""Labelled images for a fine-tune: the listing split into train, validation and test, and batches of pixels
streamed through extract's own fetch, decode and resize (pipeline/extract/worker.py), so every source extract
reads (local, cloud, manifests, tar/zip archives) trains the same way. No Ray.

Memory: the split holds each image's URI and class (strings, as `list_images` does for compare); pixels exist
only for the batches being decoded, a bounded window ahead of the model. An image that cannot be fetched or
decoded is left out of its batch and reported with its reason, never a crash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import InputConfig, ModelConfig, SplitConfig
from pipeline.errors import ConfigError
from pipeline.extract import archives, items, worker
from pipeline.extract.listing import list_images
from pipeline.train.labels import check_classes, encode_labels


@dataclass(frozen=True)
class Part:
    """The images of one split: URIs and class indices, in listing order."""

    uris: list[str]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.uris)


@dataclass(frozen=True)
class Splits:
    classes: list[str]
    train: Part  # what the network trains on
    validation: Part  # a slice of the train split: early stopping
    test: Part  # held out: the reported metrics, for the fine-tuned model and the linear probe alike
    listing_sha256: str  # of every (uri, label) in listing order
    skipped_unlabelled: int


def split_images(input_config: InputConfig, split: SplitConfig, validation_fraction: float) -> Splits:
    """The listing's labelled images in a stratified train / validation / test split (seeded: a rerun, and a
    resume, gets the same split)."""
    listing = list_images(input_config)
    uris = np.asarray(listing.column("uri").to_pylist(), dtype=object)
    labels = np.asarray(listing.column("label").to_pylist(), dtype=object)
    labelled = np.asarray([label is not None and label != "" for label in labels], dtype=bool)
    uris, labels = uris[labelled], labels[labelled].astype(str)
    classes = sorted(set(labels.tolist()))
    targets = encode_labels(labels, classes)
    check_classes(classes, np.bincount(targets, minlength=len(classes)))
    positions = np.arange(len(uris))
    rest, test = stratified(positions, targets, split.test_fraction, split.seed, "split.test_fraction")
    train, validation = stratified(rest, targets[rest], validation_fraction, split.seed,
                                   "finetune.validation_fraction", plain_if_too_few=True)
    check_classes(classes, np.bincount(targets[train], minlength=len(classes)))

    def part(chosen: np.ndarray) -> Part:
        chosen = np.sort(chosen)  # listing order: archive members stay together
        return Part(uris[chosen].tolist(), targets[chosen])

    return Splits(classes, part(train), part(validation), part(test), listing_digest(listing),
                  int((~labelled).sum()))


def stratified(positions: np.ndarray, targets: np.ndarray, fraction: float, seed: int, key: str,
               plain_if_too_few: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) positions, each class in proportion; a validation slice too small to hold every class
    is a plain random one (it only decides when to stop), a test split is refused."""
    from sklearn.model_selection import train_test_split

    if plain_if_too_few and round(len(positions) * fraction) < len(set(targets.tolist())):
        return tuple(train_test_split(positions, test_size=fraction, random_state=seed))
    try:
        return tuple(train_test_split(positions, test_size=fraction, stratify=targets, random_state=seed))
    except ValueError as error:
        raise ConfigError(f"{key}: a stratified split of {len(positions)} labelled images in "
                          f"{len(set(targets.tolist()))} classes with {key.split('.')[-1]}={fraction} failed "
                          f"({error}); add images (at least 3 a class), or change {key}") from error


def listing_digest(listing) -> str:
    digest = hashlib.sha256()
    for uri, label in zip(listing.column("uri").to_pylist(), listing.column("label").to_pylist()):
        digest.update(f"{uri}\t{label}\n".encode())
    return digest.hexdigest()


@dataclass
class Stream:
    """Batches of one split through extract's fetch and decode; remembers the images it had to leave out."""

    input_storage_options: dict
    model: ModelConfig
    input_size: tuple[int, int]
    decode_threads: int
    left_out: dict[str, str] = field(default_factory=dict)  # uri -> why it could not be used

    def batches(self, part: Part, batch_size: int, seed: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(float32 pixels 0..255, class indices) batches of `part`, shuffled with `seed` (None: listing order)."""
        order = shuffled(part.uris, seed) if seed is not None else np.arange(len(part))
        task = worker.ShardTask(0, 0, len(order), uris=[part.uris[index] for index in order],
                                labels=[str(part.targets[index]) for index in order])
        decode_settings = items.DecodeSettings(self.input_storage_options, self.model.resize, self.model.draft_margin,
                                               content_hashes=False)  # training needs the pixels alone
        settings = worker.ShardSettings("", {}, decode_settings, decode_threads=self.decode_threads)
        decode = items.image_decoder(self.input_size, settings.decode)
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="finetune-decode") as executor:
            decoded = worker.decoded_items(task, decode, settings, executor, 2 * batch_size)
            for group in worker.batches(decoded, batch_size):
                good = [item for item in group if item.image.error is None]
                self.left_out.update((item.uri, item.image.error) for item in group if item.image.error is not None)
                if good:
                    yield (np.stack([item.image.pixels for item in good]).astype(np.float32),
                           np.asarray([int(item.label) for item in good], dtype=np.int64))


def shuffled(uris: list[str], seed: int) -> np.ndarray:
    """A random order in which the members of one archive stay together (an archive is read as one stream),
    archives and loose files in random order among themselves."""
    generator = np.random.default_rng(seed)
    order = generator.permutation(len(uris))
    groups: dict[str, list[int]] = {}
    for index in order:
        archive = archives.archive_of(uris[index])
        groups.setdefault(archive if archive is not None else f"\0{index}", []).append(int(index))
    keys = list(groups)
    return np.asarray([index for key in generator.permutation(len(keys)) for index in sorted(groups[keys[key]])],
                      dtype=np.int64)


def steps(num_images: int, batch_size: int) -> int:
    return max(1, -(-num_images // batch_size))
