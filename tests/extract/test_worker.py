"""process_shard without Ray: real image files in, one row per image out, with a stand-in for the model.

The model has its own tests (tests/models); here a tiny stand-in returns fixed-size arrays, so what is checked is
the worker's part: manifest order, batching at the extractor's batch size, error rows and their reasons, loud bugs.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.extract.items import DecodeSettings
from pipeline.extract.worker import (
    ShardSettings,
    ShardTask,
    process_shard,
    quarantine_rows,
    reads_locally,
    reason_category,
)
from tests.images import HTML_ERROR_PAGE, photo_bytes, solid_bytes, truncated
from tests.readers import ThreadNoting, reading

COLORS = {"red.png": (200, 10, 10), "green.jpg": (10, 200, 10), "blue.png": (10, 10, 200), "grey.png": (90, 90, 90)}


class StandInExtractor:
    """What a worker needs of a FeatureExtractor: fixed-size outputs (the mean colour as features, a fixed top 2)."""

    feature_dim = 3
    input_size = (16, 16)
    class_names = ["cat", "dog"]
    provenance = {"backbone": "stand-in"}

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.batch_shapes: list[tuple] = []

    def __call__(self, images: np.ndarray) -> SimpleNamespace:
        self.batch_shapes.append(images.shape)
        count = len(images)
        return SimpleNamespace(features=images.reshape(count, -1, 3).mean(axis=1).astype(np.float32),
                               top_k_indices=np.tile(np.int32([[1, 0]]), (count, 1)),
                               top_k_scores=np.tile(np.float32([[0.75, 0.25]]), (count, 1)))


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Four real images of one colour each, three broken ones, and one that does not exist."""
    samples = {name: solid_bytes("RGB", color, "JPEG" if name.endswith(".jpg") else "PNG", 20, 30)
               for name, color in COLORS.items()}
    samples.update({"empty.jpg": b"", "html_page.jpg": HTML_ERROR_PAGE, "truncated.jpg": truncated(photo_bytes())})
    (tmp_path / "in").mkdir()
    for name, data in samples.items():
        (tmp_path / "in" / name).write_bytes(data)
    return {name: str(tmp_path / "in" / name) for name in [*samples, "missing.jpg"]}


def run_shard(tmp_path, uris: list[str], extractor, decode: dict | None = None, **settings) -> tuple:
    """One piece through process_shard; `decode`: DecodeSettings' keys (a reader), `settings`: ShardSettings'."""
    settings = ShardSettings(output_uri=str(tmp_path / "out"), output_storage_options={},
                             decode=DecodeSettings({}, **(decode or {})), decode_threads=2, run_tag="tag12345",
                             **settings)
    task = ShardTask(shard=3, start=30, stop=30 + len(uris), uris=uris, labels=[f"label_{i}" for i in range(len(uris))])
    result = process_shard(task, extractor, settings)
    return result, pq.read_table(tmp_path / "out" / result.file).to_pylist()


def test_ok_and_error_rows_in_manifest_order_batched_at_the_extractors_batch_size(tmp_path, files):
    order = ["red.png", "empty.jpg", "green.jpg", "missing.jpg", "blue.png", "html_page.jpg", "grey.png",
             "truncated.jpg"]
    extractor = StandInExtractor(batch_size=3)
    result, rows = run_shard(tmp_path, [files[name] for name in order], extractor)

    assert result.file.startswith("data/shard-00003-tag12345-")
    assert (result.shard, result.start, result.stop) == (3, 30, 38)
    assert (result.rows, result.ok, result.error) == (8, 4, 4)
    assert [row["uri"] for row in rows] == [files[name] for name in order]
    assert [row["label"] for row in rows] == [f"label_{i}" for i in range(8)]
    assert [shape[0] for shape in extractor.batch_shapes] == [3, 1]  # the extractor's batch size, read from it
    assert {"fetch", "decode", "forward", "write", "wait"} <= set(result.timings)

    by_name = dict(zip(order, rows))
    for name, color in COLORS.items():
        row = by_name[name]
        assert row["status"] == "ok" and row["error"] is None
        assert (row["width"], row["height"]) == (30, 20)
        np.testing.assert_allclose(row["features"], color, atol=3)  # this image's own output, not a neighbour's
        assert row["top_k_labels"] == ["dog", "cat"] and row["top_k_scores"] == [0.75, 0.25]

    errors = {name: by_name[name] for name in order if name not in COLORS}
    assert all(row["status"] == "error" and row["features"] is None and row["top_k_labels"] == []
               for row in errors.values())
    assert errors["missing.jpg"]["error"].startswith("fetch failed")
    assert "empty" in errors["empty.jpg"]["error"]
    assert "truncated" in errors["truncated.jpg"]["error"]
    assert errors["html_page.jpg"]["error"] and not errors["html_page.jpg"]["error"].startswith("fetch failed")
    assert sum(result.errors_by_reason.values()) == 4
    assert set(result.errors_by_reason) == {reason_category(row["error"]) for row in errors.values()}


def test_local_files_are_read_in_the_decode_threads_and_other_reads_in_fetch_threads(tmp_path, files):
    """A local read takes microseconds: the decode thread does it. A store's (or a reader of the user's) waits on
    the network: fetch threads do it, as many as run.fetch_threads, ahead of the decode threads."""
    assert reads_locally(files["red.png"], DecodeSettings({})) and reads_locally("file:///a.jpg", DecodeSettings({}))
    assert not reads_locally("s3://bucket/a.jpg", DecodeSettings({}))
    assert not reads_locally("https://example.com/a.jpg", DecodeSettings({}))
    noting = reading("ThreadNoting")
    assert not reads_locally(files["red.png"], DecodeSettings({}, reader=noting["reader"]))

    uris = [files[name] for name in ("red.png", "green.jpg", "missing.jpg", "blue.png")]
    result, rows = run_shard(tmp_path, uris, StandInExtractor(batch_size=2), decode=noting, fetch_threads=3)
    assert [row["uri"] for row in rows] == uris and (result.ok, result.error) == (3, 1)
    assert {ThreadNoting.threads[uri].rsplit("_", 1)[0] for uri in uris} == {"fetch"}


def test_a_bug_in_featurize_raises_instead_of_becoming_an_error_row(tmp_path, files, monkeypatch):
    with pytest.raises(AssertionError, match="a bug in featurize's own code"):
        run_shard(tmp_path, [files["red.png"], files["green.jpg"]], StandInExtractor(batch_size=2),
                  decode=reading("Buggy", marker="green"))

    class BrokenExtractor(StandInExtractor):
        def __call__(self, images):
            raise RuntimeError("a bug in the forward pass")

    with pytest.raises(RuntimeError, match="forward pass"):
        run_shard(tmp_path, [files["red.png"]], BrokenExtractor(batch_size=2))
    assert not (tmp_path / "out").exists()  # nothing written for a piece that failed


def test_quarantine_rows_name_the_crashes_for_every_image_of_the_piece():
    task = ShardTask(shard=0, start=5, stop=7, uris=["a.jpg", "b.jpg"], labels=["x", None])
    rows = quarantine_rows(task, attempts=3)
    assert rows.uri == ["a.jpg", "b.jpg"] and rows.label == ["x", None] and rows.status == ["error", "error"]
    assert all("crashed on this image 3 times" in error for error in rows.error)
    assert {reason_category(error) for error in rows.error} == {"quarantined"}
    assert rows.features == [None, None]
