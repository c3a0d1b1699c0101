"""SIGINT and SIGTERM during an extract run: the scheduling loop stops, actors are stopped, commits are kept."""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a run: actors are stopped, every commit is kept, the same command resumes."""

    def __init__(self, signal_number: int, message: str = ""):
        super().__init__(message)
        self.signal_number = signal_number
        self.message = message
        self.exit_code = 128 + signal_number  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


@dataclass
class ReceivedSignal:
    number: int = signal.SIGINT  # a KeyboardInterrupt with no signal recorded is Python's own SIGINT


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM (`ray job stop`, Kubernetes) raise Interrupted in the scheduling loop, whose clean-up
    stops the actors. Installed after Ray starts, which sets a SIGTERM handler of its own. Ray's blocking calls
    re-raise a handler's exception as a plain KeyboardInterrupt, so the signal's number is also recorded."""
    received = ReceivedSignal()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return

    def interrupt(signal_number, frame):
        received.number = signal_number
        raise Interrupted(signal_number)

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def interrupted_message(signal_number: int, num_shards: int, num_committed: int) -> str:
    return (f"interrupted by {signal.Signals(signal_number).name}: {num_committed} of {num_shards} shards "
            "are committed and kept; run the same command to resume")
