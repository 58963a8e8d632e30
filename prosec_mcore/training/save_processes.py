"""The processes a checkpoint save starts end with the rank that started them, and start fast.

megatron-core 0.16.1's torch_dist save (strategies/filesystem_async.py) writes each rank's shards
from forked writer processes (two per save; an async save forks a caller that forks them), and
collects their results through a queue served by a `spawn`-context multiprocessing Manager (a
fresh interpreter per rank, kept for the life of the process). Measured here (megatron 0.16.1,
torch 2.13, CPU), that design has three costs:

* orphans: after `kill -9` of a rank during a save, its Manager (~0.3 GB: it imports torch to
  unpickle a write result), the resource tracker and a blocked writer lived on indefinitely
  (nothing ties them to the rank; the writer inherits the rank's SIGTERM handler, so only
  SIGKILL ended it);
* a slow first save: the Manager imports torch when the first result arrives, 2-3 s per rank,
  8-10 s for four ranks sharing two cores, most of a SIGTERM save-and-exit's time;
* a broken save on exit: torchrun's SIGTERM goes to each rank's whole process group, the Manager
  dies with it, and the save the SIGTERM asks for then fails (BrokenPipeError) if the process had
  saved before.

`guard_save_processes()` changes two things for the processes forked *during a save* (a flag
scopes them; other forks of the rank are untouched):

* the results travel through an anonymous temporary file that the forked writers inherit
  (`_FileResultQueue`, the queue interface megatron uses: put / get_nowait), so no Manager and
  no resource tracker exist;
* each such child asks the kernel to SIGKILL it when its parent dies (prctl PR_SET_PDEATHSIG;
  every fork of megatron's save path happens on the main thread, which is what PDEATHSIG tracks)
  and ignores SIGTERM/SIGUSR1, which are meant for the rank (torchrun signals the whole group):
  a writer finishes its write when the rank is asked to save and stop, and dies with the rank
  otherwise.

Written by hand because no library hooks megatron's writer processes; the megatron function
replaced (`_get_write_results_queue`) is checked to exist.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import queue
import signal
import tempfile

PR_SET_PDEATHSIG = 1
_state = {"installed": False, "saving": False}


class _FileResultQueue:
    """megatron's results queue (writer: put, rank: get_nowait) as an unlinked temporary file that
    forked writers inherit. One result per save: each put replaces the file's content."""

    def __init__(self):
        self._file = tempfile.TemporaryFile(prefix="prosec_write_results_")

    def put(self, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        fd = self._file.fileno()
        os.ftruncate(fd, 0)
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)

    def get_nowait(self):
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        if size == 0:
            raise queue.Empty
        obj = pickle.loads(os.pread(fd, size, 0))
        os.ftruncate(fd, 0)
        return obj

    def __reduce__(self):
        raise TypeError("the checkpoint results file is for forked writers only (not a spawned process)")


def _in_forked_child() -> None:
    if not _state["saving"]:
        return
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def guard_save_processes() -> None:
    """Install the results file and the fork hook (once per process; see the module docstring)."""
    if _state["installed"]:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_get_write_results_queue"):
        raise RuntimeError("megatron-core's filesystem_async has no _get_write_results_queue: "
                           "prosec_mcore/training/save_processes.py needs updating for this version")
    filesystem_async._get_write_results_queue = _FileResultQueue
    os.register_at_fork(after_in_child=_in_forked_child)
    _state["installed"] = True


@contextlib.contextmanager
def saving():
    """Mark the forks made inside this block as checkpoint writers."""
    guard_save_processes()
    _state["saving"] = True
    try:
        yield
    finally:
        _state["saving"] = False
