"""The Ray actor that holds one FeatureExtractor, built once, and runs shard pieces through pipeline/extract/worker.py
(how many of them a cluster gets, and what each holds: pipeline/extract/pool.py).

Ray appears only here and in pipeline/extract/driver.py. TensorFlow is imported inside the actor alone, so the
driver never loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

import ray

from pipeline.config import ModelConfig, NamedModelConfig
from pipeline.extract.multi import ModelSet
from pipeline.extract.worker import ShardResult, ShardSettings, ShardTask, process_shard
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
    """Holds one FeatureExtractor (built once) and processes shard pieces one at a time. The
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

    def process(self, task: ShardTask, settings: ShardSettings) -> ShardResult:
        settings = dataclasses.replace(settings, writer=self.writer)
        if self.output_storage_options is not None:
            decode = dataclasses.replace(settings.decode, input_storage_options=self.input_storage_options)
            settings = dataclasses.replace(settings, decode=decode,
                                           output_storage_options=self.output_storage_options)
        if isinstance(self.extractor, ModelSet):
            return self.extractor.process(task, settings)
        return process_shard(task, self.extractor, settings)


def remote_class(num_cpus: float, num_gpus: float):
    """The actor as a Ray actor class with these resources; never restarted by Ray (the driver replaces it). One
    call at a time: when the actor dies, the piece it was running is its oldest (driver.actor_lost counts the
    attempt against it). Two at a time, with a piece's write overlapping the next one's decodes, measured 1-2%
    faster, but then the piece that killed the actor may be the newer one and a healthy image gets the blame."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=1)(ExtractorActor)
