"""`featurize finetune`: list and split the labelled images (before Ray starts: config problems fail at once),
then, under the output's lease, train on Ray (workers.py, training.py) and write the outputs (outputs.py).

A rerun of the same command: a finished output is left as it is (nothing to do); an unfinished one resumes after
its last finished epoch; other settings or images on the same output are refused (exit 2) unless
`output.mode: overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import logging

from pipeline.config import FinetuneConfig, to_dict
from pipeline.errors import ConfigError
from pipeline.finetune.checkpoints import Checkpoints
from pipeline.finetune.data import Splits, split_images
from pipeline.finetune.outputs import METRICS_FILE, finished_metrics, write_outputs
from pipeline.finetune.training import Job
from pipeline.io import storage
from pipeline.output import lease

log = logging.getLogger(__name__)

# Keys that say where and how fast, not what is learnt: a resume may change them.
SCHEDULING_SECTIONS = ("run",)
SCHEDULING_KEYS = {"input": ("storage_options",), "output": ("mode", "storage_options", "uri")}


def finetune(config: FinetuneConfig, verbose: bool = False) -> dict:
    """Fine-tune (or resume, or find finished) and return metrics.json's document (with `already_done` when the
    output was finished before this run)."""
    config.validate()
    storage.check_writable(config.output.uri, config.output.storage_options)
    splits = split_images(config.input, config.split, config.finetune.validation_fraction)
    log.info("%d train, %d validation, %d test images in %d classes", len(splits.train), len(splits.validation),
             len(splits.test), len(splits.classes))
    fingerprint = settings_fingerprint(config, splits)
    with lease.held(config.output.uri, config.output.storage_options, "finetune") as output_lease:
        checkpoints = Checkpoints(config.output.uri, config.output.storage_options)
        if config.output.mode == "overwrite":
            checkpoints.clear()
            metrics_uri = storage.join(config.output.uri, METRICS_FILE)
            if storage.exists(metrics_uri, config.output.storage_options):
                storage.remove(metrics_uri, config.output.storage_options)
        done = finished_metrics(config, fingerprint)
        if done is not None:
            return {**done, "already_done": True}
        refuse_other_finished(config)
        from pipeline.finetune.workers import train_on_ray  # Ray starts only now

        outcome = train_on_ray(Job(config, splits, fingerprint), verbose)
        return write_outputs(config, splits, outcome, fingerprint, output_lease)


def settings_fingerprint(config: FinetuneConfig, splits: Splits) -> str:
    """sha256 of every setting that changes what is learnt, and of the listing (uris and labels)."""
    settings = to_dict(config)
    for section in SCHEDULING_SECTIONS:
        settings.pop(section, None)
    for section, keys in SCHEDULING_KEYS.items():
        for key in keys:
            settings.get(section, {}).pop(key, None)
    document = {"settings": settings, "listing_sha256": splits.listing_sha256}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def refuse_other_finished(config: FinetuneConfig) -> None:
    uri = storage.join(config.output.uri, METRICS_FILE)
    if storage.exists(uri, config.output.storage_options):
        raise ConfigError(f"output.uri: {config.output.uri} holds a finished fine-tune with other settings or "
                          "images; use another output.uri, or set output.mode: overwrite to replace it")
