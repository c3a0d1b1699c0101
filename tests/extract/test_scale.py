"""Large inputs on a small driver: manifest parts and uri_column, shards as slices of frozen parts, streaming
directory listings, compacted commit records."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import ExtractConfig, InputConfig, ModelConfig, load_config
from pipeline.errors import ConfigError
from pipeline.extract import listing, parts
from pipeline.extract.plan import prepare_plan
from pipeline.extract.worker import ShardSettings, ShardTask, process_shard
from pipeline.output import layout, ledger
from tests.helpers import (
    committed_shards,
    cosine_rows,
    featurize_process,
    read_rows,
    wait_for_commits_beyond,
    write_extract_config,
    write_labelled_images,
)
from tests.readers import reading


def write_manifest_parts(directory: Path, paths: list[Path], num_parts: int) -> None:
    """img2dataset-style metadata parts: a `url` column, a caption, the label in `breed`."""
    directory.mkdir(parents=True)
    for index, chunk in enumerate(np.array_split(np.array([str(path) for path in paths]), num_parts)):
        pq.write_table(pa.table({"caption": [f"photo {uri[-7:]}" for uri in chunk], "url": chunk.tolist(),
                                 "breed": [Path(uri).parent.name for uri in chunk]}),
                       directory / f"part-{index:05d}.parquet")


def folder_rows(tmp_path: Path, model: Path):
    """The same images extracted from their folder (labels from_dirs), as one shard through the worker in-process."""
    from pipeline.models.extractor import FeatureExtractor

    extractor = FeatureExtractor(ModelConfig(backbone=str(model), weights="none", runtime="keras"), batch_size=4,
                                 num_threads=1)
    folder = listing.list_images(InputConfig(uri=(str(tmp_path / "images"),), labels="from_dirs"))
    settings = ShardSettings(output_uri=str(tmp_path / "reference"), output_storage_options={}, decode_threads=2)
    task = ShardTask(0, 0, folder.num_rows, folder.column("uri").to_pylist(), folder.column("label").to_pylist())
    return pq.read_table(tmp_path / "reference" / process_shard(task, extractor, settings).file).to_pandas()


@pytest.mark.ray
def test_a_glob_of_manifest_parts_with_a_url_column_extracts_like_the_folder_and_resumes_from_compacted_commits(
        tmp_path, ray_local, tiny_model, monkeypatch):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=6)
    write_manifest_parts(tmp_path / "metadata", paths, num_parts=3)
    monkeypatch.setattr(ledger, "COMPACT_EVERY", 2)  # 6 shards: compacted objects mid-run, folded into one at finish
    monkeypatch.setattr(ledger, "FINISH_COMPACTS_ABOVE", 1)
    by_manifest = write_extract_config(
        tmp_path / "manifest.yaml", tmp_path / "metadata" / "part-*.parquet", tiny_model, tmp_path / "from_manifest",
        input={"uri_column": "url", "labels": "breed"}, model={"runtime": "keras"}, run={"shard_size": 2})

    assert main(["extract", "--config", str(by_manifest)]) == 0

    rows, success = read_rows(tmp_path / "from_manifest")
    assert len(rows) == len(paths) and rows["uri"].is_unique and set(rows["uri"]) == {str(p) for p in paths}
    assert success["rows"] == {"total": 12, "ok": 12, "error": 0} and success["shards"]["total"] == 6
    reference = folder_rows(tmp_path, tiny_model)
    rows, reference = rows.set_index("uri").sort_index(), reference.set_index("uri").sort_index()
    assert rows["label"].tolist() == reference["label"].tolist() == [Path(uri).parent.name for uri in rows.index]
    assert cosine_rows(np.stack(rows["features"]), np.stack(reference["features"])).min() >= 0.9999
    commit_objects = sorted(os.listdir(tmp_path / "from_manifest" / layout.COMMITS_DIR))
    assert len(commit_objects) == 1 and commit_objects[0].startswith("compacted-")

    os.remove(tmp_path / "from_manifest" / layout.SUCCESS_FILE)  # a resume of a finished run reads the one object
    assert main(["extract", "--config", str(by_manifest)]) == 0
    again, resumed = read_rows(tmp_path / "from_manifest")
    assert resumed["shards"] == {"total": 6, "run": 0, "committed": 6}
    assert resumed["files"] == success["files"] and resumed["rows"] == success["rows"] and len(again) == 12


def test_a_wrong_uri_column_is_a_config_error_naming_the_key_and_the_columns(tmp_path):
    write_manifest_parts(tmp_path / "metadata", [tmp_path / "a.jpg", tmp_path / "b.jpg"], num_parts=2)
    with pytest.raises(ConfigError) as caught:
        listing.list_images(InputConfig(uri=(str(tmp_path / "metadata" / "*.parquet"),)))
    message = str(caught.value)
    assert "input.uri_column" in message and "caption, url, breed" in message and "'url'" in message


def test_shards_are_slices_of_frozen_parts_and_a_task_carries_no_uri(tmp_path, monkeypatch):
    """A 5,000-entry manifest (entries need not exist to be planned): parts of whole shards with their checksums,
    every shard read back from its slice gives the manifest's rows in order, and a task's size does not grow with
    its shard."""
    monkeypatch.setattr(parts, "PART_TARGET_ROWS", 1024)
    uris = [f"s3://archive/images/{index:07d}.jpg" for index in range(5000)]
    pq.write_table(pa.table({"url": uris}), tmp_path / "manifest.parquet")
    sizes = {}
    for shard_size in (10, 1000):
        output = tmp_path / f"out-{shard_size}"
        config = load_config(ExtractConfig, None, [f"input.uri={tmp_path / 'manifest.parquet'}",
                                                   "input.uri_column=url", f"output.uri={output}",
                                                   f"run.shard_size={shard_size}", "model.weights=none"])
        plan = prepare_plan(config, ledger.Ledger(str(output)))
        frozen = plan.generations[0].parts
        assert sum(part.num_images for part in frozen) == 5000 and len(frozen) == -(-5000 // parts.rows_per_part(
            shard_size))
        for part in frozen:
            assert hashlib.sha256((output / part.path).read_bytes()).hexdigest() == part.sha256
        settings = ShardSettings(output_uri=str(output), output_storage_options={})
        tasks = [ShardTask(index, *plan.shard_slice(index)[:2], where=plan.shard_slice(index)[2])
                 for index in range(plan.num_shards)]
        assert [uri for task in tasks for uri, _ in task.entries(settings)] == uris
        middle = tasks[len(tasks) // 2]  # a bisected piece reads just its rows
        assert [uri for uri, _ in middle.piece(middle.start + 3, middle.start + 5).entries(settings)] == uris[
            middle.start + 3:middle.start + 5]
        sizes[shard_size] = max(len(pickle.dumps(task)) for task in tasks)
    assert sizes[10] < 300 and sizes[1000] <= sizes[10] + 8  # 1,000 URIs would be ~36 KB


def test_a_directory_listing_streams_prefix_by_prefix_in_the_order_of_a_full_sort_into_parts(tmp_path, monkeypatch):
    root = tmp_path / "images"
    paths = write_labelled_images(root, num_classes=4, per_class=3)
    for name in ("a.jpg", "class_1.jpg", "class_1-x.png", "z.png"):  # top-level files between the prefixes
        (root / name).write_bytes(paths[0].read_bytes())
    (root / "class_1" / "deeper").mkdir()
    (root / "class_1" / "deeper" / "b.jpg").write_bytes(paths[0].read_bytes())
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "t.jpg").write_bytes(paths[0].read_bytes())
    expected = sorted(str(Path(folder) / name) for folder, _, names in os.walk(root) for name in names
                      if ".thumbnails" not in folder)
    monkeypatch.setattr(listing, "LISTING_CHUNK", 3)
    monkeypatch.setattr(listing, "LISTING_THREADS", 2)
    monkeypatch.setattr(parts, "PART_TARGET_ROWS", 4)
    said = []

    chunks = list(listing.iterate_listing(InputConfig(uri=(str(root),), labels="from_dirs")))
    assert len(chunks) > 2 and [uri for chunk in chunks for uri in chunk.column("uri").to_pylist()] == expected

    output = tmp_path / "out"
    config = load_config(ExtractConfig, None, [f"input.uri={root}", "input.labels=from_dirs", f"output.uri={output}",
                                               "run.shard_size=2", "model.weights=none"])
    plan = prepare_plan(config, ledger.Ledger(str(output)), say=said.append)
    frozen = plan.generations[0].parts
    assert [part.path for part in frozen][:2] == ["_manifest.parquet", "_manifest-p00001.parquet"]
    assert len(frozen) == -(-len(expected) // 4) and plan.num_shards == -(-len(expected) // 2)
    written = pa.concat_tables([pq.read_table(output / part.path) for part in frozen])
    assert written.column("uri").to_pylist() == expected
    assert written.column("label").to_pylist() == [Path(uri).parent.name for uri in expected]
    assert json.loads((output / layout.PLAN_FILE).read_text())["generations"][0]["parts"][1]["num_images"] == 4

    with open(output / frozen[1].path, "ab") as changed:  # a part that changed under the plan is never resumed
        changed.write(b"more")
    with pytest.raises(ConfigError, match="_manifest-p00001.parquet holds .* overwrite"):
        prepare_plan(config, ledger.Ledger(str(output)))


@pytest.mark.ray
@pytest.mark.slow
def test_a_driver_sigkilled_over_tar_shards_resumes_losing_and_duplicating_nothing(tmp_path, ray_local, tiny_model):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=12, size=(40, 30))
    (tmp_path / "tars").mkdir()
    for number in range(4):
        with tarfile.open(tmp_path / "tars" / f"shard-{number:05d}.tar", "w") as archive:
            for path in paths[number * 6:(number + 1) * 6]:
                archive.add(path, arcname=f"{path.parent.name}-{path.name}")
    address = ray_local.get_runtime_context().gcs_address  # the driver joins this test's Ray: no second start-up
    config = write_extract_config(tmp_path / "config.yaml", tmp_path / "tars" / "shard-{00000..00003}.tar",
                                  tiny_model, tmp_path / "features", model={"runtime": "keras"},
                                  run={"shard_size": 3, "address": address},
                                  input=reading("Slow", seconds=0.4))  # each tar stream: caught mid-run
    output = tmp_path / "features"
    driver = featurize_process(config)
    try:
        wait_for_commits_beyond(0, output, driver)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    committed_before = committed_shards(output)
    assert not (output / layout.SUCCESS_FILE).exists() and 0 < committed_before < 8

    assert main(["extract", "--config", str(config)]) == 0

    rows, success = read_rows(output)
    assert len(rows) == 24 and rows["uri"].is_unique and (rows["status"] == "ok").all()
    assert {uri.split("::")[0].removeprefix("tar://") for uri in rows["uri"]} == {
        f"{path.parent.name}-{path.name}" for path in paths}
    assert success["shards"] == {"total": 8, "run": 8 - committed_before, "committed": 8}
