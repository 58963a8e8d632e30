"""GPU-path settings that can be checked without a GPU: validation of FP8 / CUDA graphs /
distributed optimizer, their wiring into megatron-core's configs, activation recomputation (which
does run on CPU: same gradients, layers really re-run), the layer-backend report, the trainer's
exit file and its throughput metrics."""
import dataclasses
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from prosec_mcore.config import Config, ConfigError, validate_config
from prosec_mcore.model import layer_specs
from prosec_mcore.model.builder import build_model, transformer_config
from prosec_mcore.perf.report import StepAccounting, startup_lines
from prosec_mcore.training import optim
from prosec_mcore.training.step import loss_options


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
    (["train.cuda_graph_impl=local"], False, False, "train.cuda_graph_impl=local needs a GPU"),
    (["train.cuda_graph_impl=local", "train.recompute_granularity=full", "train.recompute_method=uniform",
      "train.recompute_num_layers=1"], True, True, "choose one of the two"),
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
    ["train.cuda_graph_impl=transformer_engine", "train.recompute_granularity=selective"],
    ["parallel.overlap_param_gather=true"],
    ["train.cross_entropy_loss_fusion=true"], ["train.cross_entropy_loss_fusion=true", "train.cross_entropy_fusion_impl=te"],
])
def test_gpu_settings_are_accepted_where_they_can_run(overrides):
    validate_config(load_config(overrides), world_size=1, cuda_available=True, te_available=True)


def test_settings_reach_megatron_transformer_config(single_process_world):
    cfg = load_config(["train.fp8=hybrid", "train.fp8_recipe=tensorwise", "train.fp8_margin=1",
                       "train.fp8_amax_history_len=16", "train.fp8_amax_compute_algo=most_recent",
                       "train.recompute_granularity=full", "train.recompute_method=block",
                       "train.recompute_num_layers=3", "train.cuda_graph_impl=transformer_engine",
                       "train.cross_entropy_loss_fusion=true", "train.cross_entropy_fusion_impl=te"])
    cfg.train.recompute_granularity = None  # (graphs + full recompute are exclusive in megatron)
    cfg.train.recompute_method = cfg.train.recompute_num_layers = None
    tc = transformer_config(cfg)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_margin, tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (
        "hybrid", "tensorwise", 1, 16, "most_recent")
    assert tc.cuda_graph_impl == "transformer_engine"
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
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
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
    from prosec_mcore.training.trainer import Trainer

    trainer = Trainer.__new__(Trainer)  # only what _exit_reason reads
    trainer.cfg = load_config([f"train.exit_file={tmp_path / 'STOP'}"])
    trainer._exit_signal = None
    trainer.step = types.SimpleNamespace(device=torch.device("cpu"))
    assert trainer._exit_reason(3) is None
    (tmp_path / "STOP").touch()
    assert trainer._exit_reason(4) == f"train.exit_file {tmp_path / 'STOP'} exists"
    trainer._exit_signal = "SIGTERM"
    assert trainer._exit_reason(5) == "SIGTERM"


def test_fp8_without_usable_te_layers_is_refused_at_build(single_process_world):
    """validate_config only sees that TE is installed; a TE that cannot load must still stop FP8."""
    cfg = load_config(["train.fp8=hybrid"])
    with pytest.raises(ConfigError, match="train.fp8=hybrid needs the Transformer Engine layers"):
        build_model(cfg, 300)
