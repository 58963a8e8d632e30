"""Distributed checkpoints: exact resume, crash safety, SIGTERM, resharding, incompatible loads.

Every run goes through the real command line (`tools/pretrain_prosec.py`, torchrun for several
ranks) on the bundled corpus, and compares metrics.jsonl lines. "Exact" means bitwise: a resumed
run restores weights, Adam state, LR schedule and RNG, and redraws the same data and noise
(both pure functions of the iteration), so float32 CPU arithmetic repeats exactly.
Across layouts the comparison uses the layout-equivalence tolerance (rtol 2e-5, see
test_prosec_layouts.py): a resharded checkpoint is the same model, computed in another order.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.cli import ROOT, ok, read_metrics as metrics, run_tool

KEYS = ("loss", "mdm_loss", "sc_loss", "grad_norm", "lr")
# at the last iteration: computed with the EMA weights (an MDLM run validates without the corrector pass)
VALID_KEYS = ("valid_nelbo", "valid_corrector_nll")
# The runs that resume or reshard keep an EMA of the weights and validate with it once, at the end:
# an EMA lost, reset or mis-sharded on the way through a checkpoint changes the validation.
WITH_EMA = ["train.ema_decay=0.9", "train.eval_interval=4", "train.eval_iters=1"]


def run(args, nproc=1, env=None, timeout=400):
    return run_tool("pretrain_prosec.py", args, nproc=nproc, env=env, timeout=timeout)


def common(corpus, objective, run_dir, iters):
    return corpus + [f"objective={objective}", "data.seq_length=32", f"train.iters={iters}",
                     "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr_warmup_iters=1",
                     "train.eval_interval=0", "logging.tensorboard=false", f"run_dir={run_dir}"]


TP2_PP2 = ["--tp", "2", "--pp", "2"]


def continuous_run(tmp_path_factory, corpus, objective):
    """Reference: 4 uninterrupted iterations at TP=2 PP=2, saving at iteration 2."""
    run_dir = tmp_path_factory.mktemp(f"continuous_{objective}")
    ok(run(TP2_PP2 + common(corpus, objective, run_dir, 4) + WITH_EMA + ["checkpoint.save_interval=2"], nproc=4))
    return objective, run_dir, metrics(run_dir)


@pytest.fixture(scope="module")
def proseco_run(tmp_path_factory, shakespeare_corpus):
    return continuous_run(tmp_path_factory, shakespeare_corpus, "proseco")


@pytest.fixture(scope="module", params=["proseco", "mdlm"])
def continuous(request, tmp_path_factory, shakespeare_corpus, proseco_run):
    if request.param == "proseco":
        return proseco_run
    return continuous_run(tmp_path_factory, shakespeare_corpus, request.param)


def test_stop_and_resume_is_bitwise_identical_at_tp2_pp2(continuous, tmp_path, shakespeare_corpus):
    objective, _, reference = continuous
    args = TP2_PP2 + common(shakespeare_corpus, objective, tmp_path, 4) + WITH_EMA + ["train.exit_interval=2"]
    stopped = ok(run(args, nproc=4))
    assert "train.exit_interval=2: saved iteration 2 in" in stopped.stdout
    resumed = ok(run(args, nproc=4))  # the same command again
    assert "resumed from" in resumed.stdout and "iter_0000002 at iteration 2" in resumed.stdout
    rows = metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for got, want in zip(rows, reference):
        assert {k: got[k] for k in KEYS} == {k: want[k] for k in KEYS}  # bitwise, not approx
    assert {k: rows[-1].get(k) for k in VALID_KEYS} == {k: reference[-1].get(k) for k in VALID_KEYS}
    assert ("valid_corrector_nll" in rows[-1]) == (objective == "proseco")


@pytest.mark.parametrize("layout,nproc", [(["--tp", "1", "--pp", "1"], 1), (["--tp", "1", "--pp", "4"], 4),
                                          (["--tp", "4", "--pp", "1"], 4), (["--tp", "1", "--pp", "1"], 4)],
                         ids=["tp1pp1", "tp1pp4", "tp4pp1", "dp4"])
def test_checkpoint_reshards_to_other_layouts(proseco_run, tmp_path, shakespeare_corpus, layout, nproc):
    objective, ref_dir, reference = proseco_run
    ckpt = os.path.join(ref_dir, "checkpoints", "iter_0000002")
    result = ok(run(layout + common(shakespeare_corpus, objective, tmp_path, 4) + WITH_EMA + [f"checkpoint.load={ckpt}"],
                    nproc=nproc))
    assert "new parallel layout" in result.stdout
    rows = metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [3, 4]
    for got, want in zip(rows, reference[2:]):  # same weights (3) and same Adam state (4)
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=2e-5), (got["iteration"], key)
    for key in VALID_KEYS:  # the EMA resharded with the weights
        assert rows[-1][key] == pytest.approx(reference[-1][key], rel=2e-5), key


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, shakespeare_corpus):
    args = common(shakespeare_corpus, "proseco", tmp_path, 4) + ["checkpoint.save_interval=2"]
    crashed = run(args, env={"PROSEC_FAULT_INJECTION": "after_shards:4"})
    assert crashed.returncode != 0
    ckdir = tmp_path / "checkpoints"
    assert (ckdir / "latest").read_text() == "iter_0000002"
    assert (ckdir / "iter_0000004").is_dir() and not (ckdir / "iter_0000004" / "COMPLETE").exists()
    resumed = ok(run(args))
    assert "iter_0000002 at iteration 2" in resumed.stdout
    assert (ckdir / "iter_0000004" / "COMPLETE").exists() and (ckdir / "latest").read_text() == "iter_0000004"
    rows = metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 3, 4]  # 3-4 of the crashed run, then redone
    assert [r["loss"] for r in rows[2:4]] == [r["loss"] for r in rows[4:6]]


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, shakespeare_corpus):
    args = common(shakespeare_corpus, "proseco", tmp_path, 1000) + ["train.log_interval=1"]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain_prosec.py"), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved iteration" in out
    stopped_at = metrics(tmp_path)[-1]["iteration"]
    assert 1 <= stopped_at < 1000
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"iter_{stopped_at:07d}"
    # a shorter train.iters changes the LR schedule: keep the checkpoint's, as a requeue would
    resumed = ok(run(common(shakespeare_corpus, "proseco", tmp_path, stopped_at + 1)
                     + ["train.use_checkpoint_opt_param_scheduler=true"]))
    assert f"at iteration {stopped_at}" in resumed.stdout
    assert metrics(tmp_path)[-1]["iteration"] == stopped_at + 1


@pytest.mark.parametrize("override,message", [
    ("model.num_layers=4", "has model.num_layers=8 but this run has 4"),
    ("model.hidden_size=32", "has model.hidden_size=64 but this run has 32"),
    # settings that change what the weights compute without changing any tensor's shape
    ("model.rotary_base=500000", "has model.rotary_base=10000 but this run has 500000"),
    ("model.zero_timestep=true", "has model.zero_timestep=False but this run has True"),
    ("model.layernorm_epsilon=1e-6", "has model.layernorm_epsilon=1e-05 but this run has 1e-06"),
])
def test_incompatible_checkpoint_is_refused_naming_the_mismatch(proseco_run, tmp_path, shakespeare_corpus,
                                                                override, message):
    objective, ref_dir, _ = proseco_run
    ckpt = os.path.join(ref_dir, "checkpoints", "iter_0000002")
    result = run(common(shakespeare_corpus, objective, tmp_path, 4) + [f"checkpoint.load={ckpt}", override])
    assert result.returncode == 2
    assert message in result.stderr, result.stderr[-2000:]


def test_evaluation_uses_the_ema_weights_and_can_use_the_raw_ones(proseco_run, tmp_path):
    """tools/evaluate_prosec.py reproduces the run's last validation (EMA weights, resharded from
    TP2 PP2 to TP1: the layout tolerance); `--weights raw` evaluates the optimizer's weights."""
    _, ref_dir, reference = proseco_run
    ckpt = os.path.join(ref_dir, "checkpoints", "iter_0000004")
    results = {}
    for weights in ("ema", "raw"):
        out = tmp_path / f"{weights}.json"
        ok(run_tool("evaluate_prosec.py", ["nelbo", ckpt, "--weights", weights, "--out", str(out)]))
        results[weights] = json.loads(out.read_text())
        assert results[weights]["weights"] == weights
    assert results["ema"]["valid_nelbo"] == pytest.approx(reference[-1]["valid_nelbo"], rel=2e-5)
    # after 4 updates the EMA (decay 0.9 with warm-up) is 1e-3 (relative) from the raw weights' NELBO:
    # 50x the layout tolerance, so the raw evaluation is told apart
    assert results["raw"]["valid_nelbo"] != pytest.approx(reference[-1]["valid_nelbo"], rel=2e-4)
