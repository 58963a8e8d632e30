"""Signals that end a run: save, then exit cleanly.

    SIGTERM   the scheduler wants the node back (SLURM at the time limit, torchrun shutting down)
    SIGUSR1   SLURM's pre-emption warning (`--signal=USR1@90`)
    SIGINT    Ctrl-C; torchrun forwards the SIGINT it receives to every rank

The first of any of them asks the training loop to save at the end of the current iteration and
exit with status 0 (the loop agrees with the other ranks first, so all stop at the same
iteration). Later SIGTERM/SIGUSR1 are ignored: the save is already under way. A second SIGINT
means "now": the process exits at once with status 130, without a traceback; the checkpoint being
written then never gets its COMPLETE marker, so the previous one stays `latest`.
"""
from __future__ import annotations

import os
import signal

HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class ExitSignals:
    def __init__(self, verbose: bool = True):
        self.verbose = verbose  # print the notes (rank 0 only, not once per rank)
        self.requested: str | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers, unless an exit was asked for: then the process is on its
        way out, and a further Ctrl-C must still mean "now", not a KeyboardInterrupt traceback."""
        if self.requested is not None:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            if signum == signal.SIGINT and self.verbose:
                _say(f"{name}: saving at the end of this iteration, then exiting (Ctrl-C again to exit at "
                     f"once, without saving)")
            return
        if signum == signal.SIGINT:
            if self.verbose:
                _say("second SIGINT: exiting now without saving; the previous checkpoint stays latest")
            os._exit(130)


def _say(message: str) -> None:
    """Write from a signal handler: os.write, not print, which may be in use by the interrupted code."""
    os.write(2, f"[prosec] {message}\n".encode())
