"""What a run reports about its speed: start-up lines (layer backend, precision, speed features,
and why each was chosen) and per-iteration throughput metrics (TFLOP/s per GPU, MFU, memory).

    accounting = StepAccounting.for_run(cfg, vocab_size, world_size)
    record.update(accounting.metrics(step_seconds))   # tflops_per_gpu, mfu (GPU), memory
"""
from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from .flops import ModelShape, device_peak_flops, training_step_flops


def run_precision(cfg) -> str:
    """The precision whose peak the MFU divides by: fp8 when TE runs the GEMMs in FP8."""
    if cfg.train.fp8 is not None:
        return "fp8"
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if torch.cuda.is_available() else "fp32"
    return p


def memory_metrics() -> dict:
    """GPU: peak and current allocated memory of this process (GiB); CPU: resident set size."""
    if torch.cuda.is_available():
        return {"gpu_mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "gpu_mem_allocated_gib": torch.cuda.memory_allocated() / 2**30}
    import psutil

    return {"rss_gib": psutil.Process().memory_info().rss / 2**30}


def peak_memory_gib() -> float:
    """Peak memory of this process: max allocated GPU memory since the last
    torch.cuda.reset_peak_memory_stats(); on CPU the peak RSS over the process's life."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@dataclass
class StepAccounting:
    """Model FLOPs of one training step of this run and the peak they are measured against."""

    step_flops: int
    hardware_flops: int
    tokens_per_step: int
    world_size: int
    peak: float | None

    @classmethod
    def for_run(cls, cfg, padded_vocab: int, world_size: int, objective: str | None = None) -> StepAccounting:
        t = cfg.train
        flops = training_step_flops(
            ModelShape.from_config(cfg.model, padded_vocab), cfg.data.seq_length, t.global_batch_size,
            objective or cfg.objective.name, t.recompute_granularity, t.recompute_method, t.recompute_num_layers,
            cfg.parallel.pp)
        return cls(flops.model, flops.hardware, t.global_batch_size * cfg.data.seq_length, world_size,
                   device_peak_flops(run_precision(cfg)))

    def metrics(self, step_seconds: float) -> dict:
        per_gpu = self.step_flops / step_seconds / self.world_size
        out = {"tflops_per_gpu": per_gpu / 1e12}
        if self.peak:
            out["mfu"] = per_gpu / self.peak
        out.update(memory_metrics())
        return out


def startup_lines(cfg, backend: str, backend_reason: str, attention: str, dp_features: dict, bf16: bool) -> list[str]:
    """The start-up log's account of kernels, precision and speed features."""
    t = cfg.train
    if t.fp8:
        recipe = (f"delayed scaling, amax history {t.fp8_amax_history_len} ({t.fp8_amax_compute_algo}), margin "
                  f"{t.fp8_margin}" if t.fp8_recipe == "delayed" else "tensorwise current scaling")
        fp8 = f"fp8={t.fp8} ({recipe}) in the transformer layers' GEMMs"
    else:
        fp8 = "fp8 off"
    params = "bf16 parameters, fp32 main weights in the optimizer" if bf16 else "fp32 parameters"
    recompute = t.recompute_granularity or "off"
    if t.recompute_granularity == "full":
        recompute += f" ({t.recompute_method}, {t.recompute_num_layers} layers)"
    on = lambda flag: "on" if flag else "off"
    return [
        f"[prosec] layers: {backend} ({backend_reason}) | attention: {attention}",
        f"[prosec] precision: {params}, gradients reduced in fp32 | {fp8}",
        (f"[prosec] speed: distributed optimizer {on(dp_features['use_distributed_optimizer'])}, overlap grad reduce "
         f"{on(dp_features['overlap_grad_reduce'])}, overlap param gather {on(dp_features['overlap_param_gather'])}, "
         f"recompute {recompute}, cuda graphs {t.cuda_graph_impl}, fused cross-entropy "
         f"{t.cross_entropy_fusion_impl if t.cross_entropy_loss_fusion else 'off'}"),
    ]
