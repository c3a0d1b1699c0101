"""A piece decoded in one call and embedded in another (the actor's decode and process calls), without Ray: the rows
match one process_shard call; a decode that fails fails the piece on the model's side; a model's side that fails
stops the decoding, which never waits forever for room; calls arriving out of order run in the order of their turns.
"""

from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest

from pipeline.extract.handoff import Handoff, Handoffs, Turns
from pipeline.extract.items import DecodeSettings
from pipeline.extract.worker import ShardSettings, ShardTask, piece_batches, process_shard
from tests.extract.test_worker import StandInExtractor
from tests.images import photo_bytes, solid_bytes

JOIN_SECONDS = 30  # a side still running after this is stuck


def settings_for(tmp_path, output: str) -> ShardSettings:
    return ShardSettings(output_uri=str(tmp_path / output), output_storage_options={}, decode=DecodeSettings({}),
                         decode_threads=2, run_tag="tag12345")


def in_two_threads(task: ShardTask, extractor, settings: ShardSettings, handoffs: Handoffs):
    """The actor's two calls of a piece, the decode in a thread of its own; returns the process side's result."""
    decoding = threading.Thread(target=lambda: handoffs.join(0).fill(
        lambda timings: piece_batches(task, extractor, settings, timings)))
    decoding.start()
    handoff = handoffs.join(0)
    try:
        return process_shard(task, extractor, settings, handoff.batches(), handoff.timings)
    finally:
        handoff.abandon()
        decoding.join(JOIN_SECONDS)
        assert not decoding.is_alive()


def test_decoded_in_one_thread_and_embedded_in_another_the_rows_are_one_calls(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    uris = []
    for index in range(23):
        path = folder / f"image_{index:02d}.jpg"
        path.write_bytes(b"" if index == 5 else photo_bytes("JPEG", 40, 30, seed=index))
        uris.append(str(path))
    task = ShardTask(shard=2, start=0, stop=len(uris), uris=uris, labels=[f"label_{i}" for i in range(len(uris))])
    handoffs = Handoffs()
    handed = in_two_threads(task, StandInExtractor(batch_size=4), settings_for(tmp_path, "handed"), handoffs)
    alone = process_shard(task, StandInExtractor(batch_size=4), settings_for(tmp_path, "alone"))

    handed_rows = pq.read_table(tmp_path / "handed" / handed.file).drop(["sha256", "phash"]).to_pylist()
    alone_rows = pq.read_table(tmp_path / "alone" / alone.file).drop(["sha256", "phash"]).to_pylist()
    assert [row["uri"] for row in handed_rows] == uris
    assert handed_rows == alone_rows
    assert (handed.rows, handed.ok, handed.error) == (23, 22, 1) and handed.errors_by_reason == {"empty file": 1}
    assert handed.timings["decode"] > 0 and handed.timings["forward"] > 0 and "wait" in handed.timings
    assert handoffs.waiting == {}  # both calls joined: nothing kept


def test_a_decode_that_fails_fails_the_piece_on_the_models_side(tmp_path):
    task = ShardTask(shard=0, start=0, stop=1, uris=[str(tmp_path / "a.png")], labels=[None])
    (tmp_path / "a.png").write_bytes(solid_bytes("RGB", (1, 2, 3), "PNG", 8, 8))
    handoff = Handoff()

    def broken(timings):
        yield from ()
        raise RuntimeError("a bug while decoding")

    handoff.fill(broken)  # handed over, not raised: the piece fails once, in the call the driver collects
    with pytest.raises(RuntimeError, match="a bug while decoding"):
        process_shard(task, StandInExtractor(batch_size=4), settings_for(tmp_path, "out"), handoff.batches(),
                      handoff.timings)


def test_a_failed_models_side_stops_the_decoding_which_never_waits_forever():
    """The model's side reads one batch of many and fails: the decoding side stops at its next batch and closes
    its batches (their decode threads shut down); a piece abandoned before its decode began decodes nothing."""
    handoff = Handoff(size=1)
    produced, closed = [], threading.Event()

    def many_batches(timings):
        try:
            for index in range(1000):
                produced.append(index)
                yield [index]
        finally:
            closed.set()

    decoding = threading.Thread(target=handoff.fill, args=(many_batches,))
    decoding.start()
    assert next(handoff.batches()) == [0]
    handoff.abandon()
    decoding.join(JOIN_SECONDS)
    assert not decoding.is_alive() and closed.is_set() and len(produced) < 5

    late = Handoff()
    late.abandon()
    late.fill(many_batches)
    assert len(produced) < 5


def test_calls_arriving_out_of_order_run_in_the_order_of_their_turns():
    """Pieces 2, 0, 3, 1 arrive at once, each in a thread of its own, as a threaded actor may run them: each waits for
    its turn, so they run 0, 1, 2, 3, one at a time."""
    turns = Turns()
    ran, running, alongside = [], [], []

    def call(number: int) -> None:
        with turns.turn(number):
            running.append(number)
            time.sleep(0.01)  # room for another call to run alongside, were turns not kept
            alongside.append(len(running))
            ran.append(number)
            running.remove(number)

    threads = [threading.Thread(target=call, args=(number,)) for number in (2, 0, 3, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_SECONDS)
    assert not any(thread.is_alive() for thread in threads)
    assert ran == [0, 1, 2, 3] and alongside == [1, 1, 1, 1]
