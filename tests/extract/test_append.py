"""`output.mode: append`: only the images not yet in the output, as a new generation of the plan, exactly once.

Most tests run the plan and the ledger on real files without Ray (fast: they show the logic); one runs
`featurize extract` end to end on a real local Ray and reads the result with pandas, DuckDB and Polars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from pipeline.cli import main
from pipeline.config import ExtractConfig, load_config
from pipeline.errors import ConfigError
from pipeline.extract import plan as planning
from pipeline.extract.plan import prepare
from pipeline.extract.rows import ShardRows, row_schema
from pipeline.output import layout, ledger
from pipeline.tools.report import inspect_output
from tests.helpers import write_extract_config, write_labelled_images


def config_for(tmp_path: Path, *overrides: str) -> ExtractConfig:
    return load_config(ExtractConfig, None, [f"input.uri={tmp_path / 'images'}", f"output.uri={tmp_path / 'out'}",
                                             "run.shard_size=4", *overrides])


def appending(tmp_path: Path, *overrides: str) -> ExtractConfig:
    return config_for(tmp_path, "output.mode=append", *overrides)


@pytest.fixture
def images(tmp_path) -> list[Path]:
    return write_labelled_images(tmp_path / "images", num_classes=2, per_class=5)  # 10 images: shards of 4, 4, 2


def add_images(tmp_path: Path, count: int, folder: str = "added") -> list[Path]:
    """New files in the input, in a folder of their own (a new label under from_dirs)."""
    return write_labelled_images(tmp_path / "images" / folder, num_classes=1, per_class=count, seed=7)


def commit_planned_shard(output: Path, plan: planning.Plan, manifest, shard: int) -> None:
    """A shard committed as a run would: rows for exactly its images, a data file, then the record naming it."""
    start, stop = plan.shard_bounds(shard)
    piece = manifest.slice(start, stop - start)
    rows = ShardRows()
    for uri, label in zip(piece.column("uri").to_pylist(), piece.column("label").to_pylist(), strict=True):
        rows.add_ok(uri, label, 8, 8, np.zeros(2, np.float32), [], [])
    run_ledger = ledger.Ledger(str(output))
    path = run_ledger.write_data(shard, rows.to_table(row_schema(2)), 16)
    run_ledger.commit(ledger.CommitRecord(shard=shard, files=[path], rows=len(rows), ok=len(rows), error=0))


def commit_pending(config: ExtractConfig, output: Path) -> list[int]:
    """Plan as a run does (mode from the config), then commit every pending shard; the shards committed."""
    run_ledger = ledger.Ledger(str(output))
    plan, manifest = prepare(config, run_ledger)
    pending = run_ledger.pending(plan.num_shards)
    for shard in pending:
        commit_planned_shard(output, plan, manifest, shard)
    return pending


def finished_uris(config: ExtractConfig, output: Path) -> list[str]:
    """`_SUCCESS` written as the driver does once every shard is committed; the uris of the files it lists."""
    run_ledger = ledger.Ledger(str(output))
    plan, _ = prepare(config, run_ledger)
    assert run_ledger.pending(plan.num_shards) == []
    success = run_ledger.finish(plan.num_shards, plan.fingerprint, {})
    return pq.ParquetDataset([str(output / path) for path in success["files"]]).read().column("uri").to_pylist()


def test_append_freezes_only_the_new_images_as_a_generation_numbered_after_the_existing_shards(tmp_path, images):
    output = tmp_path / "out"
    assert commit_pending(config_for(tmp_path), output) == [0, 1, 2]
    added = add_images(tmp_path, 6)
    said = []

    plan, manifest = prepare(appending(tmp_path), ledger.Ledger(str(output)), say=said.append)

    assert [(g.manifest, g.num_images, g.shard_offset) for g in plan.generations] == [
        ("_manifest.parquet", 10, 0), ("_manifest-g0001.parquet", 6, 3)]
    assert (plan.num_images, plan.num_shards) == (16, 5)
    assert [plan.shard_bounds(index) for index in range(5)] == [(0, 4), (4, 8), (8, 10), (10, 14), (14, 16)]
    new_manifest = pq.read_table(output / "_manifest-g0001.parquet")
    assert new_manifest.column("uri").to_pylist() == sorted(str(path) for path in added)  # listing order kept
    assert manifest.num_rows == 16 and len(set(manifest.column("uri").to_pylist())) == 16
    frozen = json.loads((output / layout.PLAN_FILE).read_text())
    assert frozen["num_images"] == 10 and len(frozen["generations"]) == 2  # top level: generation 0, as before
    assert said == ["append: 6 new images as generation 1 (shards 3-4)"]

    assert commit_pending(config_for(tmp_path), output) == [3, 4]  # a resume now runs the new generation
    assert sorted(finished_uris(config_for(tmp_path), output)) == sorted(map(str, images + added))


def test_an_append_with_nothing_new_does_nothing_and_says_so_in_one_line(tmp_path, images):
    output = tmp_path / "out"
    commit_pending(config_for(tmp_path), output)
    plan_before = (output / layout.PLAN_FILE).read_bytes()
    said = []

    run_ledger = ledger.Ledger(str(output))
    plan, _ = prepare(appending(tmp_path), run_ledger, say=said.append)

    assert len(plan.generations) == 1 and run_ledger.pending(plan.num_shards) == []
    assert (output / layout.PLAN_FILE).read_bytes() == plan_before
    assert not list(output.glob("_manifest-g*"))
    assert said == ["append: no new image (10 listed, every one already in the output); nothing to add"]


def test_append_to_an_empty_output_is_a_first_run(tmp_path, images):
    plan, manifest = prepare(appending(tmp_path))
    assert [(g.manifest, g.num_images) for g in plan.generations] == [(layout.MANIFEST_FILE, 10)]
    assert manifest.num_rows == 10 and plan.num_shards == 3


def test_append_to_an_output_of_another_model_is_refused_naming_the_difference(tmp_path, images):
    commit_pending(config_for(tmp_path), tmp_path / "out")
    add_images(tmp_path, 3)
    with pytest.raises(ConfigError) as caught:
        prepare(appending(tmp_path, "model.backbone=resnet50"))
    message = str(caught.value)
    assert "appending to it would mix features" in message and "backbone: 'mobilenetv2' -> 'resnet50'" in message
    assert not list((tmp_path / "out").glob("_manifest-g*"))  # refused before listing or writing anything


def test_the_cli_refuses_an_append_with_another_model_with_exit_2_before_ray(tmp_path, images, capsys):
    commit_pending(config_for(tmp_path), tmp_path / "out")
    add_images(tmp_path, 3)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"input": {"uri": str(tmp_path / "images")}, "run": {"shard_size": 4},
                                  "model": {"backbone": "efficientnetb0"},
                                  "output": {"uri": str(tmp_path / "out"), "mode": "append"}}))
    assert main(["extract", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert "appending to it would mix" in error and "'mobilenetv2' -> 'efficientnetb0'" in " ".join(error.split())


def test_a_crash_mid_append_resumes_exactly_once(tmp_path, images):
    """Crashes at each step of an append: after the new manifest but before the plan names it, and after a few
    of the new generation's shards committed. Whatever runs next (append or resume) does each image once."""
    output = tmp_path / "out"
    commit_pending(config_for(tmp_path), output)
    added = add_images(tmp_path, 7)
    (output / "_manifest-g0001.parquet").write_bytes(b"half a manifest")  # left by a crash before the plan write

    run_ledger = ledger.Ledger(str(output))
    plan, manifest = prepare(appending(tmp_path), run_ledger)
    assert run_ledger.pending(plan.num_shards) == [3, 4]
    commit_planned_shard(output, plan, manifest, 3)  # then the run dies (SIGKILL): shard 4 never commits
    ledger.Ledger(str(output)).write_data(4, ShardRows().to_table(row_schema(2)), 16)  # its orphan attempt
    more = add_images(tmp_path, 2, folder="later")  # and the archive grows again before the rerun

    said = []
    assert commit_pending(appending(tmp_path), output) == [4, 5]  # the unfinished generation first, then the new one
    assert [g.num_images for g in prepare(config_for(tmp_path), say=said.append)[0].generations] == [10, 7, 2]
    assert said == []  # a resume of a complete plan: nothing new to mention
    uris = finished_uris(config_for(tmp_path), output)
    assert len(uris) == len(set(uris)) and sorted(uris) == sorted(map(str, images + added + more))


def test_a_resume_says_in_one_line_when_the_input_holds_new_images(tmp_path, images, monkeypatch):
    output = tmp_path / "out"
    commit_pending(config_for(tmp_path), output)
    add_images(tmp_path, 3)
    said = []
    plan, manifest = prepare(config_for(tmp_path), say=said.append)
    assert plan.num_images == manifest.num_rows == 10  # exact: the frozen plan
    assert said == ["the input now holds 3 images the frozen plan does not (this resume leaves them out); "
                    "output.mode: append processes them"]

    monkeypatch.setattr(planning, "HINT_RELIST_LIMIT", 5)  # a plan too large to list again cheaply: silence
    said.clear()
    prepare(config_for(tmp_path), say=said.append)
    assert said == []


def test_an_output_from_before_generations_still_resumes_reads_and_appends(tmp_path, images):
    output = tmp_path / "out"
    commit_pending(config_for(tmp_path), output)
    old_plan = json.loads((output / layout.PLAN_FILE).read_text())
    del old_plan["generations"]  # as featurize wrote it before append existed
    (output / layout.PLAN_FILE).write_text(json.dumps(old_plan))

    plan, manifest = prepare(config_for(tmp_path))
    assert (plan.num_images, plan.num_shards, manifest.num_rows) == (10, 3, 10)
    assert inspect_output(str(output), Console(width=200))["images"] == 10
    add_images(tmp_path, 2)
    assert commit_pending(appending(tmp_path), output) == [3]
    assert len(json.loads((output / layout.PLAN_FILE).read_text())["generations"]) == 2


def test_inspect_shows_the_generations(tmp_path, images):
    output = tmp_path / "out"
    commit_pending(config_for(tmp_path), output)
    add_images(tmp_path, 5)
    prepare(appending(tmp_path))  # generation 1 planned, none of its shards committed yet
    console = Console(width=200, record=True)

    summary = inspect_output(str(output), console)

    assert [(row["images"], row["shards"], row["shards_committed"]) for row in summary["generations"]] == [
        (10, 3, 3), (5, 2, 0)]
    text = console.export_text()
    assert "2 (10, 5 images)" in text and "generation 1" in text and "0/2 shards committed" in text
    assert summary["images"] == 15 and summary["shards_pending"] == 2


# --- end to end on a real local Ray -------------------------------------------------------------------------


@pytest.mark.ray
def test_extract_then_append_processes_only_the_added_images(tmp_path, ray_local, tiny_model):
    import duckdb
    import pandas as pd
    import polars as pl

    images = tmp_path / "images"
    write_labelled_images(images, num_classes=4, per_class=250)  # 1,000 images in shards of 128: 8 shards
    output = tmp_path / "features"
    sections = {"input": {"labels": "from_dirs"}, "run": {"shard_size": 128}}
    config = write_extract_config(tmp_path / "config.json", images, tiny_model, output, **sections)
    assert main(["extract", "--config", str(config)]) == 0

    write_labelled_images(images / "class_new", num_classes=1, per_class=100, seed=3)  # 100 more: 1 shard
    assert main(["extract", "--config", str(config), "--set", "output.mode=append"]) == 0

    success = json.loads((output / layout.SUCCESS_FILE).read_text())
    assert success["shards"] == {"total": 9, "run": 1, "committed": 9}
    assert success["rows"]["total"] == 1100 and len(success["files"]) == 9
    generations = json.loads((output / layout.PLAN_FILE).read_text())["generations"]
    assert [(g["num_images"], g["shard_offset"]) for g in generations] == [(1000, 0), (100, 8)]
    assert json.loads((output / layout.commit_path(8)).read_text())["rows"] == 100  # exactly the added images

    paths = [str(output / path) for path in success["files"]]
    with_pandas = pd.concat([pd.read_parquet(path) for path in paths])
    with_duckdb = duckdb.sql(f"select uri from read_parquet({paths!r})").fetchall()
    with_polars = pl.read_parquet(paths)
    assert len(with_pandas) == len(with_duckdb) == with_polars.height == 1100
    assert with_pandas["uri"].is_unique and with_polars["uri"].n_unique() == 1100
    assert (with_pandas["label"] == "class_0").sum() == 350  # 250 from the first run, 100 in class_new/class_0

    assert main(["extract", "--config", str(config), "--set", "output.mode=append"]) == 0  # nothing new
    again = json.loads((output / layout.SUCCESS_FILE).read_text())
    assert again["shards"] == {"total": 9, "run": 0, "committed": 9} and again["files"] == success["files"]
    assert not (output / layout.manifest_file(2)).exists()
    assert len(inspect_output(str(output), Console(width=200))["generations"]) == 2
