"""The pieces that keep a run's work safe, each on its own (the whole run: tests/distributed/
test_run_safety.py): the health guard's decisions, the run-directory lock, checkpoint manifests and
pruning, the wording of a failed write, the LR schedule on resume, the exit signals."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from prosec_mcore.config import ConfigError, HealthConfig, TrainConfig
from prosec_mcore.training import checkpoint as ck
from prosec_mcore.training.health import APPLY, SKIP, STOP, HealthGuard
from prosec_mcore.training.optim import schedule_on_resume
from prosec_mcore.training.run_lock import RunDirLock, RunDirLockedError


# ------------------------------------------------------------------ health guard
def judge(guard, iteration, loss, norm=1.0):
    verdict = guard.judge(iteration, loss, norm)
    guard.record(iteration, verdict, loss)
    return verdict


@pytest.mark.parametrize("loss,norm", [(float("nan"), 1.0), (2.0, float("inf")), (float("-inf"), float("nan"))])
def test_nonfinite_loss_or_norm_stops_by_default(loss, norm):
    verdict = judge(HealthGuard(HealthConfig()), 7, loss, norm)
    assert verdict.action == STOP and verdict.reason.startswith("iteration 7:")


def test_skip_policy_skips_up_to_max_then_stops():
    guard = HealthGuard(HealthConfig(nonfinite="skip", max_skipped=2))
    assert [judge(guard, i, float("nan")).action for i in (1, 2, 3)] == [SKIP, SKIP, STOP]
    assert guard.skipped == 2 and "health.max_skipped=2" in guard.judge(4, float("nan"), 1.0).reason
    restored = HealthGuard(HealthConfig(nonfinite="skip", max_skipped=2))
    restored.load_state_dict(guard.state_dict())  # the count survives a resume
    assert restored.judge(5, float("nan"), 1.0).action == STOP


def test_spike_detection_warns_or_skips_above_factor_times_running_mean():
    for action, expected in (("warn", APPLY), ("skip", SKIP)):
        guard = HealthGuard(HealthConfig(spike_factor=3.0, spike_window=4, spike_action=action))
        for i in range(4):
            assert judge(guard, i, 1.0).action == APPLY and not guard.judge(i, 1.0, 1.0).reason
        assert judge(guard, 5, 2.9).action == APPLY  # below 3 x mean 1.0
        spike = judge(guard, 6, 10.0)
        assert spike.action == expected and "loss spike" in spike.reason
        assert not guard.healthy_at(6) and guard.healthy_at(6 + 4)


def test_spike_detection_is_off_by_default():
    guard = HealthGuard(HealthConfig())
    for i in range(200):
        judge(guard, i, 1.0)
    assert judge(guard, 201, 1e9).action == APPLY


# ------------------------------------------------------------------ run-directory lock
def test_second_lock_names_the_holder_and_a_dead_holder_never_blocks(tmp_path):
    first = RunDirLock(str(tmp_path))
    first.acquire()
    with pytest.raises(RunDirLockedError) as err:
        RunDirLock(str(tmp_path)).acquire()  # another open file description: flock refuses it
    assert f"pid {os.getpid()}" in str(err.value) and "\n" not in str(err.value)
    first.release()
    RunDirLock(str(tmp_path)).acquire()  # released: free again
    # A holder killed with SIGKILL leaves the file behind but not the lock.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from prosec_mcore.training.run_lock import RunDirLock; "
        f"RunDirLock({str(tmp_path / 'b')!r}).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirLockedError, match=f"pid {holder.pid}"):
        RunDirLock(str(tmp_path / "b")).acquire()
    holder.kill()
    holder.wait()
    RunDirLock(str(tmp_path / "b")).acquire()


# ------------------------------------------------------------------ manifests, pruning, write failures
def fake_checkpoint(save_dir, iteration, healthy=True, files=None):
    path = save_dir / ck.checkpoint_name(iteration)
    path.mkdir(parents=True)
    for name, size in (files or {"__0_0.distcp": 100, "common.pt": 10, "metadata.json": 5}).items():
        (path / name).write_bytes(b"x" * size)
    ck.mark_complete(str(save_dir), iteration, {"healthy": healthy})
    return path


def test_manifest_catches_a_missing_or_truncated_file_and_names_the_previous_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 2)
    latest = fake_checkpoint(tmp_path, 4)
    ck.verify_checkpoint(str(latest))
    assert json.loads((latest / ck.COMPLETE).read_text())["files"]["__0_0.distcp"] == 100
    (latest / "metadata.json").write_bytes(b"xx")
    with pytest.raises(ck.CheckpointCorruptError) as err:
        ck.verify_checkpoint(str(latest))
    message = str(err.value)
    assert "metadata.json has 2 bytes instead of 5" in message
    assert f"checkpoint.load={tmp_path / 'iter_0000002'}" in message and "\n" not in message
    (latest / "__0_0.distcp").unlink()
    with pytest.raises(ck.CheckpointCorruptError, match="__0_0.distcp is missing .and 1 more."):
        ck.verify_checkpoint(str(latest))


def test_find_latest_scans_rather_than_trusting_the_pointer(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    (tmp_path / ck.LATEST).write_text(ck.checkpoint_name(2))  # a crash between COMPLETE and `latest`
    (tmp_path / "iter_0000006").mkdir()  # a partial save
    assert ck.find_latest(str(tmp_path)) == str(tmp_path / "iter_0000004")


def test_pruning_keeps_the_newest_healthy_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2)
    for i in (3, 4, 5):
        fake_checkpoint(tmp_path, i, healthy=False)
    ck._prune(str(tmp_path), keep_last=2)
    assert [os.path.basename(p) for p in ck.complete_checkpoints(str(tmp_path))] == \
        ["iter_0000002", "iter_0000004", "iter_0000005"]


def test_write_failure_is_one_line_naming_the_intact_checkpoint(tmp_path, single_process_world):
    fake_checkpoint(tmp_path, 2)
    partial = tmp_path / "iter_0000004"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"x")
    # torch's zip writer reports a full disk without an errno
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3584 vs 3478")
    message = str(ck.write_failure(err, str(partial), str(tmp_path)))
    assert message.startswith(f"no space left on device writing {partial}")
    assert f"the latest checkpoint {tmp_path / 'iter_0000002'} is intact" in message and "\n" not in message
    assert not partial.exists()
    other = ck.write_failure(PermissionError(errno.EACCES, "Permission denied"), str(partial), str(tmp_path))
    assert str(other).startswith(f"could not write checkpoint {partial} (PermissionError:")


# ------------------------------------------------------------------ the LR schedule on resume
def saved(**changes):
    train = TrainConfig()
    return {k: getattr(train, k) for k in ("lr", "min_lr", "lr_warmup_iters", "lr_decay_style", "weight_decay",
                                           "iters", "global_batch_size", "seed")} | changes


def test_unchanged_schedule_resumes_silently():
    assert schedule_on_resume(saved(), TrainConfig(), "ck") == ("checkpoint", None)


def test_changed_lr_is_refused_unless_chosen():
    with pytest.raises(ConfigError) as err:
        schedule_on_resume(saved(lr=5e-4), TrainConfig(), "ck")
    assert "train.lr 0.0005 -> 0.001" in str(err.value) and "override_opt_param_scheduler" in str(err.value)
    mode, note = schedule_on_resume(saved(lr=5e-4), TrainConfig(override_opt_param_scheduler=True), "ck")
    assert mode == "config" and "train.lr 0.0005 -> 0.001" in note
    mode, note = schedule_on_resume(saved(lr=5e-4), TrainConfig(use_checkpoint_opt_param_scheduler=True), "ck")
    assert mode == "checkpoint" and "ignored" in note


def test_longer_run_follows_the_checkpoint_schedule_and_says_so():
    mode, note = schedule_on_resume(saved(iters=100), TrainConfig(iters=300), "ck")
    assert mode == "checkpoint" and "extended from 100 to 300" in note and "then min_lr" in note
    with pytest.raises(ConfigError):  # shorter is a schedule change like any other
        schedule_on_resume(saved(iters=300), TrainConfig(iters=100), "ck")


@pytest.mark.parametrize("key", ["global_batch_size", "seed"])
def test_data_position_settings_cannot_change_on_resume(key):
    with pytest.raises(ConfigError, match=f"train.{key}=.*checkpoint.pretrained=ck"):
        schedule_on_resume(saved(**{key: 3}), TrainConfig(), "ck")


# ------------------------------------------------------------------ exit signals
def test_first_signal_asks_to_save_second_sigint_exits_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when run in the background
    code = ("import os, signal, time; from prosec_mcore.training.exit_signals import ExitSignals; "
            "s = ExitSignals(); s.install(); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1); "
            "print('requested', s.requested, flush=True); os.kill(os.getpid(), signal.SIGINT); time.sleep(5); "
            "print('still alive', flush=True)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["requested SIGTERM"]
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert "second SIGINT: exiting now" in result.stderr
    assert signal.getsignal(signal.SIGINT) is before  # this process untouched
