"""`python -m pipeline.reaper SESSION_DIR`: started by a driver that started a private Ray, with a pipe from the
driver on its stdin. When the driver is gone, however it ended (SIGKILL included), the pipe closes and every process
still naming the Ray session's directory is killed: Ray's GCS and raylet die with the driver by themselves, but the
raylet's agents (dashboard, runtime env) and workers can linger for a while. No Ray import: it starts in a blink."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def session_processes(session_dir: str) -> list[int]:
    """Processes (Linux /proc) with the session directory in their command line; never this one."""
    marks = (f"{session_dir}/".encode(), f"{session_dir}\0".encode())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                command = handle.read() + b"\0"
            if any(mark in command for mark in marks):
                found.append(int(name))
    return found


def main() -> None:
    session_dir = sys.argv[1].rstrip("/")
    sys.stdin.buffer.read()  # returns at end of file: the driver has exited or was killed
    for _ in range(3):  # a dying raylet may still start a worker: a few rounds
        for pid in session_processes(session_dir):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
