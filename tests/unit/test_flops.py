"""FLOPs accounting (prosec_mcore/perf/flops.py) against an independent count.

torch.utils.flop_counter.FlopCounterMode counts the FLOPs of every matmul-like aten op that
actually runs (mm, addmm, bmm, baddbmm, and their backward ops). We run the real megatron-core
model, and the real two-pass ProSeCo step with its backward, under it and compare with the
closed-form formula. The counter has no entry for PyTorch's fused CPU flash-attention kernel, so
SDPA (the local spec's attention) runs with its math backend here, which is made of counted bmm.
"""
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from prosec_mcore.config import Config
from prosec_mcore.diffusion.losses import LossOptions
from prosec_mcore.diffusion.noise import STREAM_TRAIN_MASK, STREAM_TRAIN_TIME
from prosec_mcore.diffusion.schedules import build_schedule
from prosec_mcore.model.builder import build_model, padded_vocab_size
from prosec_mcore.perf.flops import ModelShape, forward_flops, gpu_family, peak_flops, throughput, training_step_flops
from megatron.core.distributed import finalize_model_grads
from prosec_mcore.training.optim import wrap_ddp
from prosec_mcore.training.step import NoiseSettings, ProSeCoStep

VOCAB, SEQ, MICRO, NUM_MICRO = 300, 32, 2, 2  # padded vocabulary: 384

SHAPES = {
    # the DiT: LayerNorm, GELU MLP with biases, adaLN time conditioning
    "dit": dict(style="dit", time_conditioning="adaln", num_layers=2, hidden_size=64, num_attention_heads=4,
                ffn_hidden_size=256),
    # LLaDA-like: SwiGLU, grouped-query attention (2 groups for 4 heads), no time input
    "llama_gqa": dict(style="llama", time_conditioning="none", num_layers=2, hidden_size=64,
                      num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96),
}


def _config(shape: str) -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, **SHAPES[shape])
    cfg.data.seq_length = SEQ
    return cfg


def _tokens(n):
    return torch.randint(0, VOCAB - 1, (n, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_forward_flops_match_flop_counter(single_process_world, shape):
    cfg = _config(shape)
    model = build_model(cfg, VOCAB)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(_tokens(3), torch.rand(3))
    formula = forward_flops(ModelShape.from_config(cfg.model, padded_vocab_size(VOCAB)), SEQ, sequences=3)
    assert formula == pytest.approx(counter.get_total_flops(), rel=0.01)


def _step(cfg, objective):
    model = build_model(cfg, VOCAB)
    chunks = wrap_ddp([model], model.config)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = chunks[0].no_sync
    return ProSeCoStep(chunks, model.config, objective, LossOptions(), build_schedule("loglinear"),
                       VOCAB - 1, VOCAB, SEQ, MICRO)


def _microbatches():
    tokens = _tokens(MICRO * NUM_MICRO)
    mbs = []
    for j in range(NUM_MICRO):
        pos = torch.arange(j * MICRO, (j + 1) * MICRO)
        mbs.append({"tokens": tokens[pos], "sample_index": pos, "batch_position": pos,
                    "global_batch_index": torch.zeros(MICRO, dtype=torch.long)})
    return mbs


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_training_step_flops_match_flop_counter(single_process_world, shape):
    """The real step: MDLM = one forward + backward (3x forward); ProSeCo = two of them, the
    backward of pass 1 included (6x forward)."""
    cfg = _config(shape)
    noise = NoiseSettings(seed=1, eps=1e-3, antithetic=True, global_batch_size=MICRO * NUM_MICRO,
                          time_stream=STREAM_TRAIN_TIME, mask_stream=STREAM_TRAIN_MASK)
    model_shape = ModelShape.from_config(cfg.model, padded_vocab_size(VOCAB))
    measured = {}
    for objective in ("mdlm", "proseco"):
        step = _step(cfg, objective)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            step.run(_microbatches(), noise)
        measured[objective] = counter.get_total_flops()
        formula = training_step_flops(model_shape, SEQ, MICRO * NUM_MICRO, objective).model
        # the only matmul whose backward is single (no input gradient) is the time embedder's
        # first layer on the fixed sinusoidal features, a few hundred kFLOPs: well under 1%
        assert formula == pytest.approx(measured[objective], rel=0.01), objective
    assert measured["proseco"] / measured["mdlm"] == pytest.approx(2.0, rel=1e-3)


def test_formula_reduces_to_the_megatron_gpt_count():
    """Narayanan et al. (2021): 72 B s L h^2 (1 + s/(6h) + V/(12 L h)) for a GPT with a 4h MLP."""
    L, h, s, V, B = 24, 2048, 2048, 51200, 8
    shape = ModelShape(num_layers=L, hidden_size=h, num_attention_heads=16, ffn_hidden_size=4 * h, vocab_size=V)
    expected = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert training_step_flops(shape, s, B, "mdlm").model == pytest.approx(expected, rel=1e-12)
    assert training_step_flops(shape, s, B, "proseco").model == pytest.approx(2 * expected, rel=1e-12)


def test_recomputation_adds_hardware_flops_only():
    shape = ModelShape(num_layers=8, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024, vocab_size=1024)
    plain = training_step_flops(shape, 128, 4, "proseco")
    full = training_step_flops(shape, 128, 4, "proseco", "full", "uniform", 1)
    block = training_step_flops(shape, 128, 4, "proseco", "full", "block", 2, pipeline_parallel=2)
    selective = training_step_flops(shape, 128, 4, "proseco", "selective")
    assert plain.model == plain.hardware == full.model == selective.model
    layers_fwd = full.hardware - plain.hardware  # one more forward of all 8 layers, in each of the 2 passes
    assert block.hardware - plain.hardware == layers_fwd // 2  # 2 of the 4 layers per stage
    assert plain.hardware < selective.hardware < block.hardware < full.hardware


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H200", "fp8", 1978.9), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA A100-SXM4-40GB", "fp8", None), ("NVIDIA H100 NVL", "bf16", None),
    ("Tesla T4", "bf16", None),
])
def test_peak_table(name, precision, tflops):
    peak = peak_flops(name, precision)
    assert (peak is None) if tflops is None else peak == pytest.approx(tflops * 1e12)
    assert (gpu_family(name) is None) == (name in ("NVIDIA H100 NVL", "Tesla T4"))


def test_throughput_and_mfu():
    out = throughput(step_flops=989.4e12 * 8 * 0.5, step_seconds=2.0, world_size=8, tokens_per_step=1 << 20,
                     peak=989.4e12)
    assert out["mfu"] == pytest.approx(0.25)
    assert out["tflops_per_gpu"] == pytest.approx(989.4 / 4)
    assert out["tokens_per_s_per_gpu"] == pytest.approx((1 << 20) / 16)
    assert throughput(1e12, 1.0, 1, 10, None)["mfu"] is None
