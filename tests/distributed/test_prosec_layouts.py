"""Every parallel layout trains exactly the model that a single process trains.

For the same seed, data and global batch, each layout runs 3 optimizer steps of the real trainer
(megatron-core schedules, DDP, optimizer, the two-pass ProSeCo step) on the bundled corpus, for
both objectives, and is compared with TP=1 PP=1 on:

* the gradients of the first step, per parameter under its global name, *before* the optimizer
  applies them (Adam is invariant to a constant scale of a gradient: a gradient reduced twice, or
  a missing sum, is invisible in the updated weights but not here);
* the logged gradient norm of the first step against the float64 norm of the single-process
  gradients (each parameter counted once: the norm clipping uses must be the norm of the
  gradients applied, whatever the layout);
* per-step losses (total, MDM and SC terms), gradient norms, validation NELBO and corrector NLL;
* every weight after the last step, and its EMA (train.ema_decay=0.5: validation uses the EMA
  weights, and each rank averages exactly the shards it holds).

Starting point. Training starts from a *generic* point (tests/compare.py): every parameter, the
zero-initialised adaLN gates included, is perturbed by seeded noise under its global name, so
every block contributes to the output and receives gradient from the first step. (From the
adaLN-zero initialisation the blocks are silent, and layouts agreed bitwise for 12 iterations
whatever a block did.)

Tolerances, from measured float32 round-off (all runs are fp32 and draw identical noise and
weights; layouts differ only in reduction order: vocab-parallel softmax sums, DP gradient sums, SP
norm-gradient sums, the pipeline sum of the time-embedder copies). Measured over all 7 layouts and
both objectives (model=tiny, this file's settings):
* gradients, max |g - g_ref| / max |g_ref| per tensor: at most 7.1e-7 (TP: output layer, adaLN
  modulation); GRAD_RTOL = 1e-5. A gradient reduced twice is off by 1.0; one that misses the
  other ranks' share (SP norms without their all-reduce) by far more than 1e-3.
* the first step's gradient norm against the float64 norm of the reference gradients: at most
  1.7e-8 (before the CPU norm was fixed, 1e-5: torch.norm's float32 CPU kernel, see
  runtime/cpu_compat.py); GRAD_NORM_RTOL = 2e-7.
* per-step losses and gradient norms: at most 1.4e-7 relative; LOSS_RTOL = 2e-6.
* weights after 3 Adam steps, relative to each tensor's largest entry: at most 1.0e-4 (TP, MDLM,
  an MLP matrix). Adam moves an entry whose gradient is itself at round-off level by a full
  learning-rate step of either sign, so the weights carry that noise; WEIGHT_RTOL = 1e-3. This
  check only catches gross errors (a shard that skips or doubles its updates moves by ~3e-3 per
  step: lr 1e-3 against entries up to ~0.3); the gradient check above is the precise one.
"""
import json
import os

import pytest
import torch

from launch import run_distributed
from tests.cli import read_metrics

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prosec_worker.py") + ":train_and_record"
GRAD_RTOL = 1e-5
GRAD_NORM_RTOL = 2e-7
LOSS_RTOL = 2e-6
WEIGHT_RTOL = 1e-3

LAYOUTS = {  # name: (nproc, overrides)
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "dp2": (2, []),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp4": (4, ["parallel.pp=4"]),
    "pp2_vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),
}


def base_overrides(corpus, objective, run_dir):
    return corpus + [
        "model=tiny", f"objective={objective}", "data.seq_length=64", "train.iters=3",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr_warmup_iters=0",
        "train.eval_interval=3", "train.eval_iters=1", "train.log_interval=1",
        "checkpoint.save_at_end=false", "logging.tensorboard=false", f"run_dir={run_dir}",
        "train.ema_decay=0.5",
    ]


@pytest.fixture(scope="module", params=["proseco", "mdlm"])
def reference(request, tmp_path_factory, shakespeare_corpus):
    out = tmp_path_factory.mktemp(f"ref_{request.param}")
    overrides = base_overrides(shakespeare_corpus, request.param, out / "run")
    run_distributed(WORKER, nproc=1, args=[json.dumps(overrides), str(out), "save"], timeout=300)
    saved = torch.load(out / "reference.pt")
    return request.param, read_metrics(out / "run"), str(out / "reference.pt"), saved["grad_norm_f64"]


def test_reference_logs_the_float64_norm_of_its_gradients(reference):
    """One process: the logged (and clipping) gradient norm is the norm of the gradients applied."""
    _, metrics, _, norm_f64 = reference
    assert metrics[0]["grad_norm"] == pytest.approx(norm_f64, rel=GRAD_NORM_RTOL)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(reference, layout, tmp_path, shakespeare_corpus):
    objective, ref_metrics, ref_path, ref_norm = reference
    nproc, extra = LAYOUTS[layout]
    overrides = base_overrides(shakespeare_corpus, objective, tmp_path / "run") + extra
    run_distributed(WORKER, nproc=nproc, args=[json.dumps(overrides), str(tmp_path), ref_path], timeout=300)

    diffs = {"grads": {}, "weights": {}, "ema": {}}
    for rank in range(nproc):
        with open(tmp_path / f"diff_rank{rank}.json") as f:
            for kind, values in json.load(f).items():
                for name, value in values.items():
                    diffs[kind][name] = max(diffs[kind].get(name, 0.0), value)
    reference_names = set(torch.load(ref_path)["grads"])
    for kind in ("grads", "weights", "ema"):
        assert set(diffs[kind]) == reference_names, f"{layout}: {kind} of some parameters were not compared"
    name, worst = max(diffs["grads"].items(), key=lambda kv: kv[1])
    assert worst < GRAD_RTOL, f"{layout}: gradient of {name} differs by {worst:.2e} (relative) before the optimizer"

    for kind in ("weights", "ema"):
        name, worst = max(diffs[kind].items(), key=lambda kv: kv[1])
        assert worst < WEIGHT_RTOL, f"{layout}: {kind} of {name} differs by {worst:.2e} (relative)"

    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == len(ref_metrics) == 3
    assert metrics[0]["grad_norm"] == pytest.approx(ref_norm, rel=GRAD_NORM_RTOL), layout
    for got, want in zip(metrics, ref_metrics):
        for key in ("loss", "mdm_loss", "sc_loss", "grad_norm", "denoiser_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=LOSS_RTOL, abs=1e-7), (layout, got["iteration"], key)
    # an MDLM run validates without the corrector pass (evaluation/likelihood.py)
    for key in ("valid_nelbo", "valid_corrector_nll") if objective == "proseco" else ("valid_nelbo",):
        assert metrics[-1][key] == pytest.approx(ref_metrics[-1][key], rel=LOSS_RTOL), (layout, key)
    if objective == "proseco":
        assert all(m["sc_loss"] > 0 for m in metrics)

