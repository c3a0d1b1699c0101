import json

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.extract.rows import row_schema
from pipeline.output import layout, ledger
from pipeline.output.features import read_features
from tests.helpers import make_rows, write_labelled_images


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_data_file_schema_and_values_readable_by_every_reader(tmp_path, dtype):
    schema = row_schema(4, dtype, {"backbone": "resnet50", "feature_dim": 4})
    table = make_rows(5, 4).to_table(schema)
    ledger.write_data_file(str(tmp_path), "data/shard-00000-x.parquet", table, row_group_size=2)
    path = str(tmp_path / "data" / "shard-00000-x.parquet")

    read = pq.read_table(path)
    assert read.schema.field("features").type.list_size == 4
    assert str(read.schema.field("features").type.value_type) == ("halffloat" if dtype == "float16" else "float")
    assert read.schema.metadata[b"backbone"] == b"resnet50"
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    frame = pd.read_parquet(path)
    assert frame["status"].tolist() == ["ok", "ok", "error", "ok", "ok"]
    assert frame["features"][2] is None and list(frame["features"][3]) == [3, 3, 3, 3]
    assert frame["error"][2] == "truncated image: cut short"
    assert duckdb.sql(f"SELECT count(*) FROM '{path}' WHERE status = 'ok'").fetchall()[0][0] == 4
    assert pl.read_parquet(path)["width"].to_list() == [640, 640, 10, 640, 640]


def test_commit_records_round_trip_and_orphans_removed(tmp_path):
    output = str(tmp_path)
    schema = row_schema(2)
    names = [layout.new_data_file_name(0) for _ in range(2)]
    assert names[0] != names[1]
    for name in names:
        ledger.write_data_file(output, name, make_rows(2, 2).to_table(schema), 1024)
    record = ledger.CommitRecord(shard=0, files=[names[1]], rows=2, ok=2, error=0)
    ledger.write_commit(output, record)
    commits = ledger.read_commits(output)
    assert commits == {0: record}
    assert ledger.remove_orphans(output, commits) == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [names[1].split("/")[1]]


def test_read_features_uses_success_file_list_only(tmp_path):
    output = str(tmp_path)
    schema = row_schema(2, provenance={"backbone": "x"})
    ledger.write_data_file(output, "data/a.parquet", make_rows(3, 2).to_table(schema), 1024)
    ledger.write_data_file(output, "data/uncommitted.parquet", make_rows(3, 2).to_table(schema), 1024)
    with pytest.raises(ConfigError, match="is not a featurize extract output"):  # no _plan.json either
        read_features(output)
    (tmp_path / layout.PLAN_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="has no _SUCCESS: its extract job has not finished"):
        read_features(output)
    (tmp_path / "_SUCCESS").write_text(json.dumps({"files": ["data/a.parquet"], "provenance": {"backbone": "x"}}))
    assert read_features(output).num_rows == 3
    assert ledger.read_provenance(output) == {"backbone": "x"}


def finished_extract_success(tmp_path) -> dict:
    """extract's `_SUCCESS`, written by the Driver itself: every shard of a real plan committed, so the run goes
    straight to the end without starting Ray."""
    from pipeline.config import ExtractConfig, load_config
    from pipeline.extract.driver import Driver
    from pipeline.extract.plan import prepare
    from pipeline.extract.progress import ProgressReporter

    write_labelled_images(tmp_path / "images", num_classes=2, per_class=3)
    config = load_config(ExtractConfig, None, [f"input.uri={tmp_path / 'images'}", f"output.uri={tmp_path / 'x'}",
                                               "run.shard_size=4"])
    run_ledger = ledger.Ledger(config.output.uri)
    plan, _ = prepare(config, run_ledger)
    for shard in run_ledger.pending(plan.num_shards):
        path = run_ledger.write_data(shard, make_rows(3, 2).to_table(row_schema(2, provenance={"backbone": "x"})), 16)
        run_ledger.commit(ledger.CommitRecord(shard, [path], 3, 2, 1, {"write": 0.1}, {"truncated image": 1}))
    return Driver(config, ProgressReporter(False)).run()


def test_predict_writes_through_the_same_ledger_as_extract(tmp_path, digits, extract_output, logistic_run,
                                                            monkeypatch):
    """predict's `_SUCCESS` carries every field of extract's; a resume after a crash keeps the commits it made
    and removes the data file the crashed attempt left."""
    from pipeline.train import predict

    extract_success = finished_extract_success(tmp_path)
    output = tmp_path / "predictions"
    predict_file = predict.predict_file
    calls = []

    def crash_on_the_third_shard(*arguments):
        calls.append(arguments)
        if len(calls) == 3:
            raise MemoryError("the predict process dies here")
        return predict_file(*arguments)

    monkeypatch.setattr(predict, "predict_file", crash_on_the_third_shard)
    with pytest.raises(MemoryError):
        predict.predict(logistic_run[0], extract_output, str(output))
    monkeypatch.setattr(predict, "predict_file", predict_file)
    committed = ledger.read_commits(str(output))
    assert sorted(committed) == [0, 1] and not (output / layout.SUCCESS_FILE).exists()
    orphan = layout.new_data_file_name(2)  # what a crash after writing, before committing, leaves
    ledger.write_data_file(str(output), orphan, make_rows(2, 2).to_table(row_schema(2)), 16)

    success = predict.predict(logistic_run[0], extract_output, str(output))
    assert success["shards"] == {"total": 5, "run": 3, "committed": 5}
    assert success["files"][:2] == [committed[0].files[0], committed[1].files[0]]  # kept, not redone
    assert sorted(f"{layout.DATA_DIR}/{path.name}" for path in (output / layout.DATA_DIR).iterdir()) == sorted(
        success["files"])  # the orphan is gone
    assert success["rows"]["total"] == len(digits.uris) and success["error_rate"] == success["rows"]["error"] / len(
        digits.uris)

    assert set(success) >= set(extract_success), set(extract_success) - set(success)
    for key in ("rows", "shards", "seconds"):
        assert set(success[key]) == set(extract_success[key]), key
    assert extract_success["shards"] == {"total": 2, "run": 0, "committed": 2}
    assert extract_success["errors_by_reason"] == {"truncated image": 2}
    assert json.loads((output / layout.SUCCESS_FILE).read_text()) == success


def test_actors_table_counts_a_bisected_shard_once_and_each_of_its_pieces():
    """Shard 0 bisected after crashes: actor B wrote both halves, so one shard and two pieces; a quarantined image's
    piece (written by the driver) names no actor."""
    def piece(actor: str, images: int) -> dict:
        return {"actor": actor, "node_id": "node-1", "accelerator_ids": [], "images": images, "seconds": 1.25}

    records = [ledger.CommitRecord(0, ["a", "b", "c"], 8, 7, 1, actors=[piece("B", 4), piece("B", 3)]),
               ledger.CommitRecord(1, ["d"], 8, 8, 0, actors=[piece("A", 8)]),
               ledger.CommitRecord(2, ["e"], 8, 8, 0, actors=[piece("B", 8)])]
    table = {entry["actor"]: entry for entry in ledger.actors_table(records)}
    assert {actor: (entry["shards"], entry["pieces"], entry["images"], entry["seconds"])
            for actor, entry in table.items()} == {"A": (1, 1, 8, 1.25), "B": (2, 3, 15, 3.75)}
