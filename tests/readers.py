"""Readers for `input.reader` that fail the way the tests need, injected through the config as a user injects a
reader of their own (`input.reader: tests.readers:crashing`, with `input.reader_options`). Each reads with fsspec
like featurize's own reader and misbehaves only where it is told to."""

from __future__ import annotations

import os
import threading
import time

from pipeline.extract.worker import Reader


class Marked(Reader):
    """Reads as featurize does, except a uri containing `marker`, which meets `on_marked`."""

    def __init__(self, storage_options: dict, marker: str):
        super().__init__(storage_options)
        self.marker = marker

    def read(self, uri: str) -> bytes:
        if self.marker in uri:
            self.on_marked(uri)
        return super().read(uri)

    def on_marked(self, uri: str) -> None:
        raise NotImplementedError


class Crashing(Marked):
    """The worker dies on the spot, as a decoder's native crash would."""

    def on_marked(self, uri: str) -> None:
        os._exit(77)


class Buggy(Marked):
    """It raises, as a bug in featurize's own code would (not a property of the image)."""

    def on_marked(self, uri: str) -> None:
        raise AssertionError(f"test hook: a bug in featurize's own code while reading {uri}")


class Slow(Reader):
    """Every image, and every archive stream, takes `seconds` longer: a run long enough to be interrupted."""

    def __init__(self, storage_options: dict, seconds: float):
        super().__init__(storage_options)
        self.seconds = seconds

    def read(self, uri: str) -> bytes:
        time.sleep(self.seconds)
        return super().read(uri)

    def open_stream(self, uri: str):
        time.sleep(self.seconds)
        return super().open_stream(uri)


class ThreadNoting(Reader):
    """Reads as featurize does and notes the thread that read each uri (in `threads`, which every instance shares)."""

    threads: dict[str, str] = {}

    def read(self, uri: str) -> bytes:
        ThreadNoting.threads[uri] = threading.current_thread().name
        return super().read(uri)


def reading(name: str, **options) -> dict:
    """The input keys that inject the reader class `name` of this module (a class is a builder too)."""
    return {"reader": f"tests.readers:{name}", "reader_options": options}
