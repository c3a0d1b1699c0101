"""The output of an analyse stage (index, search, dedup): files first, `_SUCCESS` last, under the output's lease.

A rerun whose `_SUCCESS` carries the same fingerprint does nothing; an output without `_SUCCESS` (a run that died)
is rebuilt; a finished output of another configuration is refused unless `output.mode: overwrite`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import AnalyseOutputConfig
from pipeline.errors import ConfigError
from pipeline.io import redaction, storage
from pipeline.output import lease, ledger
from pipeline.output.layout import SUCCESS_FILE


def finished(output: AnalyseOutputConfig, fingerprint: str, stage: str) -> dict | None:
    """The `_SUCCESS` of a finished run of this configuration (nothing to do), or None (build; an old
    `_SUCCESS` is removed first so that a run dying part-way leaves an output readers refuse)."""
    success_uri = storage.join(output.uri, SUCCESS_FILE)
    if not storage.exists(success_uri, output.storage_options):
        return None
    document = ledger.read_json(success_uri, output.storage_options)
    if output.mode == "resume":
        if document.get("fingerprint") == fingerprint and document.get("stage") == stage:
            return document
        raise ConfigError(f"output.uri: {redaction.redact(output.uri)} holds a finished `featurize "
                          f"{document.get('stage', 'extract')}` output of another configuration; set "
                          "output.mode: overwrite to replace it, or choose another output.uri")
    storage.remove(success_uri, output.storage_options)
    return None


@contextlib.contextmanager
def writing(output: AnalyseOutputConfig, stage: str) -> Iterator[float]:
    """Hold the output's lease while its files are written; yields the start time."""
    started = time.time()
    storage.check_writable(output.uri, output.storage_options)
    with lease.held(output.uri, output.storage_options, stage):
        storage.make_dirs(output.uri, output.storage_options)
        yield started


def write_success(output: AnalyseOutputConfig, stage: str, fingerprint: str, files: list[str], started: float,
                  extras: dict) -> dict:
    document = {"stage": stage, "files": files, "fingerprint": fingerprint,
                "seconds": {"total": round(time.time() - started, 3)}, "output": redaction.redact(output.uri),
                **extras}
    ledger.write_json(storage.join(output.uri, SUCCESS_FILE), document, output.storage_options)
    return document


def read_finished(uri: str, storage_options: dict | None, stage: str, key: str) -> dict:
    """The `_SUCCESS` of a finished analyse output of `stage`; a ConfigError naming `key` otherwise."""
    success_uri = storage.join(uri, SUCCESS_FILE)
    shown = redaction.redact(uri)
    if not storage.exists(success_uri, storage_options):
        raise ConfigError(f"{key}: {shown} has no {SUCCESS_FILE}; give the output.uri of a finished "
                          f"`featurize {stage}` run (or run it again to finish it)")
    document = ledger.read_json(success_uri, storage_options)
    if document.get("stage") != stage:
        raise ConfigError(f"{key}: {shown} is a `featurize {document.get('stage', 'extract')}` output, not a "
                          f"`featurize {stage}` one")
    return document


@contextlib.contextmanager
def parquet_writer(uri: str, schema: pa.Schema, storage_options: dict | None) -> Iterator[pq.ParquetWriter]:
    """A Parquet file written batch by batch straight to its store (never the whole table in memory)."""
    fs, path = storage.filesystem(uri, storage_options)
    with fs.open(path, "wb") as handle, pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        yield writer
