"""Model FLOPs of a ProSeCo training step, peak FLOP/s of a GPU, and MFU.

What is counted. Only matrix multiplications, each as 2*m*n*k FLOPs (a multiply and an add):
the projections, the two attention products and the logits layer. Norms, softmax, GELU/SwiGLU,
rotary embeddings, adaLN's elementwise modulation, the cross-entropy and the argmax that
builds y are O(s*h) or O(s*V) per layer, a factor ~h below the matmuls, and are left out, as
in Megatron-LM's and PaLM's MFU. The embedding lookup is a gather: no FLOPs.

Forward FLOPs of one sequence of s tokens (h hidden, L layers, a heads of size d = h/a, g query
groups, f FFN width, V the padded vocabulary, which is what the logits layer computes):

    per layer, per token   2*h*(h + 2*g*d)          QKV projection (g = a without GQA: 6h^2)
                           2*s*h + 2*s*h             Q K^T and softmax(.) V, all heads
                           2*h*h                     attention output projection
                           2*h*f*(2 if gated else 1) + 2*f*h     MLP (SwiGLU has two input GEMMs)
    logits, per token      2*h*V
    time conditioning,     L*2*D*6h + 2*D*2h + 2*(256*D + D*D)   adaLN (D = time_embedding_dim),
      per sequence                                          once per sequence, not per token

The attention is bidirectional (no causal mask), so the full s x s score matrix is real work;
nothing is halved. A backward pass costs twice its forward (the gradient with respect to the
input and the one with respect to the weight, each a matmul of the same size), so one
forward + backward is 3x the forward. For the standard GPT shape (g = a, f = 4h, no gating)
this gives the familiar per-sequence training count

    72 * s * L * h^2 * (1 + s/(6h)) + 6 * s * h * V  =  ~6 * N * s  +  12 * L * h * s^2,

with N = 12*L*h^2 + h*V the matmul parameters and 12*L*h*s^2 the attention products.

    MDLM step     one forward + backward of every sequence          = 3 * F
    ProSeCo step  pass 1 on z_t (its backward runs: L_MDM has a gradient) and pass 2 on
                  y = argmax x_theta(z_t): two forward + backward   = 6 * F  (2x MDLM)

Validation (forward only) is not part of a training step. Activation recomputation does not
change *model* FLOPs (MFU); it adds a forward of the recomputed parts to the *hardware* FLOPs,
reported separately. MFU = model FLOPs per step / (step time * GPUs * peak FLOP/s per GPU).
tests/unit/test_flops.py checks these counts against torch.utils.flop_counter on the real model.
"""
from __future__ import annotations

from dataclasses import dataclass

FREQUENCY_DIM = 256  # the sinusoidal timestep features (model/time_embedding.py)

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s per GPU, from NVIDIA's datasheets.
# "fp32" is the non-tensor-core rate (torch's default for fp32 matmuls); "tf32" applies when
# torch.backends.cuda.matmul.allow_tf32 is on. None: the GPU has no such mode.
PEAK_TFLOPS = {
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp8": None},
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp8": 1978.9},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp8": 1513.0},
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp8": 1978.9},
}


def gpu_family(device_name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100 SXM'; None for a GPU not in PEAK_TFLOPS (NVL parts
    have other clocks and are left out on purpose: pass the peak explicitly)."""
    name = device_name.upper()
    if "NVL" in name:
        return None
    if "H100" in name:
        return "H100 PCIe" if "PCIE" in name else "H100 SXM"
    if "H200" in name:
        return "H200"
    if "A100" in name:
        return "A100"
    return None


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one GPU for `precision` (fp32, tf32, bf16, fp8), or None if unknown."""
    family = gpu_family(device_name)
    if family is None:
        return None
    tflops = PEAK_TFLOPS[family].get(precision)
    return None if tflops is None else tflops * 1e12


def device_peak_flops(precision: str) -> float | None:
    """Peak FLOP/s of this process's GPU for a run in `precision` (fp32, bf16, fp8); None on
    CPU or an unknown GPU. fp32 matmuls count at the TF32 rate when torch allows TF32."""
    import os

    import torch

    if os.environ.get("PROSEC_PEAK_TFLOPS"):  # an explicit peak for a GPU not in the table
        return float(os.environ["PROSEC_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    return peak_flops(torch.cuda.get_device_name(), precision)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int  # padded: the logits layer's real width
    num_query_groups: int | None = None
    gated_mlp: bool = False  # SwiGLU (llama style)
    time_embedding_dim: int | None = None  # None: no adaLN time conditioning

    @classmethod
    def from_config(cls, model_cfg, padded_vocab: int) -> ModelShape:
        return cls(
            num_layers=model_cfg.num_layers, hidden_size=model_cfg.hidden_size,
            num_attention_heads=model_cfg.num_attention_heads, ffn_hidden_size=model_cfg.ffn_hidden_size,
            vocab_size=padded_vocab, num_query_groups=model_cfg.num_query_groups,
            gated_mlp=model_cfg.style == "llama",
            time_embedding_dim=model_cfg.time_embedding_dim if model_cfg.time_conditioning == "adaln" else None,
        )


def layer_forward_flops(shape: ModelShape, seq_length: int) -> dict:
    """Forward FLOPs of one transformer layer on one sequence, split into its matmuls."""
    h, s, f = shape.hidden_size, seq_length, shape.ffn_hidden_size
    d = h // shape.num_attention_heads
    g = shape.num_query_groups or shape.num_attention_heads
    return {
        "qkv": 2 * s * h * (h + 2 * g * d),
        "attention": 2 * (2 * s * s * h),  # Q K^T and probs V over every head
        "out_proj": 2 * s * h * h,
        "mlp": 2 * s * h * f * (2 if shape.gated_mlp else 1) + 2 * s * f * h,
    }


def forward_flops(shape: ModelShape, seq_length: int, sequences: int = 1) -> int:
    """Forward FLOPs of the whole model on `sequences` sequences of `seq_length` tokens."""
    per_layer = sum(layer_forward_flops(shape, seq_length).values())
    per_sequence = shape.num_layers * per_layer + 2 * seq_length * shape.hidden_size * shape.vocab_size
    D = shape.time_embedding_dim
    if D is not None:
        h = shape.hidden_size
        per_sequence += shape.num_layers * 2 * D * 6 * h + 2 * D * 2 * h + 2 * (FREQUENCY_DIM * D + D * D)
    return per_sequence * sequences


@dataclass(frozen=True)
class StepFlops:
    model: int  # what MFU counts
    hardware: int  # plus recomputed forwards (activation recomputation)


def training_step_flops(shape: ModelShape, seq_length: int, global_batch_size: int, objective: str,
                        recompute_granularity: str | None = None, recompute_method: str | None = None,
                        recompute_num_layers: int | None = None, pipeline_parallel: int = 1) -> StepFlops:
    """FLOPs of one optimizer step over the global batch (all ranks together)."""
    passes = {"mdlm": 1, "proseco": 2}[objective]
    fwd = forward_flops(shape, seq_length, global_batch_size)
    model = passes * 3 * fwd
    recomputed = 0
    if recompute_granularity == "full":
        per_stage = shape.num_layers // pipeline_parallel
        layers = per_stage if recompute_method == "uniform" else min(recompute_num_layers or 0, per_stage)
        per_layer = sum(layer_forward_flops(shape, seq_length).values())
        recomputed = layers * pipeline_parallel * per_layer * global_batch_size
    elif recompute_granularity == "selective":  # megatron's default selective set: core attention
        recomputed = shape.num_layers * layer_forward_flops(shape, seq_length)["attention"] * global_batch_size
    return StepFlops(model=model, hardware=model + passes * recomputed)


def throughput(step_flops: int, step_seconds: float, world_size: int, tokens_per_step: int,
               peak: float | None) -> dict:
    """tokens/s per GPU, TFLOP/s per GPU and MFU (None without a known peak) of one step."""
    per_gpu = step_flops / step_seconds / world_size
    return {
        "tokens_per_s_per_gpu": tokens_per_step / step_seconds / world_size,
        "tflops_per_gpu": per_gpu / 1e12,
        "mfu": None if not peak else per_gpu / peak,
    }
