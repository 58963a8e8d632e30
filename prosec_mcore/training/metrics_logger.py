"""Where a run's numbers go: the console, `<run_dir>/metrics.jsonl`, tensorboard, wandb.

One JSON object per training iteration in metrics.jsonl (validation results are merged into the
line of the iteration at which they were computed, prefixed `valid_`): the loss terms, LR, gradient
norm, tokens/s, TFLOP/s per GPU, MFU (on a GPU of the peak table, perf/flops.py) and memory (GPU
peak allocated, or RSS on CPU). Every numeric field also goes to tensorboard and wandb. Tensorboard and wandb
(offline unless the user asks otherwise) are optional: a missing package is reported once and
skipped, never fatal.
"""
from __future__ import annotations

import json
import os
import time


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def _speed(record: dict) -> str:
    """' | 312 TFLOP/s/GPU | MFU 31.5% | 41.2 GiB' from the throughput metrics the record has."""
    out = ""
    if "tflops_per_gpu" in record:
        out += f" | {record['tflops_per_gpu']:.3g} TFLOP/s/GPU"
    if "mfu" in record:
        out += f" | MFU {100 * record['mfu']:.1f}%"
    if "gpu_mem_peak_gib" in record:
        out += f" | {record['gpu_mem_peak_gib']:.1f} GiB peak"
    return out


class MetricsLogger:
    def __init__(self, run_dir: str, total_iters: int, enabled: bool, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "prosec-mcore", wandb_mode: str = "offline",
                 config_dict: dict | None = None):
        self.enabled = enabled
        self.total_iters = total_iters
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = self._wandb = None
        self._started = time.time()
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                print("[prosec] tensorboard is not installed; skipping tensorboard logging (pip install tensorboard)")
        if wandb:
            try:
                import wandb as wandb_lib

                self._wandb = wandb_lib.init(project=wandb_project, mode=wandb_mode, dir=run_dir, config=config_dict)
            except ImportError:
                print("[prosec] wandb is not installed; skipping wandb logging (pip install wandb)")

    def log(self, record: dict, console: bool, seconds_per_iter: float | None = None) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        step = record["iteration"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if console:
            eta = ""
            if seconds_per_iter is not None:
                eta = f" | ETA {_format_eta(seconds_per_iter * (self.total_iters - step))}"
            line = (f"iter {step:>6}/{self.total_iters} | loss {record['loss']:.4f} | mdm {record['mdm_loss']:.4f}"
                    f" | sc {record['sc_loss']:.4f} | lr {record['lr']:.2e} | grad_norm {record.get('grad_norm', 0.0):.3f}"
                    f" | {record['tokens_per_s']:.0f} tok/s{_speed(record)}{eta}")
            if "valid_nelbo" in record:
                line += f"\n           valid: nelbo {record['valid_nelbo']:.4f} | ppl<= {record['valid_ppl_bound']:.2f}"
                if "valid_corrector_nll" in record:  # absent when an MDLM run skips the corrector pass
                    line += f" | corrector_nll {record['valid_corrector_nll']:.4f}"
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
