"""Run a function in fresh processes, under torchrun or as one plain process.

Distributed tests cannot run inside the pytest process: torch.distributed
and megatron keep global state, and a multi-rank job needs several
processes. ``run_distributed("path/to/file.py:function", nproc=2, args=[...])``
starts ``torchrun --standalone --nproc-per-node 2`` on *this* file, which
imports the target file and calls ``function(*args)`` on every rank (all
arguments are passed as strings). With ``nproc=None`` the same happens in a
single ``python`` process without torchrun, which exercises the
"not launched by torchrun" start-up path.

On a non-zero exit or a timeout the calling test fails with the command and
the tail of the combined output, so the failing rank's traceback is visible;
on a timeout the launcher and every rank it started are killed first.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_OUTPUT_TAIL_CHARS = 20_000


def _tail(output: str) -> str:
    return output[-_OUTPUT_TAIL_CHARS:]


def _kill_tree(pid: int) -> None:
    """Kill the launcher and every rank it started (torchrun puts ranks in their own groups)."""
    import psutil

    launcher = psutil.Process(pid)
    for process in [*launcher.children(recursive=True), launcher]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _command(target: str, nproc: int | None, args: list[str]) -> list[str]:
    script = [str(Path(__file__).resolve()), target, *args]
    if nproc is None:
        return [sys.executable, *script]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, "--nproc-per-node", str(nproc), *script]


def run_distributed(target: str, nproc: int | None, args=(), timeout: float = 120.0) -> str:
    """Run `target` ("file.py:function" or "package.module:function"); return its output."""
    import pytest  # imported here: the ranks load this file too and do not need it

    command = _command(target, nproc, [str(a) for a in args])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks share few cores; avoid oversubscription
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        output, _ = process.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(command)}\n{_tail(output)}")
    if process.returncode != 0:
        pytest.fail(f"exit code {process.returncode}: {' '.join(command)}\n{_tail(output)}")
    return output


def _load_function(target: str):
    location, _, function = target.rpartition(":")
    if location.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(location).stem, location)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    return getattr(module, function)


if __name__ == "__main__":
    _load_function(sys.argv[1])(*sys.argv[2:])
    # Tear the process groups down before the interpreter exits: a gloo group left to the exit-time
    # destructors can abort the process ("terminate called without an active exception", seen once
    # in ~40 launches) after the work has succeeded.
    from prosec_mcore.runtime import destroy_distributed

    destroy_distributed()
