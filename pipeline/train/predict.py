"""`featurize predict`: a trained classifier applied to a finished extract output, one shard per features file."""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.contract import provenance_differences
from pipeline.errors import ConfigError
from pipeline.io import storage
from pipeline.output import ledger
from pipeline.output.features import features_matrix, parquet_file
from pipeline.output.ledger import CommitRecord
from pipeline.train.classifiers import LinearModel, MlpModel, load_classifier

PREDICTION_ROW_GROUP_SIZE = 4096

PREDICTION_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("label", pa.string()),  # the label the features carried (null when unlabelled)
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("predicted_label", pa.string()),
    pa.field("predicted_score", pa.float32()),
    pa.field("scores", pa.list_(pa.float32())),  # one per class, in the classifier's class order
])


def predict(model_uri: str, features_uri: str, output_uri: str, storage_options: dict | None = None,
            batch_rows: int = 65536) -> dict:
    """Apply a trained classifier to a finished extract output; returns the `_SUCCESS` document it writes.

    One shard per input data file, written through the output ledger as extract writes, so a rerun resumes:
    committed shards are kept, orphans removed, and an output made by another classifier or from other features
    is refused.
    """
    started = time.time()
    document, model, weights_sha256 = load_classifier(model_uri, storage_options)
    success = ledger.read_success(features_uri, storage_options, key="--features")
    provenance = dict(success.get("provenance", {}))
    differences = provenance_differences(document["provenance"], provenance, "classifier", "features")
    if differences:
        raise ConfigError(f"features at {features_uri} were extracted differently from the features classifier "
                         f"{model_uri} was trained on: {'; '.join(differences)}. Extract features with the "
                         "classifier's settings, or train a classifier on these features")
    files = success["files"]
    fingerprint = hashlib.sha256(json.dumps({
        "classifier": document, "weights_sha256": weights_sha256, "features_uri": features_uri,
        "features_fingerprint": success.get("fingerprint"), "features_files": files,
    }, sort_keys=True).encode()).hexdigest()
    # One writer per output: the lease is taken before the output is read or written (pipeline/output/lease.py).
    with ledger.held(output_uri, storage_options, "predict", key="--output", started=started) as run_ledger:
        if run_ledger.open("resume", fingerprint, {}, what="predictions of another classifier or other features",
                           remedy="Write to another output or remove it.") is None:
            run_ledger.write_plan({"fingerprint": fingerprint, "model_uri": model_uri, "features_uri": features_uri,
                                   "files": files})
        classes = document["classes"]
        schema = PREDICTION_SCHEMA.with_metadata({"model_uri": model_uri, "features_uri": features_uri,
                                                  "kind": document["kind"], "classes": json.dumps(classes),
                                                  "fingerprint": fingerprint})
        for shard in run_ledger.pending(len(files)):
            shard_started = time.perf_counter()
            table = predict_file(storage.join(features_uri, files[shard]), model, classes, document["feature_dim"],
                                 schema, storage_options, batch_rows)
            predicted = time.perf_counter()
            data_path = run_ledger.write_data(shard, table, PREDICTION_ROW_GROUP_SIZE)
            num_ok = int(pc.sum(pc.equal(table["status"], "ok")).as_py() or 0)
            run_ledger.commit(CommitRecord(shard=shard, files=[data_path], rows=table.num_rows, ok=num_ok,
                                           error=table.num_rows - num_ok,
                                           timings={"predict": round(predicted - shard_started, 4),
                                                    "write": round(time.perf_counter() - predicted, 4)},
                                           committed_at=time.time()))
        extras = {"provenance": provenance, "classes": classes, "kind": document["kind"], "model_uri": model_uri,
                  "features_uri": features_uri, "max_error_rate": None}  # predict fails on no error rate
        return run_ledger.finish(len(files), fingerprint, extras)


def predict_file(file_uri: str, model: LinearModel | MlpModel, classes: list[str], feature_dim: int,
                 schema: pa.Schema, storage_options: dict | None, batch_rows: int) -> pa.Table:
    """Prediction rows for every row of one features file, read `batch_rows` at a time."""
    tables = []
    with parquet_file(file_uri, storage_options) as parquet:
        dim = parquet.schema_arrow.field("features").type.list_size
        if dim != feature_dim:
            raise ConfigError(f"{file_uri} holds {dim}-dim features; the classifier expects {feature_dim}")
        columns = [name for name in ("uri", "label", "status", "error", "features")
                   if name in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
            tables.append(prediction_rows(pa.Table.from_batches([batch]), model, classes, feature_dim, schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def prediction_rows(table: pa.Table, model, classes: list[str], feature_dim: int, schema: pa.Schema) -> pa.Table:
    ok = np.asarray(pc.equal(table["status"], "ok").to_numpy(zero_copy_only=False), dtype=bool)
    scores = np.zeros((table.num_rows, len(classes)), dtype=np.float32)
    if ok.any():
        scores[ok] = model.predict_proba(features_matrix(table["features"].filter(pa.array(ok)), feature_dim))
    best = scores.argmax(axis=1)
    missing = pa.array(~ok)
    offsets = pa.array(np.arange(table.num_rows + 1, dtype=np.int32) * len(classes))
    score_lists = pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1), type=pa.float32()), mask=missing)
    label = table["label"] if "label" in table.column_names else pa.nulls(table.num_rows, pa.string())
    columns = {
        "uri": table["uri"],
        "label": label,
        "status": table["status"],
        "error": table["error"],
        "predicted_label": pa.array(np.asarray(classes, dtype=object)[best], type=pa.string(), mask=~ok),
        "predicted_score": pa.array(scores[np.arange(table.num_rows), best], type=pa.float32(), mask=~ok),
        "scores": score_lists,
    }
    return pa.Table.from_arrays([pc.cast(columns[name], schema.field(name).type) for name in schema.names],
                                schema=schema)
