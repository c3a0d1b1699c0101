"""One writer per output: a lease object (`OUTPUT/_LEASE`) that a run takes before planning and holds to the end.

Two runs on one output (a job submitted twice, a restarted pod whose old one still runs) would otherwise
delete each other's files as orphans and overwrite each other's commit records. So every stage that writes an
output (extract, predict, train) takes the lease first, with an atomic create-if-absent, and a second run that finds a
live lease stops at once with exit 2, naming the holder. The holder:
- refreshes `heartbeat_at` every `expires_after / 3` seconds from a daemon thread, by a compare-and-replace
  that succeeds only while the object is still the version it wrote last;
- checks that it still holds the lease (reads it back) before each commit record, before removing orphans and
  before `_SUCCESS` ("fencing"), and stops without writing (exit 2) once it does not;
- deletes it at the end, on failure and on interrupt too (again only if it is still its own).
Orphan data files are removed only under the lease, and only those no newer than the lease's creation on the
store's clock or named with the run's own tag (ledger.remove_orphans), so the workers of a run that lost its
lease, which may still be writing, never lose a file from under them.

Dead holders do not block: a lease whose process is gone on this machine (same host name, boot and pid
namespace) is taken over at once, so a rerun after a SIGKILLed driver resumes as before; one whose heartbeat is
older than its expiry (`FEATURIZE_LEASE_SECONDS`, default 30 s, recorded in the lease itself) is taken over from
anywhere. Hosts are expected to agree on the time to well within the expiry (NTP). A takeover is a
compare-and-replace of the exact version that was judged dead, so of two runs taking over one stale lease
exactly one wins, and the loser sees the winner's live lease. `featurize lease break OUTPUT` deletes a lease by
hand. How each store makes this atomic is conditional.CONDITIONAL_WRITES; other stores get a best-effort lease
(check, write, read back) and one warning: two runs started at the same instant may both start, and the
fencing check before the first commit stops the one that lost.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

from pipeline.errors import ConfigError
from pipeline.io import conditional, faults, redaction, storage

log = logging.getLogger("featurize")

LEASE_FILE = "_LEASE"
DEFAULT_SECONDS = 30.0  # expiry: a holder that has not refreshed for this long is presumed dead
SECONDS_VARIABLE = "FEATURIZE_LEASE_SECONDS"
MAX_TAKE_TRIES = 5  # rounds of create / read / take over while other runs change the lease under us
_warned_best_effort: set[str] = set()


class LeaseHeld(ConfigError):
    """Another live run holds the output's lease (exit 2: wait for it, or break the lease of a dead one)."""


class LeaseLost(ConfigError):
    """This run no longer holds the lease: it stops without writing anything more (exit 2)."""


@dataclass(frozen=True)
class Clock:
    """Where a lease reads the time and waits between heartbeats: the system's, or one a test moves by hand."""

    now: Callable[[], float] = time.time  # wall clock: heartbeats are judged by other hosts
    monotonic: Callable[[], float] = time.monotonic  # intervals within this process
    wait: Callable[[threading.Event, float], bool] = threading.Event.wait  # until the event is set, or seconds pass


SYSTEM_CLOCK = Clock()


def lease_seconds() -> float:
    value = os.environ.get(SECONDS_VARIABLE, "")
    try:
        seconds = float(value) if value else DEFAULT_SECONDS
    except ValueError:
        raise ConfigError(f"{SECONDS_VARIABLE}: got {value!r}; use a number of seconds (default "
                          f"{DEFAULT_SECONDS:g})") from None
    if seconds <= 0:
        raise ConfigError(f"{SECONDS_VARIABLE}: got {value!r}; use a positive number of seconds")
    return seconds


def machine_identity() -> str:
    """Host name, boot and pid namespace: where a pid means the same process as ours."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as handle:
            parts.append(handle.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return "|".join(parts)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process
    with contextlib.suppress(OSError, IndexError):  # killed but not yet reaped by its parent
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object holds (JSON)."""

    run_id: str
    stage: str  # extract | predict: who writes
    host: str
    pid: int
    machine: str  # machine_identity() of the holder
    started_at: float  # epoch seconds, the holder's clock
    heartbeat_at: float
    expires_after: float  # seconds without a heartbeat after which anyone may take the lease over

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """None for an object that is not a lease record (unreadable: anyone may take it over)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        started = datetime.datetime.fromtimestamp(self.started_at, datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC")
        return (f"run {self.run_id[:8]} ({self.stage}) on host {self.host}, pid {self.pid}, since {started} "
                f"({age(now - self.started_at)} ago), last heartbeat {age(now - self.heartbeat_at)} ago")


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def takeover_reason(record: LeaseRecord | None, now: float) -> str | None:
    """Why a lease found in place may be taken over, or None while its holder may be alive."""
    if record is None:
        return "it is unreadable"
    if record.machine == machine_identity() and record.pid != os.getpid() and not process_alive(record.pid):
        return f"its process (pid {record.pid}) on this host is gone"
    silent = now - record.heartbeat_at
    if silent > record.expires_after:
        return f"its last heartbeat was {age(silent)} ago, more than its expiry of {record.expires_after:g} s"
    return None


def lease_uri(output_uri: str) -> str:
    return storage.join(output_uri, LEASE_FILE)


def break_command(output_uri: str) -> str:
    return f"featurize lease break {redaction.redact(output_uri)}"


class Lease:
    """The lease of one output, held by this run from `acquire` to `release`."""

    def __init__(self, output_uri: str, storage_options: dict | None = None, stage: str = "extract",
                 seconds: float | None = None, key: str = "output.uri", clock: Clock = SYSTEM_CLOCK):
        self.clock = clock
        self.output = output_uri
        self.options = storage_options
        self.uri = lease_uri(output_uri)
        self.key = key  # the config key or option that named the output, for messages
        self.seconds = seconds or lease_seconds()
        self.record = LeaseRecord(run_id=uuid.uuid4().hex, stage=stage, host=socket.gethostname(), pid=os.getpid(),
                                  machine=machine_identity(), started_at=0.0, heartbeat_at=0.0,
                                  expires_after=self.seconds)
        self.token = None
        self.held = False
        self.lost: LeaseLost | None = None
        self.started_on_store: float | None = None  # the lease's own modification time: the run's start there
        self.last_refresh = 0.0  # clock.monotonic() of the last successful write
        self.lock = threading.RLock()  # heartbeat, checks and release take turns
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def tag(self) -> str:
        """A short id of this run, part of the names of the data files it writes (see ledger.remove_orphans)."""
        return self.record.run_id[:8]

    # --- taking it ------------------------------------------------------------------------------

    def acquire(self) -> Lease:
        """Take the lease, or raise LeaseHeld naming the live holder; a storage failure is a StorageError."""
        try:
            self.take()
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - a storage failure gets a clear message, the rest goes on up
            if not faults.is_storage_failure(error):
                raise
            raise faults.access_error(self.key, self.output, "write to", error) from None
        self.started_on_store = self.modified_on_store()
        self.thread = threading.Thread(target=self.beat, name=f"featurize-lease-{self.tag}", daemon=True)
        self.thread.start()
        return self

    def take(self) -> None:
        if conditional.conditional_writes(self.output) is None:
            warn_best_effort(self.output)
        for _ in range(MAX_TAKE_TRIES):
            now = self.clock.now()
            mine = replace(self.record, started_at=now, heartbeat_at=now)
            token = conditional.create_if_absent(self.uri, mine.to_bytes(), self.options)
            if token is not None:
                self.hold(mine, token)
                return
            found = conditional.read_with_token(self.uri, self.options)
            if found is None:
                continue  # released meanwhile: create again
            data, token = found
            holder = LeaseRecord.from_bytes(data)
            if holder is not None and holder.run_id == mine.run_id:  # our create went through, its answer was lost
                self.hold(holder, token)
                return
            reason = takeover_reason(holder, self.clock.now())
            if reason is None:
                raise LeaseHeld(self.held_message(holder))
            token = conditional.replace_if_match(self.uri, mine.to_bytes(), token, self.options)
            if token is not None:
                log.warning("%s: took over the lease of %s: %s", redaction.redact(self.output),
                            holder.describe() if holder else "an unknown run", reason)
                self.hold(mine, token)
                return
            # another run changed the lease between our read and our replace: look again
        raise LeaseHeld(f"{self.key}: {redaction.redact(self.output)} is contended: its lease changed hands "
                        f"{MAX_TAKE_TRIES} times while this run tried to take it; another run is starting on it. "
                        "Try again in a moment")

    def hold(self, record: LeaseRecord, token) -> None:
        self.record, self.token, self.held = record, token, True
        self.last_refresh = self.clock.monotonic()

    def modified_on_store(self) -> float | None:
        with contextlib.suppress(Exception):  # a store without times: orphans are then judged by name alone
            return storage.modified_time(self.uri, self.options)
        return None

    def held_message(self, holder: LeaseRecord) -> str:
        output = redaction.redact(self.output)
        return (f"{self.key}: {output} is being written by another featurize run: {holder.describe()}. Wait for it "
                f"to finish. If that run is dead, the next run takes its lease over once it is "
                f"{holder.expires_after:g} s past its last heartbeat (on host {holder.host}: as soon as its process "
                f"is gone), or break the lease now with: {break_command(self.output)}")

    # --- keeping it -----------------------------------------------------------------------------

    def beat(self) -> None:
        interval = self.seconds / 3
        while not self.clock.wait(self.stopping, interval):
            try:
                self.refresh()
            except LeaseLost:  # the run says so itself, at its next check
                return
            except Exception as error:  # noqa: BLE001 - a store hiccup: the next beat tries again
                log.warning("could not refresh the lease on %s: %s", redaction.redact(self.output),
                            faults.describe_error(error))

    def refresh(self) -> None:
        """Write a new heartbeat, only over the version this run wrote last."""
        with self.lock:
            if self.lost:
                raise self.lost
            if not self.held:
                return
            record = replace(self.record, heartbeat_at=self.clock.now())
            data = record.to_bytes()
            token = conditional.replace_if_match(self.uri, data, self.token, self.options)
            if token is None:
                found = conditional.read_with_token(self.uri, self.options)
                if found is None or found[0] != data:  # not ours: broken or taken over
                    self.lose(found)
                token = found[1]  # our write went through; its answer was lost
            self.record, self.token = record, token
            self.last_refresh = self.clock.monotonic()

    def check(self) -> None:
        """Fencing, before every write that publishes: raise LeaseLost unless this run still holds the lease.

        The check and the write after it are two requests. A run that passes it has refreshed its heartbeat within
        half the expiry (else it refreshes here first), so nobody can find it expired in between unless clocks
        disagree by that much; only a `featurize lease break` can land in that gap."""
        with self.lock:
            if self.lost:
                raise self.lost
            if self.clock.monotonic() - self.last_refresh > self.seconds / 2:  # heartbeats failing: refresh (and see)
                self.refresh()
                return
            found = conditional.read_with_token(self.uri, self.options)
            holder = LeaseRecord.from_bytes(found[0]) if found else None
            if holder is None or holder.run_id != self.record.run_id:
                self.lose(found)

    def raise_if_lost(self) -> None:
        """What the heartbeat has found out, without asking the store (for the scheduling loop)."""
        if self.lost:
            raise self.lost

    def lose(self, found: tuple[bytes, object] | None) -> None:
        holder = LeaseRecord.from_bytes(found[0]) if found else None
        if holder is None:
            now = "its lease was broken (the lease object is gone)" if found is None else "its lease was overwritten"
        else:
            now = f"the lease is now held by {holder.describe()}"
        self.held = False
        self.lost = LeaseLost(f"{self.key}: {redaction.redact(self.output)}: this {self.record.stage} run stopped "
                              f"without writing anything more, because it no longer holds the output's lease: {now}. "
                              "What it committed before is kept; once no other run is writing there, run the same "
                              "command to resume")
        raise self.lost

    # --- giving it back -------------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this run's; never raises."""
        self.stopping.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=60)
        with self.lock:
            if not self.held:
                return
            self.held = False
            try:
                conditional.delete_if_match(self.uri, self.token, self.options)
            except Exception as error:  # noqa: BLE001 - the lease expires by itself
                log.warning("could not release the lease on %s (it expires %g s after its last heartbeat): %s",
                            redaction.redact(self.output), self.seconds, faults.describe_error(error))


def warn_best_effort(output_uri: str) -> None:
    protocol = storage.protocol_of(output_uri)
    if protocol in _warned_best_effort:
        return
    _warned_best_effort.add(protocol)
    log.warning("%s:// has no conditional writes featurize can use, so the lease that keeps two runs off one "
                "output is best-effort there (check, write, read back): two runs started at the same instant "
                "may both start, and the check before the first commit stops the one that lost", protocol)


@contextlib.contextmanager
def held(output_uri: str, storage_options: dict | None = None, stage: str = "extract",
         key: str = "output.uri", clock: Clock = SYSTEM_CLOCK) -> Iterator[Lease]:
    """The output's lease for the duration of a `with` block (released on error and interrupt too)."""
    lease = Lease(output_uri, storage_options, stage, key=key, clock=clock).acquire()
    try:
        yield lease
    finally:
        lease.release()


def current(output_uri: str, storage_options: dict | None = None) -> LeaseRecord | None:
    """The lease on an output now (None when no run holds it), e.g. for `featurize inspect`."""
    found = conditional.read_with_token(lease_uri(output_uri), storage_options)
    return LeaseRecord.from_bytes(found[0]) if found else None


def state(output_uri: str, storage_options: dict | None = None) -> str | None:
    """One line about the output's lease for people: who writes there now, or a dead run's lease left behind."""
    record = current(output_uri, storage_options)
    if record is None:
        return None
    reason = takeover_reason(record, time.time())
    if reason is None:
        return f"being written now by {record.describe()}"
    return (f"a lease left by {record.describe()}, dead ({reason}): the next run takes it over, or "
            f"{break_command(output_uri)}")


def break_lease(output_uri: str, storage_options: dict | None = None) -> LeaseRecord | None:
    """Delete the output's lease whoever holds it (for a run known to be dead); the record it held, or None.
    A run still alive finds out at its next check and stops without writing."""
    found = conditional.read_with_token(lease_uri(output_uri), storage_options)
    if found is None:
        return None
    conditional.delete_if_match(lease_uri(output_uri), found[1], storage_options)
    return LeaseRecord.from_bytes(found[0]) or LeaseRecord("unknown", "unknown", "unknown", 0, "", 0.0, 0.0, 0.0)
