"""GPU-path settings that can be checked without a GPU: validation of FP8 / distributed optimizer
(and the refusal of CUDA graphs), their wiring into megatron-core's configs, activation
recomputation (which does run on CPU: same gradients, layers really re-run), the layer-backend
report, the trainer's exit file and its throughput metrics; and the engagement checks of the GPU
tests (tests/gpu/engagement.py: call spies, TE census, FP8 evidence, the training worker) on
fake Transformer Engine modules and a CPU training run."""
import dataclasses
import json
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from prosec_mcore.config import Config, ConfigError, validate_config
from prosec_mcore.model import layer_specs
from prosec_mcore.model.builder import build_model, transformer_config
from prosec_mcore.perf.report import StepAccounting, startup_lines
from prosec_mcore.runtime.init import init_weights_layout_independent
from prosec_mcore.training import optim
from prosec_mcore.training.step import loss_options
from tests.compare import set_generic_point
from tests.gpu import engagement


def load_config(overrides):
    """The typed Config with dotted overrides (OmegaConf's type checks, without Hydra's composition)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.from_dotlist(overrides)))


@pytest.mark.parametrize("overrides,cuda,te,message", [
    (["train.fp8=hybrid"], False, False, "train.fp8=hybrid needs a GPU with Transformer Engine"),
    (["train.fp8=e4m3"], True, False, "train.fp8=e4m3 needs Transformer Engine, which is not importable here"),
    (["train.fp8=hybrid", "train.precision=fp32"], True, True, "train.fp8 runs on bf16 parameters"),
    (["train.fp8=hybrid", "model.hidden_size=72", "model.num_attention_heads=4"], True, True,
     "FP8 GEMMs need dimensions divisible by 16, but model.hidden_size = 72"),
    (["train.fp8=fp4"], True, True, "train.fp8='fp4' is not one of null, e4m3, hybrid"),
    (["train.fp8_recipe=mxfp8"], True, True, "train.fp8_recipe='mxfp8' is not one of delayed, tensorwise"),
    (["train.recompute_granularity=full"], False, False, "needs train.recompute_method (uniform|block)"),
    (["train.recompute_granularity=full", "train.recompute_method=block", "train.recompute_num_layers=9"], False,
     False, "train.recompute_num_layers=9 must lie in [1, 8]"),
    (["train.recompute_method=uniform"], False, False, "apply only to train.recompute_granularity=full"),
    (["parallel.use_distributed_optimizer=true"], False, False, "use_distributed_optimizer=true needs a GPU"),
    (["parallel.overlap_grad_reduce=true"], False, False, "overlap_grad_reduce=true needs a GPU"),
    (["parallel.overlap_param_gather=true", "parallel.use_distributed_optimizer=false"], True, True,
     "overlap_param_gather=true needs the distributed optimizer"),
    (["logging.wandb_mode=sometimes"], False, False, "logging.wandb_mode='sometimes' is not one of offline"),
    (["train.cross_entropy_loss_fusion=true"], False, False, "train.cross_entropy_loss_fusion=true is for bf16 runs"),
    (["train.cross_entropy_loss_fusion=true", "train.precision=fp32"], True, True, "would silently round"),
    (["train.cross_entropy_loss_fusion=true", "train.cross_entropy_fusion_impl=te"], True, False,
     "train.cross_entropy_fusion_impl=te needs Transformer Engine"),
    (["train.cross_entropy_fusion_impl=apex"], True, True, "'apex' is not one of native, te"),
])
def test_gpu_settings_are_refused_with_one_line(overrides, cuda, te, message):
    with pytest.raises(ConfigError) as err:
        validate_config(load_config(overrides), world_size=1, cuda_available=cuda, te_available=te)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [
    ["train.fp8=hybrid", "train.fp8_recipe=tensorwise"], ["train.fp8=e4m3", "train.precision=bf16"],
    ["train.recompute_granularity=selective"],
    ["parallel.overlap_param_gather=true"],
    ["train.cross_entropy_loss_fusion=true"], ["train.cross_entropy_loss_fusion=true", "train.cross_entropy_fusion_impl=te"],
])
def test_gpu_settings_are_accepted_where_they_can_run(overrides):
    validate_config(load_config(overrides), world_size=1, cuda_available=True, te_available=True)


def test_settings_reach_megatron_transformer_config(single_process_world):
    cfg = load_config(["train.fp8=hybrid", "train.fp8_recipe=tensorwise", "train.fp8_margin=1",
                       "train.fp8_amax_history_len=16", "train.fp8_amax_compute_algo=most_recent",
                       "train.recompute_granularity=full", "train.recompute_method=block",
                       "train.recompute_num_layers=3",
                       "train.cross_entropy_loss_fusion=true", "train.cross_entropy_fusion_impl=te"])
    tc = transformer_config(cfg)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_margin, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (
        "hybrid", "tensorwise", 1, 16, "most_recent")
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "block", 3)
    assert tc.cuda_graph_impl == "none"  # refused (validate_config): capture would bypass adaLN
    assert (tc.cross_entropy_loss_fusion, tc.cross_entropy_fusion_impl) == (True, "te")
    assert loss_options(cfg).cross_entropy_fusion == "te"  # what the ProSeCo losses use
    assert loss_options(load_config([])).cross_entropy_fusion == "none"
    cfg = load_config(["train.recompute_granularity=full", "train.recompute_method=block", "train.recompute_num_layers=3"])
    tc = transformer_config(cfg)
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers, tc.fp8) == ("full", "block", 3, None)


def test_data_parallel_features_resolve_per_device(monkeypatch):
    from prosec_mcore.config import ParallelConfig

    assert optim.data_parallel_features(ParallelConfig()) == dict(
        use_distributed_optimizer=False, overlap_grad_reduce=False, overlap_param_gather=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert optim.data_parallel_features(ParallelConfig()) == dict(
        use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=False)
    assert optim.data_parallel_features(ParallelConfig(overlap_param_gather=True, overlap_grad_reduce=False)) == dict(
        use_distributed_optimizer=True, overlap_grad_reduce=False, overlap_param_gather=True)


def _grads_and_calls(style, time_conditioning, **train):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, style=style, time_conditioning=time_conditioning, num_layers=2)
    cfg.train = dataclasses.replace(cfg.train, **train)
    model = build_model(cfg, 300)
    # Both calls must start from the same weights: megatron's own init draws from the global RNG
    # (advanced by the first build), and the generic point perturbs the current values.
    init_weights_layout_independent([model], seed=1)
    set_generic_point(model)
    gen = torch.Generator().manual_seed(1)
    calls = {"layer": 0, "core_attention": 0}
    model.decoder.layers[0].register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
    model.decoder.layers[0].self_attention.core_attention.register_forward_hook(
        lambda *a: calls.__setitem__("core_attention", calls["core_attention"] + 1))
    model.train()
    x = torch.randint(0, 299, (2, 16), generator=gen)
    model(x, torch.rand(2, generator=gen)).float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, calls


@pytest.mark.parametrize("style,time_conditioning", [("dit", "adaln"), ("llama", "none")])
@pytest.mark.parametrize("recompute,reruns", [
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1), "layer"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1), "layer"),
    (dict(recompute_granularity="selective"), "core_attention"),
])
def test_activation_recomputation_gives_the_same_gradients(single_process_world, style, time_conditioning,
                                                           recompute, reruns):
    reference, plain_calls = _grads_and_calls(style, time_conditioning)
    grads, calls = _grads_and_calls(style, time_conditioning, **recompute)
    assert plain_calls == {"layer": 1, "core_attention": 1}
    assert calls[reruns] == 2  # the forward really ran again in the backward pass
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_backend_report_says_why(monkeypatch):
    backend, why = layer_specs.describe_backend()
    assert backend == layer_specs.select_backend() and why
    fake_te = types.ModuleType("transformer_engine")
    fake_te.__version__ = "9.9"
    monkeypatch.setitem(sys.modules, "transformer_engine", fake_te)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert layer_specs.describe_backend() == ("local", "no CUDA device (Transformer Engine runs on GPUs only)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert layer_specs.describe_backend() == ("te", "Transformer Engine 9.9 with CUDA")
    assert "TEDotProductAttention" in layer_specs.attention_kernels("te")


def test_startup_lines_name_precision_recipe_and_speed_features():
    cfg = load_config(["train.fp8=hybrid", "train.fp8_amax_history_len=16", "train.recompute_granularity=selective"])
    lines = startup_lines(cfg, "te", "Transformer Engine 2.9 with CUDA", "TE attention",
                          dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=False), True)
    text = "\n".join(lines)
    assert "layers: te (Transformer Engine 2.9 with CUDA)" in text
    assert "bf16 parameters, fp32 main weights" in text and "fp8=hybrid (delayed scaling, amax history 16" in text
    assert "distributed optimizer on, overlap grad reduce on, overlap param gather off, recompute selective" in text
    assert text.endswith("fused cross-entropy off")


def test_trainer_metrics_carry_tflops_and_memory():
    cfg = load_config(["objective.name=mdlm", "data.seq_length=128", "train.global_batch_size=16"])
    acc = StepAccounting.for_run(cfg, padded_vocab=4096, world_size=2)
    metrics = acc.metrics(step_seconds=0.5)
    assert metrics["tflops_per_gpu"] == pytest.approx(acc.step_flops / 0.5 / 2 / 1e12)
    assert acc.tokens_per_step == 16 * 128
    assert "mfu" not in metrics and metrics["rss_gib"] > 0  # CPU: no peak, memory as RSS
    proseco = StepAccounting.for_run(load_config(["objective.name=proseco"]), padded_vocab=4096, world_size=2)
    assert proseco.step_flops == 2 * acc.step_flops


def test_exit_file_stops_every_rank_at_the_same_iteration(single_process_world, tmp_path):
    """The stop decision (training/lifecycle.py, which the Trainer asks after every iteration)."""
    from prosec_mcore.training.lifecycle import RunLifecycle

    cfg = load_config([f"train.exit_file={tmp_path / 'STOP'}", f"run_dir={tmp_path / 'run'}"])
    run = RunLifecycle(cfg, torch.device("cpu"), is_logger=False)
    assert run.exit_reason(3) is None
    (tmp_path / "STOP").touch()
    assert run.exit_reason(4) == f"train.exit_file {tmp_path / 'STOP'} exists"
    run.signals.requested = "SIGTERM"
    assert run.exit_reason(5) == "SIGTERM"


def test_fp8_without_usable_te_layers_is_refused_at_build(single_process_world):
    """validate_config only sees that TE is installed; a TE that cannot load must still stop FP8."""
    cfg = load_config(["train.fp8=hybrid"])
    with pytest.raises(ConfigError, match="train.fp8=hybrid needs the Transformer Engine layers"):
        build_model(cfg, 300)


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_cuda_graphs_are_refused_because_capture_would_drop_adaln(impl):
    """megatron-core's capture replays TransformerLayer.forward, bypassing AdaLNTransformerLayer's
    modulation: the time conditioning would be dropped silently, so any value but none is refused."""
    with pytest.raises(ConfigError) as err:
        validate_config(load_config([f"train.cuda_graph_impl={impl}"]), world_size=1, cuda_available=True,
                        te_available=True)
    assert "adaLN" in str(err.value) and "\n" not in str(err.value)
    validate_config(load_config(["train.cuda_graph_impl=none"]), world_size=1, cuda_available=True, te_available=True)


# ---------------------------------------------------------------- engagement checks of tests/gpu

def _tiny_local_model(num_layers=2):
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_layers=num_layers)
    return build_model(cfg, 300, backend="local")


def test_call_spy_counts_the_kernels_the_loss_dispatch_calls(single_process_world, monkeypatch):
    """The spies sit where losses.cross_entropy looks the kernels up: one call of each path
    counts once, on that path only; restore() puts the original functions back."""
    import torch._dynamo

    from prosec_mcore.diffusion import losses

    monkeypatch.setattr(torch._dynamo.config, "disable", True)  # the native kernel eagerly (compile: 1 min)
    originals = {impl: getattr(__import__(m, fromlist=[n]), n) for impl, (m, n) in engagement.CROSS_ENTROPY_KERNELS.items()
                 if impl in ("none", "native")}
    plain_in_losses = losses.vocab_parallel_cross_entropy
    spies = engagement.cross_entropy_spies()
    try:
        assert set(spies) >= {"none", "native"}
        logits = torch.randn(2, 5, 64).to(torch.bfloat16)
        target = torch.randint(0, 64, (2, 5))
        fused = losses.cross_entropy(logits, target, "native")
        assert {k: s.calls for k, s in spies.items()} == {**{k: 0 for k in spies}, "native": 1}
        plain = losses.cross_entropy(logits, target, "none")
        assert {k: s.calls for k, s in spies.items()} == {**{k: 0 for k in spies}, "native": 1, "none": 1}
        torch.testing.assert_close(fused, plain)  # the wrapper passes arguments and result through
    finally:
        for spy in spies.values():
            spy.restore()
    assert losses.vocab_parallel_cross_entropy is plain_in_losses
    for impl, fn in originals.items():
        module, name = engagement.CROSS_ENTROPY_KERNELS[impl]
        assert getattr(__import__(module, fromlist=[name]), name) is fn


def test_call_spy_follows_copies_and_refuses_a_missing_function():
    source, user = types.ModuleType("fake_source"), types.ModuleType("fake_user")
    source.kernel = lambda x: x + 1
    user.kernel_alias = source.kernel  # `from fake_source import kernel as kernel_alias`
    spy = engagement.CallSpy(source, "kernel", also_in=[user])
    assert source.kernel(1) == 2 and user.kernel_alias(2) == 3 and spy.calls == 2
    spy.restore()
    assert source.kernel is spy.original and user.kernel_alias is spy.original
    source.absent = None  # megatron-core without TE: te_parallel_cross_entropy = None
    with pytest.raises(RuntimeError, match="no function to spy on"):
        engagement.CallSpy(source, "absent")


def _pretend_te(model, suffixes):
    """Give the named submodules of a real model a class that looks like Transformer Engine's."""
    for name, module in model.named_modules():
        if any(name.endswith("." + s) for s in suffixes):
            module.__class__ = engagement.fake_te_class(type(module).__name__, type(module))


def test_te_layer_check_needs_every_layer_submodule_from_transformer_engine(single_process_world):
    model = _tiny_local_model()
    assert engagement.te_census(model) == {}
    with pytest.raises(AssertionError, match="not Transformer Engine's"):
        engagement.assert_te_layers(model)
    _pretend_te(model, engagement.TE_LINEARS)  # the attention is still the local SDPA
    with pytest.raises(AssertionError, match="core_attention"):
        engagement.assert_te_layers(model)
    _pretend_te(model, engagement.TE_ATTENTION)
    assert engagement.assert_te_layers(model, num_layers=2).startswith("10 TE modules")
    assert len(engagement.te_census(model)) == 10
    with pytest.raises(AssertionError, match="counts off"):
        engagement.assert_te_layers(model, num_layers=3)


class DelayedScaling:  # the names and methods of TE 2.x's recipes
    @classmethod
    def delayed(cls):
        return True

    @classmethod
    def float8_current_scaling(cls):
        return False


class Float8CurrentScaling(DelayedScaling):
    @classmethod
    def delayed(cls):
        return False

    @classmethod
    def float8_current_scaling(cls):
        return True


class TEDelayedScaling:  # a recipe without the methods (TE 1.x): recognised by its name
    pass


class Float8CurrentScalingQuantizer:
    pass


def _fake_fp8_state(model, recipe, amax=0.0, fp8=True):
    """TE's per-module FP8 state on the layers' linears of a real (local) model."""
    for module in engagement._layer_submodules(model, engagement.TE_LINEARS).values():
        meta = {"recipe": recipe, "fp8_checkpoint": fp8}
        if isinstance(recipe, (DelayedScaling, TEDelayedScaling)) and not isinstance(recipe, Float8CurrentScaling):
            meta["scaling_fwd"] = types.SimpleNamespace(amax_history=torch.full((16, 3), amax), scale=torch.ones(3))
            meta["scaling_bwd"] = types.SimpleNamespace(amax_history=torch.full((16, 2), amax), scale=torch.ones(2))
            quantizers = {"scaling_fwd": [object()] * 3, "scaling_bwd": [object()] * 2}
        else:
            meta["scaling_fwd"] = types.SimpleNamespace()
            quantizers = {"scaling_fwd": [Float8CurrentScalingQuantizer() for _ in range(3)], "scaling_bwd": []}
        module.__dict__.update(fp8_meta=meta, fp8=fp8, quantizers=quantizers)


def _forward(model):
    model(torch.randint(0, 299, (2, 16)), torch.rand(2)).float().sum().backward()


def test_fp8_check_fails_unless_the_linears_show_fp8_activity(single_process_world):
    model = _tiny_local_model()
    with pytest.raises(AssertionError, match="no Transformer Engine linear with FP8 state"):
        engagement.assert_fp8_engaged(model, "delayed")

    _fake_fp8_state(model, DelayedScaling(), amax=0.0)  # FP8 state allocated, never used
    recorder = engagement.FP8Recorder([model])
    _forward(model)
    with pytest.raises(AssertionError, match="amax_history is all zero"):
        engagement.assert_fp8_engaged(model, "delayed", recorder)
    _fake_fp8_state(model, DelayedScaling(), amax=3.5)
    assert engagement.assert_fp8_engaged(model, "delayed", recorder) == \
        "8 TE linears ran FP8 (delayed), 8 FP8 forwards in all"
    with pytest.raises(AssertionError, match="fp8_meta\\['recipe'\\] is 'delayed', not 'tensorwise'"):
        engagement.assert_fp8_engaged(model, "tensorwise", recorder)
    _fake_fp8_state(model, TEDelayedScaling(), amax=3.5)
    assert engagement.assert_fp8_engaged(model, "delayed")

    _fake_fp8_state(model, DelayedScaling(), amax=3.5, fp8=False)  # the last forwards ran without FP8
    _forward(model)
    with pytest.raises(AssertionError, match="1 of 2 training forwards ran with FP8 on"):
        engagement.assert_fp8_engaged(model, "delayed", recorder)
    recorder.remove()
    _forward(model)
    assert all(c == {"forwards": 2, "fp8_forwards": 1} for c in recorder.counts.values())

    _fake_fp8_state(model, None)  # TE never initialised FP8 in these modules
    with pytest.raises(AssertionError, match="never initialised FP8"):
        engagement.assert_fp8_engaged(model, "delayed")

    _fake_fp8_state(model, Float8CurrentScaling())
    assert engagement.assert_fp8_engaged(model, "tensorwise").startswith("8 TE linears ran FP8 (tensorwise)")
    for module in engagement.fp8_linears(model).values():
        module.quantizers["scaling_fwd"] = [object()]
    with pytest.raises(AssertionError, match="expected Float8CurrentScalingQuantizer"):
        engagement.assert_fp8_engaged(model, "tensorwise")
    evidence = engagement.fp8_evidence(model)
    assert json.loads(json.dumps(evidence)) == evidence  # what the worker writes


def test_fp8_logit_effect_switches_fp8_off_and_back(single_process_world):
    """On CPU megatron-core has no FP8 context: train.fp8 set on the config changes nothing, which
    is exactly what the check must call a failure."""
    model = _tiny_local_model()
    model.config.fp8 = "hybrid"
    effect = engagement.fp8_logit_effect(model, vocab=300, seq=16)
    assert effect == {"fp8": "hybrid", "configured_vs_off": 0.0, "off_repeat": 0.0}
    assert model.config.fp8 == "hybrid" and model.training
    with pytest.raises(AssertionError, match="FP8 did not change the logits"):
        engagement.check_fp8_logit_effect(effect)
    assert "3.00e-03" in engagement.check_fp8_logit_effect({"fp8": "hybrid", "configured_vs_off": 3e-3, "off_repeat": 0.0})
    for bad in (0.5, float("nan")):
        with pytest.raises(AssertionError):
            engagement.check_fp8_logit_effect({"fp8": "hybrid", "configured_vs_off": bad, "off_repeat": 0.0})
    with pytest.raises(AssertionError, match="did not change"):  # below the forward's own noise
        engagement.check_fp8_logit_effect({"fp8": "hybrid", "configured_vs_off": 1e-4, "off_repeat": 5e-5})


def test_probe_worker_trains_and_reports_on_cpu(shakespeare_corpus, tmp_path):
    """The worker the GPU tests start (tests/distributed/launch.py, a fresh process), on a 2-iteration
    CPU run: the plain cross-entropy is counted, no fused kernel, no TE module, no FP8 state."""
    from tests.cli import read_metrics
    from tests.distributed.launch import run_distributed

    overrides = shakespeare_corpus + [
        "model=tiny", "model.num_layers=2", "data.seq_length=32", "train.iters=2", "train.global_batch_size=4",
        "train.micro_batch_size=4", "train.eval_interval=0", "train.log_interval=1", f"run_dir={tmp_path / 'run'}"]
    out = run_distributed(engagement.__name__ + ":train_and_probe", nproc=None,
                          args=[json.dumps(overrides), str(tmp_path / "evidence.json")], timeout=300)
    evidence = engagement.read_evidence(tmp_path / "evidence.json")
    assert "[probe]" in out and evidence["backend"] == "local"
    calls = evidence["cross_entropy_calls"]
    assert calls["none"] > 0 and calls["native"] == 0, calls  # both ProSeCo losses of each micro-batch
    assert evidence["te_census"] == {} and evidence["te_layers"] is None and "not Transformer Engine" in \
        evidence["te_layers_error"]
    assert evidence["fp8"] == {"linears": {}} and "fp8_logit_effect" not in evidence
    assert [r["iteration"] for r in read_metrics(tmp_path / "run")] == [1, 2]
