"""`python -m pipeline.reaper SESSION_DIR`: started by a driver that started a private Ray, with a pipe from the
driver on its stdin. While the driver lives it notes the driver's descendants (Ray's GCS, raylet, agents); when the driver is gone, however it ended (SIGKILL included), the pipe closes
and the reaper kills every one of them still alive, every process naming the Ray session's directory, and the
workers of the raylets it saw (detached from the tree and renamed by Ray, so found by their environment). Ray's
GCS and raylet die with the driver by themselves, but the raylet's agents and workers can linger. Linux (/proc);
no Ray import, so it starts in a blink."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys

POLL_SECONDS = 0.5


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process."""
    table = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            table[int(name)] = (int(fields[1]), fields[19])
    return table


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every descendant of `root` (the start time tells a reused pid apart)."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, frontier = {}, [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found[child] = table[child][1]
            frontier.append(child)
    return found


def processes_whose(part: str, marks: list[bytes]) -> list[int]:
    """Processes whose /proc/PID/`part` (cmdline, environ: NUL-separated) holds one of `marks`; never this one."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        if int(name) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/{part}", "rb") as handle:
            text = handle.read() + b"\0"
            if any(mark in text for mark in marks):
                found.append(int(name))
    return found


def session_processes(session_dir: str) -> list[int]:
    """Processes with the session directory in their command line."""
    return processes_whose("cmdline", [f"{session_dir}/".encode(), f"{session_dir}\0".encode()])


def workers_of(raylets: set[int]) -> list[int]:
    """Processes a raylet of `raylets` started: Ray detaches its workers and agents from the raylet's process tree
    (and renames them), but each carries its raylet's pid in RAY_RAYLET_PID."""
    return processes_whose("environ", [f"RAY_RAYLET_PID={pid}\0".encode() for pid in raylets])


def is_raylet(pid: int) -> bool:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as handle:
        return handle.read().strip() == "raylet"
    return False


def kill(pids) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def main() -> None:
    session_dir = sys.argv[1].rstrip("/")
    driver = os.getppid()
    seen: dict[int, str] = {}
    raylets: set[int] = set()

    def note() -> None:
        new = {pid: started for pid, started in descendants(driver).items() if pid not in seen}
        raylets.update(pid for pid in new if is_raylet(pid))
        seen.update(new)

    note()
    print("watching", flush=True)  # the driver waits for this line: Ray's processes are noted from now on
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], POLL_SECONDS)
        if readable and not os.read(sys.stdin.fileno(), 1024):
            break  # end of file: the driver has exited or was killed
        note()
    seen.pop(os.getpid(), None)
    table = process_table()
    kill(pid for pid, started in seen.items() if pid in table and table[pid][1] == started)
    for _ in range(3):  # a dying raylet may still start a worker: a few rounds
        kill(session_processes(session_dir) + workers_of(raylets))


if __name__ == "__main__":
    main()
