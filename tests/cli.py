"""Run the project's command-line tools as a user would, for the e2e and distributed tiers.

    result = run_tool("pretrain_prosec.py", ["--tp", "2", "model=tiny"], nproc=4)   # torchrun
    ok(result).stdout

Output goes to files, not pipes: a process killed mid-save leaves dist_checkpointing's helper
process behind, which would hold a pipe open. The tool runs in its own session, and the whole
process group is killed once the main process has exited (or timed out).
"""
import json
import os
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(tool, args, nproc=1, env=None, timeout=400) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = launcher + [os.path.join(ROOT, "tools", tool), *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_metrics(run_dir) -> list:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
