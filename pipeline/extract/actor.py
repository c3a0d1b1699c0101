"""The Ray actor that holds one FeatureExtractor, built once, and runs shard pieces through pipeline/extract/worker.py;
how many of them a cluster gets, and what each holds (actor_shape).

Ray appears only here and in pipeline/extract/driver.py. TensorFlow is imported inside the actor alone, so the
driver never loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass

import ray

from pipeline.config import ExtractConfig, ModelConfig, NamedModelConfig
from pipeline.extract.multi import ModelSet
from pipeline.extract.worker import ShardResult, ShardSettings, ShardTask, process_shard
from pipeline.io import redaction


@dataclass(frozen=True)
class ActorShape:
    count: int
    num_cpus: float
    num_gpus: float


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
    """Holds one FeatureExtractor (built once) and processes shard pieces one at a time. The extractor owns the
    batch size: it halves it after running out of accelerator memory, and the worker reads it from there. Given
    the models of a `models:` run instead, it holds them all (multi.ModelSet): one decode feeds every model."""

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

    def describe(self) -> dict:
        if self.build_error is not None:
            raise self.build_error
        if isinstance(self.extractor, ModelSet):
            model = self.extractor.description()
        else:
            model = {"provenance": self.extractor.provenance, "feature_dim": self.extractor.feature_dim,
                     "runtime": self.extractor.runtime}
        return {**model, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "load_seconds": self.load_seconds, "warnings": self.warnings}

    def process(self, task: ShardTask, settings: ShardSettings) -> ShardResult:
        if self.output_storage_options is not None:
            settings = dataclasses.replace(settings, input_storage_options=self.input_storage_options,
                                           output_storage_options=self.output_storage_options)
        if isinstance(self.extractor, ModelSet):
            return self.extractor.process(task, settings)
        return process_shard(task, self.extractor, settings)


def remote_class(num_cpus: float, num_gpus: float):
    """The actor as a Ray actor class with these resources; never restarted by Ray (the driver replaces it)."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=1)(ExtractorActor)


def actor_shape(config: ExtractConfig) -> ActorShape:
    """How many actors and what each holds: one per GPU, or one per node using its cores."""
    resources = ray.cluster_resources()
    total_gpus = resources.get("GPU", 0)
    gpus = config.run.gpus_per_actor if config.run.gpus_per_actor is not None else (1.0 if total_gpus else 0.0)
    nodes = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0]
    if config.run.actors:
        count = config.run.actors
    elif gpus:
        count = max(1, int(total_gpus // gpus))
    else:
        count = max(1, len(nodes))
    if config.run.cpus_per_actor is not None:
        cpus = config.run.cpus_per_actor
    else:
        smallest_node = min((node["Resources"]["CPU"] for node in nodes), default=1)
        actors_per_node = max(1, -(-count // max(1, len(nodes))))
        cpus = max(1.0, smallest_node // actors_per_node)
    return ActorShape(count, float(cpus), float(gpus))
