import json

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ConfigError
from pipeline.extract.rows import ShardRows, read_features, row_schema
from pipeline.output import layout, ledger


def make_rows(num_rows: int, dim: int) -> ShardRows:
    rows = ShardRows()
    for index in range(num_rows):
        if index % 3 == 2:
            rows.add_error(f"img_{index}.jpg", None, "truncated image: cut short", 10, 20)
        else:
            rows.add_ok(f"img_{index}.jpg", "cat", 640, 480, np.full(dim, index, np.float32), ["a", "b"], [0.7, 0.2])
    return rows


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
