"""`featurize inspect` on finished and unfinished outputs, and the job entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ExtractConfig, load_config
from pipeline.extract.plan import prepare
from pipeline.extract.rows import row_schema
from pipeline.output import layout, ledger
from tests.conftest import write_labelled_images
from tests.output.test_ledger import make_rows

ROOT = Path(__file__).resolve().parents[2]


def unfinished_output(tmp_path: Path) -> Path:
    """Plan of 3 shards over 9 real files; shard 0 committed with an error row, shard 1 only an orphan."""
    write_labelled_images(tmp_path / "images", num_classes=3, per_class=3)
    output = tmp_path / "out"
    config = load_config(ExtractConfig, None, [f"input.uri={tmp_path / 'images'}", f"output.uri={output}",
                                               "run.shard_size=3"])
    plan, _ = prepare(config)
    schema = row_schema(2, provenance={"backbone": "resnet50", "feature_dim": 2})
    name = layout.new_data_file_name(0)
    ledger.write_data_file(str(output), name, make_rows(3, 2).to_table(schema), 1024)
    ledger.write_data_file(str(output), layout.new_data_file_name(1), make_rows(3, 2).to_table(schema), 1024)
    ledger.write_commit(str(output), ledger.CommitRecord(0, [name], 3, 2, 1, errors_by_reason={"truncated image": 1}))
    return output


def test_inspect_reports_rows_reasons_schema_provenance_and_pending_shards(tmp_path, capsys):
    from rich.console import Console

    from pipeline.tools.report import inspect_output

    output = unfinished_output(tmp_path)
    summary = inspect_output(str(output), Console(width=200))
    assert summary["shards_total"] == 3 and summary["shards_committed"] == 1 and summary["shards_pending"] == 2
    assert summary["rows_ok"] == 2 and summary["rows_error"] == 1 and not summary["finished"]
    assert summary["errors_by_reason"] == {"truncated image": 1}
    assert summary["provenance"]["backbone"] == "resnet50"
    assert "features: fixed_size_list<element: float>[2]" in summary["schema"]
    printed = capsys.readouterr().out
    assert "incomplete" in printed and "1 x truncated image" in printed and "2 pending of 3" in printed
    assert main(["inspect", str(output)]) == 0


def test_inspect_of_a_missing_output_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


@pytest.mark.ray
def test_job_entry_point_joins_the_cluster_in_ray_address(tmp_path, ray_local, tiny_model):
    import ray

    write_labelled_images(tmp_path / "images", num_classes=2, per_class=3)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"input": {"uri": str(tmp_path / "images")},
                                  "model": {"backbone": str(tiny_model), "weights": "none", "top_k": 1},
                                  "output": {"uri": str(tmp_path / "out")}}))
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "extract_features.py"), "--config", str(config)],
                          capture_output=True, text=True, env=environment, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "joined this Ray job's cluster" in done.stderr
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["rows"]["total"] == 6
