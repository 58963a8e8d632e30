"""Performance accounting: model FLOPs of a ProSeCo / MDLM step, GPU peaks, MFU (flops.py).

The throughput benchmark (tools/benchmark_throughput.py) and the trainer's per-iteration
`tflops_per_gpu` / `mfu` metrics both use these counts.
"""
from prosec_mcore.perf.flops import (
    PEAK_TFLOPS,
    ModelShape,
    StepFlops,
    device_peak_flops,
    forward_flops,
    peak_flops,
    throughput,
    training_step_flops,
)

__all__ = ["PEAK_TFLOPS", "ModelShape", "StepFlops", "device_peak_flops", "forward_flops", "peak_flops",
           "throughput", "training_step_flops"]
