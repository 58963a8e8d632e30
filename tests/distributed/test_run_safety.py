"""Runs that never lose work: each way a long run fails, reproduced through the real command line.

After every failure the test checks what the user sees (exit status, the one line on stderr), that
the healthy checkpoints are intact, and that running the same command again continues *bitwise*
like a run that was never interrupted (same losses, gradient norms and learning rates: the
checkpoint restores weights, Adam state, schedule and RNG; data and noise are functions of the
iteration). The reference is one uninterrupted 6-iteration run saving every 2 iterations.

Faults are real where the machine allows it (a full tmpfs, SIGKILL, two processes on one
directory) and injected where timing would make a test flaky (PROSEC_FAULT_INJECTION: a NaN loss
at iteration k, ENOSPC inside megatron's checkpoint writer processes).
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.cli import ROOT, ok, read_metrics, run_tool

KEYS = ("loss", "mdm_loss", "sc_loss", "grad_norm", "lr")


def settings(corpus, run_dir, iters=6, *extra):
    return corpus + ["model=tiny", "model.num_layers=2", "data.seq_length=32", "train.global_batch_size=4",
                     "train.micro_batch_size=2", "train.lr_warmup_iters=1", "train.eval_interval=0",
                     "train.log_interval=1", "logging.tensorboard=false", "checkpoint.save_interval=2",
                     "checkpoint.keep_last=3", f"train.iters={iters}", f"run_dir={run_dir}", *extra]


def pretrain(args, env=None, nproc=1, timeout=300):
    return run_tool("pretrain_prosec.py", args, nproc=nproc, env=env, timeout=timeout)


def error_line(result) -> str:
    """The run's one line of complaint: exactly one `error:` line on stderr, and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def rows_by_iteration(run_dir) -> dict:
    """The last logged row of each iteration (a rerun logs the iterations it redoes again)."""
    return {r["iteration"]: r for r in read_metrics(run_dir)}


def assert_continues_like(reference: dict, run_dir, iterations):
    got = rows_by_iteration(run_dir)
    for i in iterations:
        assert {k: got[i][k] for k in KEYS} == {k: reference[i][k] for k in KEYS}, i  # bitwise


def checkpoints(run_dir) -> list:
    ckdir = os.path.join(run_dir, "checkpoints")
    return sorted(d for d in os.listdir(ckdir) if d.startswith("iter_")) if os.path.isdir(ckdir) else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare_corpus):
    run_dir = tmp_path_factory.mktemp("reference")
    ok(pretrain(settings(shakespeare_corpus, run_dir)))
    assert checkpoints(run_dir) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    return run_dir, rows_by_iteration(run_dir)


def copy_run(reference_dir, target):
    """A run directory holding the reference's checkpoints 2, 4 and 6 (and no lock holder)."""
    shutil.copytree(reference_dir, target, ignore=shutil.ignore_patterns("metrics.jsonl"))
    return target


# ---------------------------------------------------------------------------- non-finite training
def test_nan_loss_stops_the_run_and_keeps_the_healthy_checkpoints(reference, tmp_path, shakespeare_corpus):
    _, ref = reference
    args = settings(shakespeare_corpus, tmp_path)
    failed = pretrain(args, env={"PROSEC_FAULT_INJECTION": "nonfinite:5"})
    assert failed.returncode == 3
    line = error_line(failed)
    assert line.startswith("error: iteration 5: the loss is nan and the gradient norm is nan: the update was not "
                           "applied") and str(tmp_path / "checkpoints" / "iter_0000004") in line
    assert checkpoints(tmp_path) == ["iter_0000002", "iter_0000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_0000004"
    assert rows_by_iteration(tmp_path)[5]["update"] == "stopped"
    resumed = ok(pretrain(args))  # the same command again, without the fault
    assert "resumed from" in resumed.stdout and "iter_0000004 at iteration 4" in resumed.stdout
    assert_continues_like(ref, tmp_path, range(1, 7))


def test_skip_policy_skips_the_update_and_counts_it(tmp_path, shakespeare_corpus):
    args = settings(shakespeare_corpus, tmp_path, 4, "health.nonfinite=skip")
    result = ok(pretrain(args, env={"PROSEC_FAULT_INJECTION": "nonfinite:3"}))
    assert "health: iteration 3: the loss is nan and the gradient norm is nan -> update skipped" in result.stdout
    rows = rows_by_iteration(tmp_path)
    assert [rows[i]["update"] for i in (1, 2, 3, 4)] == ["applied", "applied", "skipped", "applied"]
    assert rows[4]["lr"] == rows[3]["lr"]  # the schedule does not advance on a skipped update
    # The count is part of the checkpoint: with a budget of 1, a second NaN after a resume stops.
    more = pretrain(settings(shakespeare_corpus, tmp_path, 6, "health.nonfinite=skip", "health.max_skipped=1"),
                    env={"PROSEC_FAULT_INJECTION": "nonfinite:6"})
    assert more.returncode == 3 and "health.max_skipped=1 updates already skipped" in error_line(more)


# ---------------------------------------------------------------------------- where a run starts
def test_requeue_of_a_run_started_from_pretrained_weights_resumes_its_own_checkpoints(
        reference, tmp_path, shakespeare_corpus):
    pretrained = os.path.join(reference[0], "checkpoints", "iter_0000002")
    args = settings(shakespeare_corpus, tmp_path / "job", 4, f"checkpoint.pretrained={pretrained}")
    first = ok(pretrain(args + ["train.exit_interval=2"]))  # a job that is pre-empted at iteration 2
    assert f"starting from the pretrained weights of {pretrained}" in first.stdout
    requeued = ok(pretrain(args))  # the requeue runs the same command
    assert "iter_0000002 at iteration 2 (the run's own latest checkpoint)" in requeued.stdout
    assert "checkpoint.pretrained=" in requeued.stdout and "is not used" in requeued.stdout
    assert checkpoints(tmp_path / "job") == ["iter_0000002", "iter_0000004"]
    uninterrupted = ok(pretrain(settings(shakespeare_corpus, tmp_path / "whole", 4,
                                         f"checkpoint.pretrained={pretrained}")))
    assert uninterrupted.returncode == 0
    assert_continues_like(rows_by_iteration(tmp_path / "whole"), tmp_path / "job", range(1, 5))


def test_load_of_an_older_checkpoint_never_overwrites_later_ones(reference, tmp_path, shakespeare_corpus):
    run_dir = copy_run(reference[0], tmp_path / "run")
    older = run_dir / "checkpoints" / "iter_0000002"
    result = pretrain(settings(shakespeare_corpus, run_dir, 6, f"checkpoint.load={older}"))
    assert result.returncode == 2
    assert "already holds complete checkpoints of later iterations (iter_0000004, iter_0000006)" in error_line(result)
    assert checkpoints(run_dir) == ["iter_0000002", "iter_0000004", "iter_0000006"]


# ---------------------------------------------------------------------------- corrupt checkpoints
def test_corrupt_latest_names_the_previous_checkpoint_and_the_override_works(reference, tmp_path, shakespeare_corpus):
    ref_dir, ref = reference
    run_dir = copy_run(ref_dir, tmp_path / "run")
    latest = run_dir / "checkpoints" / "iter_0000006"
    shard = sorted(latest.glob("*.distcp"))[0]
    shard.unlink()
    args = settings(shakespeare_corpus, run_dir, 6)
    refused = pretrain(args)
    assert refused.returncode == 2
    previous = run_dir / "checkpoints" / "iter_0000004"
    assert error_line(refused) == (f"error: checkpoint {latest} is corrupt: {shard.name} is missing; the previous "
                                   f"complete checkpoint is {previous}: resume from it with checkpoint.load={previous}"
                                   f" (or checkpoint.fallback_to_previous=true)")
    resumed = ok(pretrain(args + [f"checkpoint.load={previous}"]))  # the override the message gives
    assert "renamed it to iter_0000006.corrupt-" in resumed.stdout
    assert_continues_like(ref, run_dir, (5, 6))


def test_corrupt_latest_falls_back_when_asked(reference, tmp_path, shakespeare_corpus):
    ref_dir, ref = reference
    run_dir = copy_run(ref_dir, tmp_path / "run")
    metadata = run_dir / "checkpoints" / "iter_0000006" / "metadata.json"
    metadata.write_bytes(metadata.read_bytes()[:10])  # a truncated file
    resumed = ok(pretrain(settings(shakespeare_corpus, run_dir, 6, "checkpoint.fallback_to_previous=true")))
    assert "metadata.json has 10 bytes instead of" in resumed.stdout and "going on without it" in resumed.stdout
    assert "iter_0000004 at iteration 4" in resumed.stdout
    assert_continues_like(ref, run_dir, (5, 6))
    assert any(d.startswith("iter_0000006.corrupt-") for d in os.listdir(run_dir / "checkpoints"))


# ---------------------------------------------------------------------------- failed writes
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_injected_disk_full_removes_the_partial_checkpoint_and_the_rerun_continues(
        reference, tmp_path, shakespeare_corpus, mode):
    _, ref = reference
    args = settings(shakespeare_corpus, tmp_path, 6, f"checkpoint.async_save={mode == 'async'}")
    failed = pretrain(args, env={"PROSEC_FAULT_INJECTION": "write:4"})
    assert failed.returncode == 4
    assert error_line(failed).startswith(f"error: no space left on device writing {tmp_path}/checkpoints/iter_0000004")
    assert f"the latest checkpoint {tmp_path}/checkpoints/iter_0000002 is intact" in failed.stderr
    assert checkpoints(tmp_path) == ["iter_0000002"]
    ok(pretrain(args))
    assert_continues_like(ref, tmp_path, range(1, 7))


@pytest.fixture
def small_tmpfs(tmp_path, reference):
    """A file system where one checkpoint of the reference's model fits, but not two."""
    one = sum(f.stat().st_size for f in (reference[0] / "checkpoints" / "iter_0000002").iterdir())
    mount = tmp_path / "small_fs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(1.5 * one) // 1024}k", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()}); the injected ENOSPC tests cover "
                    f"the same path")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_real_full_disk_during_a_save(reference, tmp_path, shakespeare_corpus, small_tmpfs):
    _, ref = reference
    save_dir = small_tmpfs / "checkpoints"
    args = settings(shakespeare_corpus, tmp_path, 6, f"checkpoint.save_dir={save_dir}")
    failed = pretrain(args)
    assert failed.returncode == 4
    line = error_line(failed)
    assert line.startswith(f"error: no space left on device writing {save_dir}/iter_0000004") and \
        f"the latest checkpoint {save_dir}/iter_0000002 is intact" in line
    assert set(os.listdir(save_dir)) - {"run.lock"} == {"iter_0000002", "latest"}  # partial directory removed
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_tmpfs)], check=True)  # space freed
    ok(pretrain(args))
    assert_continues_like(ref, tmp_path, range(1, 7))


# ---------------------------------------------------------------------------- a rank killed during a save
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_during_a_save_leaves_no_process_behind(reference, tmp_path, shakespeare_corpus, mode):
    """kill -9 while megatron's writer processes write iteration 4 (each write made to take 30 s):
    every process of the job is gone at once, the lock is free, and the rerun continues from 2."""
    import psutil

    _, ref = reference
    run_dir = tmp_path / "run"
    args = settings(shakespeare_corpus, run_dir, 6, f"checkpoint.async_save={mode == 'async'}")
    job = Training(args, tmp_path, env={"PROSEC_FAULT_INJECTION": "slow_write:4"})
    deadline, writers = time.time() + 120, []
    while time.time() < deadline and len(writers) < 2:  # the shard writers of iteration 4 are at work
        if (run_dir / "checkpoints" / "iter_0000004").is_dir():
            writers = psutil.Process(job.proc.pid).children(recursive=True)
        time.sleep(0.1)
    assert len(writers) >= 2, "the save did not start its writer processes"
    job.proc.kill()
    job.wait(timeout=30)
    gone, alive = psutil.wait_procs(writers, timeout=5)
    assert not alive, f"left behind: {[' '.join(p.cmdline()) for p in alive]}"
    assert (run_dir / "checkpoints" / "latest").read_text() == "iter_0000002"
    ok(pretrain(args))  # the dead job's lock does not block, and the run continues
    assert_continues_like(ref, run_dir, range(1, 7))


# ---------------------------------------------------------------------------- schedule changes on resume
def test_changed_schedule_on_resume_is_refused_or_applied_as_asked(reference, tmp_path, shakespeare_corpus):
    ref_dir, ref = reference
    run_dir = copy_run(ref_dir, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / "iter_0000006")
    refused = pretrain(settings(shakespeare_corpus, run_dir, 6, "train.lr=5e-4", "train.min_lr=1e-5"))
    assert refused.returncode == 2
    assert "another LR schedule (train.lr 0.001 -> 0.0005, train.min_lr 0.0001 -> 1e-05)" in error_line(refused)
    applied = ok(pretrain(settings(shakespeare_corpus, run_dir, 6, "train.lr=5e-4", "train.min_lr=1e-5",
                                   "train.override_opt_param_scheduler=true")))
    assert "LR schedule from this run's settings" in applied.stdout
    rows = rows_by_iteration(run_dir)
    assert 1e-5 < rows[5]["lr"] < 5e-4 and rows[5]["lr"] != ref[5]["lr"]  # the new schedule at iteration 5


def test_extending_a_finished_run_follows_the_checkpoint_schedule(reference, tmp_path, shakespeare_corpus):
    ref_dir, ref = reference
    run_dir = copy_run(ref_dir, tmp_path / "run")
    extended = ok(pretrain(settings(shakespeare_corpus, run_dir, 8)))
    assert "train.iters extended from 6 to 8: following the checkpoint's LR schedule (cosine decay to " \
           "min_lr=0.0001 by iteration 6, then min_lr)" in extended.stdout
    rows = rows_by_iteration(run_dir)
    assert [r["iteration"] for r in read_metrics(run_dir)] == [7, 8]
    assert rows[7]["lr"] == rows[8]["lr"] == pytest.approx(1e-4)


# ---------------------------------------------------------------------------- one job per run directory
class Training:
    """tools/pretrain_prosec.py in the background, its output in files (a pipe could be held open by
    a checkpoint helper process and block reading)."""

    def __init__(self, args, log_dir, env=None):
        self.out_path, self.err_path = log_dir / "out.txt", log_dir / "err.txt"
        cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain_prosec.py"), *args]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                                         stdout=out, stderr=err, start_new_session=True)

    def wait(self, timeout):
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode, self.out_path.read_text(), self.err_path.read_text()


def wait_for_iterations(run_dir, count, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(run_dir / "metrics.jsonl") and len(read_metrics(run_dir)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach {count} iterations in {timeout} s")


def test_second_job_on_the_same_run_dir_is_refused_and_the_first_is_untouched(tmp_path, shakespeare_corpus):
    run_dir = tmp_path / "run"
    args = settings(shakespeare_corpus, run_dir, 100000)
    first = Training(args, tmp_path)
    wait_for_iterations(run_dir, 3)
    second = pretrain(args, timeout=120)
    assert second.returncode == 2
    assert f"{run_dir} is in use by another job (host " in error_line(second)
    assert f"pid {first.proc.pid}, started " in second.stderr
    sent = time.time()
    first.proc.send_signal(signal.SIGTERM)
    code, out, err = first.wait(timeout=120)
    exit_seconds = time.time() - sent
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "SIGTERM: saved iteration" in out
    stopped = read_metrics(run_dir)[-1]["iteration"]
    assert [r["iteration"] for r in read_metrics(run_dir)] == list(range(1, stopped + 1))  # one job's lines
    assert (run_dir / "checkpoints" / "latest").read_text() == f"iter_{stopped:07d}"
    print(f"SIGTERM to exit: {exit_seconds:.1f} s")
    assert exit_seconds < 30  # torchrun's grace before SIGKILL


def test_ctrl_c_saves_once_and_a_second_ctrl_c_exits_at_once(tmp_path, shakespeare_corpus):
    run_dir = tmp_path / "run"
    args = settings(shakespeare_corpus, run_dir, 100000)
    run = Training(args, tmp_path)
    wait_for_iterations(run_dir, 2)
    run.proc.send_signal(signal.SIGINT)
    code, out, err = run.wait(timeout=120)
    assert code == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "SIGINT: saving at the end of this iteration" in err and "SIGINT: saved iteration" in out
    stopped = read_metrics(run_dir)[-1]["iteration"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"iter_{stopped:07d}"

    # Resumed; Ctrl-C, and again while that save is being written (each write made to take 30 s).
    # No interval saves in this run: with slow writes, an interval save falling before iteration
    # stopped + 2 (when `stopped` is odd) would hold the run for minutes before the Ctrl-C is sent.
    no_interval = [a if not a.startswith("checkpoint.save_interval=") else "checkpoint.save_interval=0" for a in args]
    again = Training(no_interval, tmp_path, env={"PROSEC_FAULT_INJECTION": "slow_write:*"})
    wait_for_iterations(run_dir, stopped + 2)
    again.proc.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while time.time() < deadline and not [d for d in (run_dir / "checkpoints").glob("iter_*")
                                          if not (d / "COMPLETE").exists()]:  # the save has begun
        time.sleep(0.05)
    time.sleep(1.0)
    again.proc.send_signal(signal.SIGINT)
    code, out, err = again.wait(timeout=20)
    assert code == 130 and "Traceback" not in err, err[-3000:]
    assert "second SIGINT: exiting now without saving" in err
    assert (run_dir / "checkpoints" / "latest").read_text() == f"iter_{stopped:07d}"  # the unfinished save never counts
