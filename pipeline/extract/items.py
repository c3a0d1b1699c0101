"""One image's way from a URI to decoded pixels, in a worker's threads: read its bytes (a Reader: fsspec, or the
builder `input.reader` names), decode them (decode.py), hash them (hashes.py), as an Item. No Ray.

An image that cannot be fetched or decoded is an Item with the reason (its error row); an exception that is not the
store's or the image's is a bug in featurize and propagates (the shard is retried, then the run stops).
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

from pipeline.config import ModelConfig, OutputConfig, reader_builder
from pipeline.extract.decode import DecodedImage, decode_image
from pipeline.extract.hashes import bytes_sha256
from pipeline.io import faults, storage

Decoder = Callable[[bytes], DecodedImage]  # an image's bytes -> its pixels at the model's input size, or an error


@dataclass(frozen=True)
class DecodeSettings:
    """How an image is fetched and decoded: all a worker needs of the job's config for one image (search's image
    queries use it too)."""

    input_storage_options: dict
    resize: str = ModelConfig.resize
    draft_margin: int = ModelConfig.draft_margin
    content_hashes: bool = OutputConfig.content_hashes  # sha256 and phash of every ok image
    reader: str | None = None  # input.reader: a builder of a Reader; None: fsspec
    reader_options: dict = field(default_factory=dict)

    @property
    def reader_part(self) -> Reader:
        if self.reader is None:
            return Reader(self.input_storage_options)
        return built_reader(self.reader, json.dumps(self.reader_options, sort_keys=True, default=str),
                            json.dumps(self.input_storage_options, sort_keys=True, default=str))


class Reader:
    """How a worker gets an image's bytes and an archive's stream: fsspec with the input's storage options.
    `input.reader` names a builder, `builder(storage_options, **input.reader_options)`, returning another (a
    subclass, or any object with these two methods)."""

    def __init__(self, storage_options: dict):
        self.storage_options = storage_options

    def read(self, uri: str) -> bytes:
        return storage.read_bytes(uri, self.storage_options)

    def open_stream(self, uri: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        return storage.open_stream(uri, self.storage_options)


@functools.lru_cache(maxsize=8)
def built_reader(path: str, reader_options: str, storage_options: str) -> Reader:
    """input.reader built once per worker process and settings (builders cross process boundaries as a name)."""
    return reader_builder(path)(json.loads(storage_options), **json.loads(reader_options))


@dataclass(frozen=True)
class Item:
    uri: str
    label: str | None
    image: DecodedImage
    fetch_seconds: float
    decode_seconds: float
    sha256: str | None = None


def image_decoder(target_size: tuple[int, int], settings: DecodeSettings) -> Decoder:
    """Bytes -> pixels at `target_size` by the settings' resize mode and draft margin, with the phash when
    content hashes are on."""
    return functools.partial(decode_image, target_size=target_size, resize=settings.resize,
                             draft_margin=settings.draft_margin, perceptual_hash=settings.content_hashes)


def fetch_and_decode(uri: str, label: str | None, decode: Decoder, settings: DecodeSettings) -> Item:
    started = time.perf_counter()
    data = fetch(uri, label, settings, started)
    if isinstance(data, Item):
        return data
    return decode_fetched(uri, label, data, time.perf_counter() - started, decode, settings.content_hashes)


def fetch_for_decoders(uri: str, label: str | None, decode: Decoder, settings: DecodeSettings,
                       decoders: ThreadPoolExecutor) -> Item | Future:
    """In a fetch thread: the image's bytes, then their decode handed to the decode threads (its future), or the
    error item of an image that cannot be fetched."""
    started = time.perf_counter()
    data = fetch(uri, label, settings, started)
    if isinstance(data, Item):
        return data
    return decoders.submit(decode_fetched, uri, label, data, time.perf_counter() - started, decode,
                           settings.content_hashes)


def fetch(uri: str, label: str | None, settings: DecodeSettings, started: float) -> bytes | Item:
    """The image's bytes, or its error item when the store or the URI is the cause."""
    try:
        return settings.reader_part.read(uri)
    except Exception as error:  # noqa: BLE001 - classified just below
        if not is_fetch_failure(error):
            raise  # a bug in featurize, not a property of this image: loud, the shard is retried
        reason = f"fetch failed: {faults.describe_error(error)}"  # "not found", "access denied", ...; redacted
        return Item(uri, label, DecodedImage(None, None, None, reason), time.perf_counter() - started, 0.0)


def decode_fetched(uri: str, label: str | None, data: bytes, fetch_seconds: float, decode: Decoder,
                   content_hashes: bool) -> Item:
    """Bytes already fetched (a loose file, or an archive member off its stream) -> an Item."""
    started = time.perf_counter()
    image = decode(data)
    sha256 = bytes_sha256(data) if content_hashes and image.error is None else None
    return Item(uri, label, image, fetch_seconds, time.perf_counter() - started, sha256)


def error_item(uri: str, label: str | None, reason: str, fetch_seconds: float = 0.0) -> Future:
    """An item that is an error row already, as a finished future (it rides the same queue as decodes)."""
    future: Future = Future()
    future.set_result(Item(uri, label, DecodedImage(None, None, None, reason), fetch_seconds, 0.0))
    return future


def is_fetch_failure(error: Exception) -> bool:
    """What the store or the URI itself caused (missing, denied, unreachable, not a regular file, an unknown
    protocol or a malformed URL in a manifest): that image's error row. Anything else is a bug."""
    return isinstance(error, (OSError, ValueError)) or faults.is_storage_failure(error)
