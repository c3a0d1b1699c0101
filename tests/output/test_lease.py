"""One writer per output: the lease (pipeline/output/lease.py) on local disk and on a real S3 server on loopback, then
real `featurize extract` drivers started together, broken, SIGKILLed and rerun on one output."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.extract.rows import ShardRows, row_schema
from pipeline.io import storage
from pipeline.output import layout, lease, ledger
from pipeline.output.lease import LeaseHeld, LeaseLost, LeaseRecord
from tests.helpers import (
    committed_shards,
    featurize_process,
    train_config,
    unfinished_output,
    wait_for_commits_beyond,
    write_labelled_images,
)
from tests.readers import reading


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> tuple[str, dict]:
    """(output URI, storage options): a local directory, or a prefix in a bucket of the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    endpoint = request.getfixturevalue("moto_endpoint")
    return f"s3://{request.getfixturevalue('bucket')}/out", {"client_kwargs": {"endpoint_url": endpoint}}


def plant(output_uri: str, options: dict, **fields) -> LeaseRecord:
    """A lease written by hand, by default one of a run on another host that stopped heart-beating 100 s ago."""
    now = time.time()
    record = LeaseRecord(**{"run_id": uuid.uuid4().hex, "stage": "extract", "host": "elsewhere", "pid": 4242,
                            "machine": "elsewhere|boot|pid:[1]", "started_at": now - 200, "heartbeat_at": now - 100,
                            "expires_after": 30.0, **fields})
    storage.write_bytes(lease.lease_uri(output_uri), record.to_bytes(), options)
    return record


class ManualClock:
    """A lease clock the test moves by hand: heartbeats and expiries without sleeping through them."""

    def __init__(self):
        self.now = time.time()
        self.moved = threading.Condition()
        self.waiting = 0  # threads inside wait(): the heartbeat, once it is waiting for its next beat

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """Until `seconds` of this clock have passed (or the event is set)."""
        with self.moved:
            deadline = self.now + seconds
            self.waiting += 1
            while not event.is_set() and self.now < deadline:
                self.moved.wait(0.05)
            self.waiting -= 1
        return event.is_set()

    def advance(self, seconds: float) -> None:
        with self.moved:
            self.now += seconds
            self.moved.notify_all()

    def beat(self, seconds: float) -> None:
        """Move the time on once the heartbeat waits (so that it sees the whole step)."""
        until(lambda: self.waiting)
        self.advance(seconds)

    def clock(self) -> lease.Clock:
        return lease.Clock(now=self.time, monotonic=self.monotonic, wait=self.wait)


def until(condition, timeout: float = 30.0) -> None:
    """Wait for the heartbeat thread to act on a moved clock (a generous bound: it is never the thing measured)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the heartbeat did not act"
        time.sleep(0.01)


def holder(output_uri: str, options: dict) -> LeaseRecord | None:
    return lease.current(output_uri, options)


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


# --------------------------------------------------------------------------------------------------
# the lease itself (no Ray)
# --------------------------------------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_holder_until_the_first_releases(output):
    uri, options = output
    first = lease.Lease(uri, options).acquire()
    try:
        with pytest.raises(LeaseHeld) as refused:
            lease.Lease(uri, options, stage="predict").acquire()
        message = str(refused.value)
        assert f"run {first.record.run_id[:8]} (extract) on host {first.record.host}, pid {os.getpid()}" in message
        assert "since 20" in message and f"featurize lease break {uri}" in message and "Wait for it" in message
        assert holder(uri, options).run_id == first.record.run_id
    finally:
        first.release()
    assert holder(uri, options) is None  # released: the object is gone
    second = lease.Lease(uri, options).acquire()
    second.check()
    second.release()


def test_dead_holders_are_taken_over_live_ones_are_not(output, caplog):
    uri, options = output
    plant(uri, options, machine=lease.machine_identity(), pid=dead_pid(), heartbeat_at=time.time())
    with lease.held(uri, options) as taken:  # same host, process gone: at once, however fresh its heartbeat
        assert holder(uri, options).run_id == taken.record.run_id
    assert "on this host is gone" in caplog.text

    plant(uri, options)  # another host, silent for 100 s with an expiry of 30 s
    with lease.held(uri, options) as taken:
        assert holder(uri, options).run_id == taken.record.run_id
    assert "more than its expiry of 30 s" in caplog.text

    clock = ManualClock()
    plant(uri, options, heartbeat_at=clock.time(), expires_after=1.0)  # another host, alive a moment ago
    with pytest.raises(LeaseHeld, match="on host elsewhere, pid 4242"):
        lease.Lease(uri, options, clock=clock.clock()).acquire()
    clock.advance(1.2)  # ... and silent since: expired
    with lease.held(uri, options, clock=clock.clock()):
        pass


def test_fencing_a_run_whose_lease_was_broken_or_taken_stops(output):
    uri, options = output
    first = lease.Lease(uri, options).acquire()
    first.check()
    assert lease.break_lease(uri, options).run_id == first.record.run_id
    with pytest.raises(LeaseLost, match="its lease was broken"):
        first.check()
    with pytest.raises(LeaseLost):  # and it stays lost
        first.raise_if_lost()
    second = lease.Lease(uri, options).acquire()
    first.release()  # no longer its own: the other run's lease stays
    assert holder(uri, options).run_id == second.record.run_id

    taker = plant(uri, options, heartbeat_at=time.time())  # as if a run elsewhere had taken the lease over
    with pytest.raises(LeaseLost, match=f"now held by run {taker.run_id[:8]} \\(extract\\) on host elsewhere"):
        second.check()
    second.release()
    assert holder(uri, options).run_id == taker.run_id


def test_the_heartbeat_keeps_a_lease_alive_and_notices_its_loss(tmp_path):
    uri, clock = str(tmp_path / "out"), ManualClock()
    alive = lease.Lease(uri, seconds=0.6, clock=clock.clock()).acquire()  # a heartbeat every 0.2 s
    started = alive.record.heartbeat_at
    for _ in range(5):  # 1.0 s: longer than the expiry, so only the heartbeat keeps it
        clock.beat(0.2)
        until(lambda: holder(uri, {}).heartbeat_at == clock.time())
    with pytest.raises(LeaseHeld):
        lease.Lease(uri, clock=clock.clock()).acquire()
    assert holder(uri, {}).heartbeat_at == pytest.approx(started + 1.0)
    lease.break_lease(uri)
    clock.beat(0.2)
    until(lambda: alive.lost is not None)
    with pytest.raises(LeaseLost):  # found out by the heartbeat, without asking the store
        alive.raise_if_lost()
    alive.release()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale"])
def test_concurrent_takers_exactly_one_wins(output, stale):
    """Eight threads taking one lease at once, on an empty output or over one stale lease: one wins."""
    uri, options = output
    if stale:
        plant(uri, options)
    barrier = threading.Barrier(8)
    outcomes: list = []

    def take():
        candidate = lease.Lease(uri, options)
        barrier.wait()
        try:
            outcomes.append(candidate.acquire())
        except LeaseHeld as refused:
            outcomes.append(refused)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [outcome for outcome in outcomes if isinstance(outcome, lease.Lease)]
    assert len(outcomes) == 8 and len(winners) == 1
    assert holder(uri, options).run_id == winners[0].record.run_id
    winners[0].release()


def test_orphans_are_removed_only_when_older_than_the_run_or_its_own(tmp_path):
    output = str(tmp_path / "out")
    table = ShardRows().to_table(row_schema(2))
    old = layout.new_data_file_name(0)
    ledger.write_data_file(output, old, table, 16)
    time.sleep(0.05)
    with lease.held(output) as held:
        time.sleep(0.05)
        newer = layout.new_data_file_name(1)  # as an actor of a run that lost the lease might write it now
        own = layout.new_data_file_name(2, held.tag)
        committed = layout.new_data_file_name(3, held.tag)
        for name in (newer, own, committed):
            ledger.write_data_file(output, name, table, 16)
        commits = {3: ledger.CommitRecord(shard=3, files=[committed], rows=0, ok=0, error=0)}
        removed = ledger.remove_orphans(output, commits, written_before=held.started_on_store, run_tag=held.tag)
    assert removed == 2
    assert sorted(os.listdir(tmp_path / "out" / "data")) == sorted(Path(name).name for name in (newer, committed))


def test_lease_break_command_and_best_effort_stores(tmp_path, capsys, caplog):
    uri = str(tmp_path / "out")
    assert main(["lease", "break", uri]) == 0
    assert "has no lease: nothing to break" in " ".join(capsys.readouterr().out.split())
    planted = plant(uri, {}, heartbeat_at=time.time())
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"output": {"uri": uri, "storage_options": {}}}))
    assert main(["lease", "break", uri, "--config", str(config)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"broke the lease on {uri} held by run {planted.run_id[:8]} (extract) on host elsewhere" in printed
    assert holder(uri, {}) is None

    lease._warned_best_effort.discard("memory")
    for _ in range(2):
        with lease.held(f"memory://featurize-{uuid.uuid4().hex[:6]}/out") as held:
            held.check()
    assert caplog.text.count("memory:// has no conditional writes") == 1


def test_inspect_says_who_writes_the_output(tmp_path, capsys):
    output = unfinished_output(tmp_path)
    with lease.held(str(output)) as held:
        assert main(["inspect", str(output)]) == 0
        printed = " ".join(capsys.readouterr().out.split())
        assert f"lease: being written now by run {held.tag} (extract) on host {held.record.host}" in printed
    assert main(["inspect", str(output)]) == 0
    assert "lease:" not in capsys.readouterr().out


def test_train_and_predict_take_the_same_lease(tmp_path, digits, extract_output, logistic_run):  # noqa: F811 - fixtures
    from pipeline.train import fit as train
    from pipeline.train import predict

    model_output = str(tmp_path / "model")
    with lease.held(model_output, stage="train"), pytest.raises(LeaseHeld, match=r"\(train\) on host"):
        train.train(train_config(extract_output, model_output))
    assert not (tmp_path / "model" / layout.METRICS_FILE).exists()

    output = str(tmp_path / "predictions")
    with lease.held(output, stage="extract"), pytest.raises(LeaseHeld, match="--output: .* is being written"):
        predict.predict(logistic_run[0], extract_output, output)
    success = predict.predict(logistic_run[0], extract_output, output)
    assert not (tmp_path / "predictions" / lease.LEASE_FILE).exists()  # released at the end
    assert sorted(os.listdir(tmp_path / "predictions" / "data")) == sorted(Path(f).name for f in success["files"])


# --------------------------------------------------------------------------------------------------
# real drivers on one output
# --------------------------------------------------------------------------------------------------


def write_config(tmp_path: Path, model: Path, output_uri: str, slow: float = 0.0, **output_keys) -> Path:
    """An extract config; `slow`: seconds more each image takes (a reader injected by the config, shards of 2)."""
    config = {"input": {"uri": str(tmp_path / "images"), "labels": "from_dirs",
                        **(reading("Slow", seconds=slow) if slow else {})},
              "model": {"backbone": str(model), "weights": "none", "top_k": 1},
              "run": {"batch_size": 4, "shard_size": 2, "actors": 1, "cpus_per_actor": 1, "decode_threads": 1},
              "output": {"uri": output_uri, **output_keys}}
    path = tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(json.dumps(config))
    return path


def first_to_exit(processes: list[subprocess.Popen], timeout: float = 120) -> subprocess.Popen:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for process in processes:
            if process.poll() is not None:
                return process
        time.sleep(0.05)
    raise AssertionError("neither run exited")


def assert_refused(process: subprocess.Popen, holder_process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=120)
    message = " ".join(stderr.split())
    assert process.returncode == 2, message[-3000:]
    assert "is being written by another featurize run" in message and f"pid {holder_process.pid}," in message
    assert "featurize lease break" in message and "Traceback" not in message
    assert "started a private local Ray" not in message  # refused before Ray starts
    return message


def read_output(read, files: list[str]):
    return [pq.read_table(read(path)) for path in files]


@pytest.mark.ray
@pytest.mark.slow
def test_two_extracts_started_together_one_runs_the_other_exits_2(tmp_path, tiny_model):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=5, size=(20, 16))
    output = tmp_path / "features"
    config = write_config(tmp_path, tiny_model, str(output), slow=0.25)
    started = time.perf_counter()
    runs = [featurize_process(config) for _ in range(2)]
    loser = first_to_exit(runs)
    refused_after = time.perf_counter() - started
    winner = next(run for run in runs if run is not loser)
    assert_refused(loser, winner)
    assert refused_after < 20  # seconds: no Ray, no model (1-2 s here, most of it Python's imports)
    assert winner.poll() is None, "the refused run must not have stopped the other"

    third = featurize_process(config)  # while the first is still going
    assert_refused(third, winner)
    _, stderr = winner.communicate(timeout=300)
    assert winner.returncode == 0, stderr[-3000:]

    success = json.loads((output / "_SUCCESS").read_text())
    assert sorted(os.listdir(output / "data")) == sorted(Path(path).name for path in success["files"])
    uris = [uri for table in read_output(lambda path: str(output / path), success["files"])
            for uri in table.column("uri").to_pylist()]
    assert sorted(uris) == sorted(str(path) for path in paths)  # every image once
    assert success["shards"] == {"total": 5, "run": 5, "committed": 5}
    assert not (output / lease.LEASE_FILE).exists()

    assert main(["extract", "--config", str(config)]) == 0  # finished: a rerun does nothing (and starts no Ray)
    assert json.loads((output / "_SUCCESS").read_text())["shards"]["run"] == 0

    plant(str(output), {}, heartbeat_at=time.time(), expires_after=30.0)  # a run on another host, alive just now
    assert main(["extract", "--config", str(config)]) == 2
    plant(str(output), {}, heartbeat_at=time.time() - 31, expires_after=30.0)  # one silent for longer than that
    assert main(["extract", "--config", str(config)]) == 0
    assert json.loads((output / "_SUCCESS").read_text())["shards"]["run"] == 0
    print(f"\n[lease] the second of two runs started together exited 2 after {refused_after:.1f} s")


@pytest.mark.ray
@pytest.mark.slow
def test_a_sigkilled_driver_is_taken_over_at_once_and_a_broken_lease_stops_its_run(
        tmp_path, tiny_model, ray_local, caplog, capsys, monkeypatch):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=6, size=(20, 16))
    output = tmp_path / "features"
    config = write_config(tmp_path, tiny_model, str(output), slow=0.3)

    killed = featurize_process(config)
    wait_for_commits_beyond(0, output, killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    dead = holder(str(output), {})
    assert dead.pid == killed.pid  # the dead driver's lease is left behind
    assert main(["inspect", str(output)]) == 0
    assert f"(pid {killed.pid}) on this host is gone" in " ".join(capsys.readouterr().out.split())

    # The rerun (here, in this process) takes the dead driver's lease over at once, without waiting for its
    # expiry; then its lease is broken mid-run, and it stops without writing anything more.
    caplog.set_level(logging.WARNING, logger="featurize")
    before = committed_shards(output)
    codes = []
    rerun = threading.Thread(target=lambda: codes.append(main(["extract", "--config", str(config)])))
    rerun.start()
    deadline = time.time() + 240
    while committed_shards(output) == before and rerun.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert f"took over the lease of run {dead.run_id[:8]}" in caplog.text
    assert f"(pid {killed.pid}) on this host is gone" in caplog.text
    assert main(["lease", "break", str(output)]) == 0
    committed = committed_shards(output)
    rerun.join(timeout=120)
    message = " ".join(capsys.readouterr().err.split())
    assert codes == [2], message[-3000:]
    assert "no longer holds the output's lease: its lease was broken" in message and "Traceback" not in message
    assert committed_shards(output) == committed < 6 and not (output / "_SUCCESS").exists()  # nothing more written

    fast = write_config(tmp_path, tiny_model, str(output))  # the reader is not part of the fingerprint
    assert main(["extract", "--config", str(fast)]) == 0  # resumes: nothing lost, nothing twice
    success = json.loads((output / "_SUCCESS").read_text())
    assert success["shards"] == {"total": 6, "run": 6 - committed, "committed": 6}
    # Every listed file exists. Files the dead driver's actor (Ray's workers outlive a SIGKILLed driver for a
    # moment) wrote after a rerun took the lease are left alone: only older ones count as orphans then.
    on_disk = set(os.listdir(output / "data"))
    listed = {Path(path).name for path in success["files"]}
    assert listed <= on_disk and all(f"-{dead.run_id[:8]}-" in name for name in on_disk - listed)
    uris = [uri for table in read_output(lambda path: str(output / path), success["files"])
            for uri in table.column("uri").to_pylist()]
    assert sorted(uris) == sorted(str(path) for path in paths)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.s3
def test_two_extracts_started_together_on_s3(tmp_path, tiny_model, s3, bucket, moto_endpoint):
    paths = write_labelled_images(tmp_path / "images", num_classes=2, per_class=4, size=(20, 16))
    options = {"client_kwargs": {"endpoint_url": moto_endpoint}}
    config = write_config(tmp_path, tiny_model, f"s3://{bucket}/features", slow=0.25, storage_options=options)
    started = time.perf_counter()
    runs = [featurize_process(config) for _ in range(2)]
    loser = first_to_exit(runs)
    assert time.perf_counter() - started < 20
    winner = next(run for run in runs if run is not loser)
    assert_refused(loser, winner)
    _, stderr = winner.communicate(timeout=300)
    assert winner.returncode == 0, stderr[-3000:]

    s3.invalidate_cache()
    success = json.loads(s3.cat_file(f"{bucket}/features/_SUCCESS"))
    assert sorted(s3.ls(f"{bucket}/features/data")) == sorted(f"{bucket}/features/{f}" for f in success["files"])
    uris = [uri for table in read_output(lambda path: s3.open(f"{bucket}/features/{path}"), success["files"])
            for uri in table.column("uri").to_pylist()]
    assert sorted(uris) == sorted(str(path) for path in paths)
    assert not s3.exists(f"{bucket}/features/{lease.LEASE_FILE}")
