"""The plan: a frozen manifest, deterministic shards, and a fingerprint of everything that changes features.

The first run lists the input and freezes it into the output (`_manifest.parquet`, `_plan.json`); every
later run in `resume` mode reuses that manifest without listing again, so shard i always means the same
images. A run whose fingerprint differs from the frozen one is refused with the keys that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import (
    FINGERPRINT_EXCLUDED,
    FINGERPRINT_NAMES,
    ExtractConfig,
    is_saved_model_path,
    is_weights_file,
)
from pipeline.errors import ConfigError
from pipeline.extract.listing import list_images
from pipeline.io import faults, redaction, storage
from pipeline.output import layout, ledger


@dataclass(frozen=True)
class Plan:
    fingerprint: str
    fingerprint_inputs: dict
    num_images: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_bounds(self, shard_index: int) -> tuple[int, int]:
        start = shard_index * self.shard_size
        return start, min(start + self.shard_size, self.num_images)


def model_files(config: ExtractConfig) -> list[tuple[str, str]]:
    """(config key, URI) of every file the model is built from."""
    model = config.model
    candidates = (("model.backbone", model.backbone, is_saved_model_path(model.backbone)),
                  ("model.weights", model.weights, is_weights_file(model.weights)),
                  ("model.class_names", model.class_names, model.class_names is not None))
    return [(key, uri) for key, uri, is_file in candidates if is_file]


def check_model_files(config: ExtractConfig) -> None:
    """Every model file exists and is readable, checked on the driver before Ray starts, so a typo costs a
    second and names its key instead of surfacing from an actor after start-up."""
    options = config.input.storage_options
    for key, uri in model_files(config):
        try:
            found = storage.exists(uri, options)
        except Exception as error:  # noqa: BLE001 - storage failures get a clear message, the rest goes on up
            if not faults.is_storage_failure(error):
                raise
            raise faults.access_error(key, uri, "read", error) from None
        if not found:
            raise ConfigError(f"{key}: {redaction.redact(uri)} does not exist; check the path (for a cloud URI also "
                              "input.storage_options, which model files are read with)")


def fingerprint_inputs(config: ExtractConfig) -> dict:
    """Everything that changes the rows: every config key but FINGERPRINT_EXCLUDED, texts redacted (_plan.json
    holds no signature), and the checksum of each model file (`backbone_sha256`: None when not a file)."""
    inputs = {}
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            key = f"{section.name}.{item.name}"
            if key not in FINGERPRINT_EXCLUDED:
                inputs[FINGERPRINT_NAMES.get(key, item.name)] = fingerprint_value(getattr(values, item.name))
    checksums = {key: storage.sha256_of_uri(uri, config.input.storage_options) for key, uri in model_files(config)}
    for key in ("model.backbone", "model.weights", "model.class_names"):  # the names land in top_k_labels
        inputs[f"{key.split('.')[1]}_sha256"] = checksums.get(key)
    return inputs


def fingerprint_value(value):
    if isinstance(value, tuple):
        return [fingerprint_value(item) for item in value]
    return redaction.redact(value) if isinstance(value, str) else value


def digest(document: dict) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]


def prepare(config: ExtractConfig, run_ledger: ledger.Ledger | None = None) -> tuple[Plan, pa.Table]:
    """Honour output.mode, then return the plan and the frozen manifest (listing the input only once). The run's
    ledger (holding the output's lease) reads the commits as it opens; planning alone needs none."""
    output, options = config.output.uri, config.output.storage_options
    run_ledger = run_ledger or ledger.Ledger(output, options)
    check_model_files(config)
    storage.check_writable(output, options)  # a missing bucket or bad credentials stop here, not after listing
    inputs = fingerprint_inputs(config)
    frozen = run_ledger.open(config.output.mode, digest(inputs), inputs, what="features",
                             remedy="Use output.mode: overwrite or another output.uri.")
    if frozen is None:
        return new_plan(config, inputs, run_ledger)
    manifest = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, layout.MANIFEST_FILE), options)))
    fields = ("fingerprint", "fingerprint_inputs", "num_images", "shard_size")
    return Plan(**{key: frozen[key] for key in fields}), manifest


def new_plan(config: ExtractConfig, inputs: dict, run_ledger: ledger.Ledger) -> tuple[Plan, pa.Table]:
    output, options = config.output.uri, config.output.storage_options
    manifest = list_images(config.input)
    plan = Plan(fingerprint=digest(inputs), fingerprint_inputs=inputs, num_images=manifest.num_rows,
                shard_size=config.run.shard_size)
    storage.make_dirs(output, options)
    buffer = io.BytesIO()
    pq.write_table(manifest, buffer)
    storage.write_bytes(storage.join(output, layout.MANIFEST_FILE), buffer.getvalue(), options)
    run_ledger.write_plan(asdict(plan))  # last: its presence means the manifest is complete
    return plan, manifest
