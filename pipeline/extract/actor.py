"""The Ray actor that holds one FeatureExtractor, built once, and runs shard pieces through pipeline/extract/worker.py
(how many of them a cluster gets, and what each holds: pipeline/extract/pool.py).

Ray appears only here and in pipeline/extract/driver.py. TensorFlow is imported inside the actor alone, so the
driver never loads it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Iterator

import ray

from pipeline.config import ModelConfig, NamedModelConfig
from pipeline.extract.handoff import Handoffs, Turns
from pipeline.extract.multi import ModelSet
from pipeline.extract.worker import ShardResult, ShardSettings, ShardTask, piece_batches, process_shard
from pipeline.io import redaction


class WarningCollector(logging.Handler):
    """Keeps the warnings an actor logs while it builds its model, for the driver to show once."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(redaction.redact(record.getMessage()))


@contextlib.contextmanager
def collected_warnings():
    collector = WarningCollector()
    loggers = [logging.getLogger(name) for name in ("featurize", "pipeline")]
    for logger in loggers:
        logger.addHandler(collector)
    try:
        yield collector.messages
    finally:
        for logger in loggers:
            logger.removeHandler(collector)


class ExtractorActor:
    """Holds one FeatureExtractor (built once) and runs shard pieces in two calls each, decode and process. The
    extractor owns the batch size: it halves it after running out of accelerator memory, and the worker reads it
    from there. Given the models of a `models:` run instead, it holds them all (multi.ModelSet): one decode feeds
    every model."""

    def __init__(self, model_config: ModelConfig | tuple[NamedModelConfig, ...], batch_size: int, num_threads: int,
                 storage_options: dict, output_storage_options: dict | None = None):
        started = time.perf_counter()
        self.build_error: Exception | None = None
        with collected_warnings() as self.warnings:  # shown by the driver: actor logs stay off the terminal
            try:
                from pipeline.models.extractor import FeatureExtractor  # TF only inside actors
                from pipeline.models.runtimes import configure_tensorflow

                configure_tensorflow(num_threads)
                if isinstance(model_config, tuple):
                    self.extractor = ModelSet(model_config, batch_size, storage_options, num_threads)
                else:
                    self.extractor = FeatureExtractor(model_config, batch_size=batch_size,
                                                      storage_options=storage_options, num_threads=num_threads)
            except Exception as error:  # noqa: BLE001 - reported by describe() as a task error (a RayTaskError
                self.build_error = error  # with the cause); raised from __init__, Ray only says "the actor died"
        self.load_seconds = time.perf_counter() - started
        # Storage options arrive once, here; tasks carry them without credentials (redaction.public_options).
        self.input_storage_options = storage_options
        self.output_storage_options = output_storage_options
        self.handoffs = Handoffs()  # a piece's decoded batches, from its decode call to its process call
        self.decode_turns, self.model_turns = Turns(), Turns()  # the driver numbers an actor's pieces from 0
        context = ray.get_runtime_context()
        # Who writes, named in each data file's metadata and in `_SUCCESS.actors`: the GPUs Ray assigned this actor
        self.writer = {"actor": context.get_actor_id(), "node_id": context.get_node_id(),
                       "accelerator_ids": [str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])]}

    def describe(self) -> dict:
        if self.build_error is not None:
            raise self.build_error
        if isinstance(self.extractor, ModelSet):
            model = self.extractor.description()
        else:
            model = {"provenance": self.extractor.provenance, "feature_dim": self.extractor.feature_dim,
                     "runtime": self.extractor.runtime}
        return {**model, **self.writer, "pid": os.getpid(), "load_seconds": self.load_seconds,
                "warnings": self.warnings}

    def decode(self, task: ShardTask, settings: ShardSettings, turn: int) -> None:
        """Fetch and decode the piece, its batches handed to its process call as they come; returns once the last is
        decoded, so the next piece's decode call starts while this one's model work and write go on. Decode calls run
        one at a time, in the order of their turns: when the actor dies during one, that piece's images are the
        suspects (driver.ShardScheduler)."""
        settings = self.actor_settings(settings)
        handoff = self.handoffs.join(turn)
        with self.decode_turns.turn(turn):
            handoff.fill(functools.partial(self.piece_batches, task, settings))

    def process(self, task: ShardTask, settings: ShardSettings, turn: int) -> ShardResult:
        """The model on the piece's batches as its decode call hands them over, then its data file (or one a model).
        The model runs for one piece at a time, in the order of their turns; the file is written after its turn, while
        the next piece's batches go through the model."""
        settings = self.actor_settings(settings)
        handoff = self.handoffs.join(turn)
        model_turn = self.model_turns.turn(turn)
        try:
            if isinstance(self.extractor, ModelSet):
                return self.extractor.process(task, settings, handoff.batches(), handoff.timings, model_turn)
            return process_shard(task, self.extractor, settings, handoff.batches(), handoff.timings, model_turn)
        finally:
            handoff.abandon()  # a failed piece stops its decode call

    def piece_batches(self, task: ShardTask, settings: ShardSettings, timings: collections.Counter) -> Iterator:
        if isinstance(self.extractor, ModelSet):
            return self.extractor.piece_batches(task, settings, timings)
        return piece_batches(task, self.extractor, settings, timings)

    def actor_settings(self, settings: ShardSettings) -> ShardSettings:
        """The task's settings with what only the actor holds: who writes, and the storage options with credentials."""
        settings = dataclasses.replace(settings, writer=self.writer)
        if self.output_storage_options is None:
            return settings
        decode = dataclasses.replace(settings.decode, input_storage_options=self.input_storage_options)
        return dataclasses.replace(settings, decode=decode, output_storage_options=self.output_storage_options)


def remote_class(num_cpus: float, num_gpus: float, pieces_in_flight: int):
    """The actor as a Ray actor class with these resources; never restarted by Ray (the driver replaces it). Two calls
    a piece, each with a thread for every piece in flight (a call waiting for its turn holds one), and one for
    `describe`."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                      max_concurrency=2 * pieces_in_flight + 1)(ExtractorActor)
