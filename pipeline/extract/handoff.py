"""A piece's decoded batches, handed from the actor call that decodes them to the call that runs the model on them
(pipeline/extract/actor.py). No Ray.

An actor decodes in one call and runs the model in another, so that the next piece's decodes start as soon as this
piece's last image is decoded, while the model still works through this piece's last batches and its rows are
written: the cores never wait at a piece boundary. And when the actor dies, the piece whose decode call was running is
the one its images may have killed (pipeline/extract/driver.py).
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

END = object()  # after a piece's last batch


@dataclass(frozen=True)
class DecodeFailed:
    """The exception that stopped the decoding side: raised on the model's side, whose call reports it."""

    error: BaseException


class Handoff:
    """One piece's batches in order, at most `size` waiting. The decoding side ends them with END or with what
    stopped it; the model's side may abandon them (its call failed), and the decoding side then stops at its next
    batch instead of waiting for room forever."""

    def __init__(self, size: int = 1):
        self.queue: queue.Queue = queue.Queue(size)
        self.abandoned = threading.Event()
        self.timings = collections.Counter()  # the decoding side's seconds (fetch, decode), then the model side's

    def fill(self, make_batches: Callable[[collections.Counter], Iterable]) -> None:
        """The decoding side: every batch `make_batches(timings)` yields, then END. An exception is handed over, not
        raised: the model's side raises it, so the piece fails once, in the call the driver collects."""
        if self.abandoned.is_set():  # the model's side failed before this piece's decoding began
            return
        try:
            for batch in make_batches(self.timings):
                if not self.put(batch):
                    return
        except BaseException as error:
            self.put(DecodeFailed(error))
            if not isinstance(error, Exception):
                raise
            return
        self.put(END)

    def put(self, item) -> bool:
        """False once the model's side has abandoned the piece (after at most one more item goes in)."""
        if self.abandoned.is_set():
            return False
        self.queue.put(item)  # room is made by the model's side, or by abandon() draining the queue
        return not self.abandoned.is_set()

    def batches(self) -> Iterator:
        """The model's side: the batches in order, until END; what stopped the decoding side is raised here."""
        while True:
            item = self.queue.get()
            if item is END:
                return
            if isinstance(item, DecodeFailed):
                raise item.error
            yield item

    def abandon(self) -> None:
        """The model's side is done with the piece, whether or not it read every batch."""
        self.abandoned.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                return


class Handoffs:
    """The handoffs of the pieces an actor has in flight, by the piece's turn: made by whichever of a piece's two
    calls comes first, forgotten once the second has it."""

    def __init__(self, size: int = 1):
        self.size = size
        self.lock = threading.Lock()
        self.waiting: dict[int, Handoff] = {}

    def join(self, turn: int) -> Handoff:
        with self.lock:
            if turn in self.waiting:
                return self.waiting.pop(turn)
            handoff = self.waiting[turn] = Handoff(self.size)
            return handoff


class Turns:
    """Calls that run one at a time in the order of their numbers (0, 1, 2, ...), whatever order they arrive in: Ray
    keeps the order of an actor's calls only on an actor that runs one call at a time. A piece's decode waits for the
    decodes of the pieces before it, its process call for their process calls, so a decode never fills its handoff
    for a process call that waits behind one for a later piece."""

    def __init__(self):
        self.next = 0
        self.condition = threading.Condition()

    @contextlib.contextmanager
    def turn(self, number: int) -> Iterator[None]:
        with self.condition:
            self.condition.wait_for(lambda: self.next == number)
        try:
            yield
        finally:
            with self.condition:
                self.next += 1
                self.condition.notify_all()
