"""Issue 6's GPU checks: the Transformer Engine spec against the local spec, FP8 against bf16,
the fused cross-entropy inside bf16 training.

Run on a machine with a CUDA GPU (the TE and FP8 tests also need Transformer Engine: the NGC
container of docker/; scripts/gpu/device_checks.sh runs them with the benchmarks):

    python -m pytest -q -s tests/gpu     # scripts/run_tests.sh adds it when CUDA is present

**These tests have not run yet**: no GPU machine has been lent to this project so far. The
comparison code they use (tests/compare.py) and the engagement checks (tests/gpu/engagement.py:
spies, TE census, FP8 evidence, the training worker) are exercised on CPU by the unit tier
(tests/unit/test_gpu_features.py, with fake TE modules and a CPU training run).

A comparison alone passes when the feature under test never ran (the same code on both sides
agrees perfectly), so every test first checks the feature's trace (tests/gpu/engagement.py):

* TE spec vs local spec, same weights, bf16. Engagement: the TE build's layers are TE modules
  (every layer's linear_qkv, linear_proj, linear_fc1, linear_fc2 and core_attention has a
  `transformer_engine` class in its MRO), the local builds contain no TE module. Criterion: both
  are compared to the local spec in fp32; the TE layers compute the same functions (GEMMs with
  other tilings, fused attention with an online softmax), so their bf16 error must be of the same
  size as the local spec's: at most twice it (or 1e-2 of the logits' scale), and below 3e-2 in
  any case. A wrong weight layout (a transposed or mis-split QKV, a dropped bias) gives errors of
  order 1.
* Fused cross-entropy (`native`: megatron-core's kernel; `te`: Transformer Engine's) vs unfused,
  bf16 training, same seed. Engagement: spies count the calls of the function that
  `diffusion/losses.py: cross_entropy` dispatches to, in the training process: the fused run
  calls its kernel as often as the unfused run calls the plain one (> 0: every cross-entropy of
  both ProSeCo losses) and the plain one never; the unfused run never calls a fused one. For
  `te`, TE's own `parallel_cross_entropy` is reached as often. Criterion: the kernels differ
  only in the rounding of the logit gradients to bf16, so the loss gap stays below 0.5% over the
  last 10 of 60 iterations.
* FP8 vs bf16 training, same seed, data and noise, recipes `delayed` and `tensorwise`.
  Engagement: every TE linear of the layers ran each of its training forwards with FP8 on (TE's
  per-module `fp8` flag, counted by forward hooks) and recorded the requested recipe in
  `fp8_meta["recipe"]`; delayed scaling has non-zero amax histories (`fp8_meta["scaling_fwd"]`
  and `["scaling_bwd"]`: FP8 casts in the forward and the backward), current scaling builds
  `Float8CurrentScalingQuantizer`s; after training, the same weights and input give logits with
  FP8 that differ from those without by a small non-zero amount (more than ten times the
  forward's run-to-run difference, below 0.2 of the logits' scale); the bf16 run's linears ran no
  FP8 forward. Criterion: the mean relative gap of the logged loss over the last 10 of 60
  iterations is non-zero and at most 3% for both recipes (FP8 GEMMs with hybrid e4m3/e5m2 scaling
  typically stay within about 1% of bf16 this early), and FP8 learns (its loss falls by at least
  a third of what bf16's falls).

The training runs go through tests/distributed/launch.py (one fresh process each, as the Trainer
starts torch.distributed and megatron's groups itself); the worker
`tests.gpu.engagement:train_and_probe` writes its evidence as JSON next to the run directory
(copied with the run's metrics to $PROSEC_GPU_EVIDENCE_DIR when set).
"""
import importlib.util
import json
import os
import shutil

import pytest
import torch

import tests.compare as compare
from tests.cli import read_metrics
from tests.compare import forward_and_grads, loss_gap, relative_error
from tests.distributed.launch import run_distributed
from tests.gpu import engagement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs Transformer Engine (the NGC container of docker/)")

SHAPE = dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024, max_sequence_length=256)
VOCAB = 1000
WORKER = "tests.gpu.engagement:train_and_probe"


@pytest.fixture(scope="module")
def cuda_world():
    from prosec_mcore.runtime import destroy_distributed, initialize_distributed

    initialize_distributed(tp=1, pp=1, seed=1234)
    yield
    destroy_distributed()


@needs_te
@pytest.mark.parametrize("style", ["dit", "llama"])
def test_te_spec_logits_match_local_spec_in_bf16(cuda_world, style, monkeypatch):
    """forward_and_grads also asserts that the TE layers' parameters carry the local spec's names."""
    built = []  # the three models forward_and_grads builds: local fp32, local bf16, te bf16
    real_build = compare.build_model
    monkeypatch.setattr(compare, "build_model", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    shape = {**SHAPE, "style": style}
    state, reference, ref_grads = forward_and_grads(shape, VOCAB, "local", precision="fp32", seq=128)
    _, local, local_grads = forward_and_grads(shape, VOCAB, "local", state, precision="bf16", seq=128)
    _, te, te_grads = forward_and_grads(shape, VOCAB, "te", state, precision="bf16", seq=128)

    assert len(built) == 3 and [m.backend for m in built] == ["local", "local", "te"]
    assert engagement.te_census(built[0]) == {} and engagement.te_census(built[1]) == {}, \
        "the local spec must not contain Transformer Engine modules"
    census = engagement.assert_te_layers(built[2], num_layers=SHAPE["num_layers"])
    local_err, te_err = relative_error(local, reference), relative_error(te, reference)
    print(f"{style}: {census}; logits relative error vs fp32: local bf16 {local_err:.2e}, te bf16 {te_err:.2e}")
    assert te_err <= max(2 * local_err, 1e-2) and te_err < 3e-2
    for name in ref_grads:
        g_local, g_te = relative_error(local_grads[name], ref_grads[name]), relative_error(te_grads[name], ref_grads[name])
        assert g_te <= max(2 * g_local, 2e-2), f"{name}: te {g_te:.2e} vs local {g_local:.2e}"


def train(run_dir, corpus, extra):
    """60 bf16 iterations of the 4-layer tiny model in a fresh process; returns (output, evidence)."""
    overrides = corpus + [
        "model=tiny", "model.num_layers=4", "data.seq_length=128", "train.iters=60", "train.global_batch_size=16",
        "train.micro_batch_size=16", "train.lr=3e-3", "train.lr_warmup_iters=10", "train.eval_interval=0",
        "train.log_interval=10", "train.precision=bf16", f"run_dir={run_dir}", *extra]
    evidence_path = run_dir.parent / f"{run_dir.name}.evidence.json"
    output = run_distributed(WORKER, nproc=None, args=[json.dumps(overrides), str(evidence_path)], timeout=600)
    keep = os.environ.get("PROSEC_GPU_EVIDENCE_DIR")  # scripts/gpu/device_checks.sh: $OUT/gpu_tests
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(evidence_path, os.path.join(keep, evidence_path.name))
        if (run_dir / "metrics.jsonl").exists():
            shutil.copy(run_dir / "metrics.jsonl", os.path.join(keep, f"{run_dir.name}.metrics.jsonl"))
    return output, engagement.read_evidence(evidence_path)


@pytest.fixture(scope="module")
def bf16_run(shakespeare_corpus, tmp_path_factory):
    """The reference run (plain cross-entropy, no FP8), shared by the fused-CE and FP8 tests."""
    run_dir = tmp_path_factory.mktemp("gpu-runs") / "bf16"
    output, evidence = train(run_dir, shakespeare_corpus, [])
    return run_dir, evidence


@pytest.mark.parametrize("impl", ["native", pytest.param("te", marks=needs_te)])
def test_fused_cross_entropy_runs_and_tracks_the_unfused_run(bf16_run, shakespeare_corpus, tmp_path, impl):
    base_dir, base = bf16_run
    _, fused = train(tmp_path / impl, shakespeare_corpus,
                     ["train.cross_entropy_loss_fusion=true", f"train.cross_entropy_fusion_impl={impl}"])
    plain, calls = base["cross_entropy_calls"], fused["cross_entropy_calls"]
    print(f"cross-entropy calls: unfused run {plain}, fused ({impl}) run {calls}")
    assert impl in calls, f"no spy on the {impl} kernel: it is not importable in the training process ({calls})"
    assert plain["none"] > 0 and plain.get(impl, 0) == 0, f"the reference run is not the unfused one: {plain}"
    assert calls[impl] > 0, f"the fused {impl} kernel was never called during training: {calls}"
    assert calls[impl] == plain["none"] and calls["none"] == 0, \
        f"not every cross-entropy of the step went through the {impl} kernel: {calls} vs unfused {plain}"
    if impl == "te":
        assert calls.get("te_kernel") == calls["te"], f"TE's parallel_cross_entropy not reached every time: {calls}"
    gap = loss_gap(tmp_path / impl, base_dir, last=10)
    print(f"fused cross-entropy {impl}: mean relative loss gap to the unfused run over the last 10 iterations {gap:.5f}")
    assert gap < 0.005


@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_engages_and_tracks_the_bf16_run(bf16_run, shakespeare_corpus, tmp_path, recipe):
    base_dir, base = bf16_run
    assert base["backend"] == "te", f"the bf16 reference did not use the TE layers: {base['backend']}"
    base_linears = base["fp8"]["linears"]
    assert base_linears and all(s["forwards"] > 0 and s["fp8_forwards"] == 0 for s in base_linears.values()), \
        f"the bf16 reference ran FP8 forwards: {base_linears}"
    _, fp8 = train(tmp_path / recipe, shakespeare_corpus, ["train.fp8=hybrid", f"train.fp8_recipe={recipe}"])
    assert fp8["backend"] == "te" and fp8["te_layers"], fp8.get("te_layers_error")
    print(f"fp8 {recipe}: {engagement.check_fp8_evidence(fp8['fp8'], recipe)}; "
          f"{engagement.check_fp8_logit_effect(fp8['fp8_logit_effect'])}")

    bf16_metrics, fp8_metrics = read_metrics(base_dir), read_metrics(tmp_path / recipe)
    gap = loss_gap(tmp_path / recipe, base_dir, last=10)
    print(f"fp8 {recipe}: mean relative loss gap to bf16 over the last 10 iterations {gap:.4f}")
    assert gap > 0, "the FP8 run's losses equal the bf16 run's exactly: FP8 changed nothing"
    assert gap < 0.03
    drop_bf16 = bf16_metrics[0]["loss"] - bf16_metrics[-1]["loss"]
    assert fp8_metrics[0]["loss"] - fp8_metrics[-1]["loss"] > drop_bf16 / 3
