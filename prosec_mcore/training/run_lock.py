"""One job per run directory: an exclusive lock held for the life of the job.

Two jobs writing into one run directory (a requeue racing a job that has not ended yet, a second
launch with the same command) mix their checkpoint shards and their metrics. The first job to
start takes an exclusive `flock` on `<run_dir>/run.lock` (on global rank 0) and keeps it until it
exits; the lock file records who holds it (host, pid, start time, command), so a second job can
refuse with one line naming the holder. The kernel drops an flock when its process dies, however
it dies (kill -9 included), so a lock left by a dead job never blocks the next one: there is no
stale-lock heuristic to get wrong. On a shared file system the lock is as good as the file
system's flock support (NFSv4 and Lustre with `flock` mounts honour it across nodes).

Written with `fcntl.flock` from the standard library rather than a lock package, because the
holder description must be written into the locked file itself.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys

LOCK_NAME = "run.lock"


class RunDirLockedError(RuntimeError):
    """Another live job holds the run directory."""


class RunDirLock:
    """`acquire()` takes the lock or raises RunDirLockedError naming the holder; `release()` drops it."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = None

    def acquire(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLockedError(f"{self.directory} is in use by another job ({holder}); wait for it to end, "
                                    f"stop it, or give this job another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return f"host {info.get('host')}, pid {info.get('pid')}, started {info.get('started')}"
