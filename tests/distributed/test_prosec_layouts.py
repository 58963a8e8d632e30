"""Every parallel layout trains exactly the model that a single process trains.

For the same seed, data and global batch, each layout runs 3 optimizer steps of the real
trainer (megatron-core schedules, DDP, optimizer, the two-pass ProSeCo step) on the bundled
corpus, for both objectives, and is compared with TP=1 PP=1: per-step losses (total, MDM and SC
terms), gradient norms, validation NELBO, and every updated weight.

Tolerance. All runs are float32 and draw identical noise and initial weights, so the only
differences are reduction order: the vocab-parallel softmax sums over shards, data parallelism
sums gradients in another order, sequence parallelism reduces norm gradients across ranks.
That is float32 round-off, ~1e-7 relative per operation, growing over a few layers and steps;
rtol 2e-5 on losses leaves a wide margin for it while any real error (a wrong mask on one
rank, a gradient reduced twice, a missing stage's contribution) shows up at 1e-3 or more.
Weights are compared relative to each tensor's largest entry with 1e-4: Adam normalises each
update, which amplifies round-off on entries whose gradient is itself near round-off.
"""
import json
import os

import pytest

from launch import run_distributed
from tests.cli import read_metrics

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prosec_worker.py") + ":train_and_record"
LOSS_RTOL = 2e-5
WEIGHT_RTOL = 1e-4

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
        "logging.tensorboard=false", f"run_dir={run_dir}",
    ]


@pytest.fixture(scope="module", params=["proseco", "mdlm"])
def reference(request, tmp_path_factory, shakespeare_corpus):
    out = tmp_path_factory.mktemp(f"ref_{request.param}")
    overrides = base_overrides(shakespeare_corpus, request.param, out / "run")
    run_distributed(WORKER, nproc=1, args=[json.dumps(overrides), str(out), "save"], timeout=300)
    return request.param, read_metrics(out / "run"), str(out / "weights.pt")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(reference, layout, tmp_path, shakespeare_corpus):
    objective, ref_metrics, ref_weights = reference
    nproc, extra = LAYOUTS[layout]
    overrides = base_overrides(shakespeare_corpus, objective, tmp_path / "run") + extra
    run_distributed(WORKER, nproc=nproc, args=[json.dumps(overrides), str(tmp_path), ref_weights], timeout=300)

    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == len(ref_metrics) == 3
    for got, want in zip(metrics, ref_metrics):
        for key in ("loss", "mdm_loss", "sc_loss", "grad_norm", "denoiser_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=LOSS_RTOL, abs=1e-7), (layout, got["iteration"], key)
    for key in ("valid_nelbo", "valid_corrector_nll"):
        assert metrics[-1][key] == pytest.approx(ref_metrics[-1][key], rel=LOSS_RTOL), (layout, key)
    if objective == "proseco":
        assert all(m["sc_loss"] > 0 for m in metrics)

    seen = {}
    for rank in range(nproc):
        with open(tmp_path / f"diff_rank{rank}.json") as f:
            seen.update({(rank, k): v for k, v in json.load(f).items()})
    worst = max(seen.items(), key=lambda kv: kv[1])
    assert worst[1] < WEIGHT_RTOL, f"{layout}: weight {worst[0]} differs by {worst[1]:.2e} (relative)"
    names = {name for _, name in seen}
    assert any(name.startswith("decoder.layers.7.") for name in names)  # every layer was compared
    assert "embedding.word_embeddings.weight" in names and "output_layer.weight" in names
