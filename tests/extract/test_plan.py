"""The plan and the output ledger it opens, without Ray: a new plan, resume, fingerprint refusals, output.mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ExtractConfig, load_config
from pipeline.errors import ConfigError
from pipeline.extract.plan import prepare
from pipeline.extract.rows import ShardRows, row_schema
from pipeline.output import layout, ledger
from tests.helpers import write_labelled_images


def config_for(tmp_path: Path, *overrides: str) -> ExtractConfig:
    return load_config(ExtractConfig, None, [f"input.uri={tmp_path / 'images'}", f"output.uri={tmp_path / 'out'}",
                                             "run.shard_size=4", *overrides])


@pytest.fixture
def images(tmp_path) -> list[Path]:
    return write_labelled_images(tmp_path / "images", num_classes=2, per_class=5)  # 10 images: shards of 4, 4, 2


def commit_shard(output: Path, shard: int) -> str:
    """A shard committed as a run would: its data file, then the record naming it."""
    run_ledger = ledger.Ledger(str(output))
    path = run_ledger.write_data(shard, ShardRows().to_table(row_schema(2)), 16)
    run_ledger.commit(ledger.CommitRecord(shard=shard, files=[path], rows=0, ok=0, error=0))
    return path


def test_a_new_plan_freezes_the_listing_into_deterministic_shards(tmp_path, images):
    plan, manifest = prepare(config_for(tmp_path))
    assert (plan.num_images, plan.num_shards, plan.shard_size) == (10, 3, 4)
    assert [plan.shard_bounds(index) for index in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert sorted(manifest.column("uri").to_pylist()) == sorted(str(path) for path in images)
    frozen = json.loads((tmp_path / "out" / layout.PLAN_FILE).read_text())
    assert frozen["fingerprint"] == plan.fingerprint and frozen["fingerprint_inputs"]["pooling"] == "avg"
    assert (tmp_path / "out" / layout.MANIFEST_FILE).exists()


def test_resume_with_the_same_config_reuses_the_frozen_manifest_without_listing(tmp_path, images):
    plan, manifest = prepare(config_for(tmp_path))
    for path in images[:3]:  # the input changes after the plan froze: a resume still means the same images
        path.unlink()
    again, frozen_manifest = prepare(config_for(tmp_path))
    assert again == plan and frozen_manifest.equals(manifest)


def test_a_changed_fingerprint_is_refused_naming_what_differs(tmp_path, images):
    prepare(config_for(tmp_path))
    with pytest.raises(ConfigError) as caught:
        prepare(config_for(tmp_path, "model.pooling=max", "model.top_k=3"))
    message = str(caught.value)
    assert "different configuration" in message and "output.uri" in message
    assert "pooling: 'avg' -> 'max'" in message and "top_k: 5 -> 3" in message
    assert "input_size" not in message  # only the keys that differ
    assert "overwrite" in message


def test_output_mode_error_refuses_an_existing_output_and_overwrite_starts_again(tmp_path, images):
    prepare(config_for(tmp_path))
    commit_shard(tmp_path / "out", 0)
    with pytest.raises(ConfigError, match="output.mode is 'error'"):
        prepare(config_for(tmp_path, "output.mode=error"))
    assert ledger.read_commits(str(tmp_path / "out"))  # refused before touching anything

    run_ledger = ledger.Ledger(str(tmp_path / "out"))
    plan, _ = prepare(config_for(tmp_path, "output.mode=overwrite", "model.pooling=max"), run_ledger)
    assert plan.fingerprint_inputs["pooling"] == "max"  # a changed config is fine when starting again
    assert run_ledger.commits == {} and not (tmp_path / "out" / layout.COMMITS_DIR).exists()
    assert not any((tmp_path / "out").glob(f"{layout.DATA_DIR}/*"))


def test_pending_shards_are_those_without_a_commit_record(tmp_path, images):
    prepare(config_for(tmp_path))
    commit_shard(tmp_path / "out", 1)
    run_ledger = ledger.Ledger(str(tmp_path / "out"))
    plan, _ = prepare(config_for(tmp_path), run_ledger)
    assert sorted(run_ledger.commits) == [1]
    assert run_ledger.pending(plan.num_shards) == [0, 2]
