"""Peak memory of one ProSeCo training step with the loss code before and after it stopped copying
the logits (in-place suppression of the never-predicted ids, argmax in the logits' own dtype).

    python benchmarks/logits_memory.py                   # one training step: GPT-2-sized vocabulary, seq 512, mb 4
    python benchmarks/logits_memory.py data.seq_length=256  # any config overrides, for both measurements
    python benchmarks/logits_memory.py --loss-only bf16  # the MDM loss alone on bf16 (or fp32) logits

`--loss-only` measures what the loss code adds on top of the logits (forward and backward of
mdm_terms on [4, 512, 50304] logits made by one linear layer), in fp32 or bf16: the trainer's bf16
needs a GPU, this needs none.

Each implementation is measured in a fresh process (`--impl reference` / `--impl current`), so the
two cannot share a high-water mark or a warm allocator. The process builds the Trainer, draws the
batch, then resets the kernel's record of its peak resident set (writing 5 to
/proc/self/clear_refs resets VmHWM, Linux) and runs one `train_step`: forward and backward of both
passes and the optimizer step. Reported: the resident set before the step and its peak during it;
the difference is what the step itself needed. On CPU, tensors this large are mmap'd and handed
back to the kernel when freed, so the resident set follows the live tensors.

`reference` runs the step with the loss functions as they were (tests/reference_losses.py): an
out-of-place masked_fill for the suppression and an fp32 copy of the logits for the argmax; the
switch replaces `losses.mdm_terms` and `losses.sc_terms`, which training/step.py calls. Everything
else (model, data, noise, optimizer) is the same code in both processes.

The default problem is GPT-2's BPE vocabulary (50,257 ids, 50,304 rows after megatron's padding)
with model=tiny, sequence 512 and micro-batch 4: logits of 4 x 512 x 50,304 fp32 = 412 MB per
pass. With the bundled corpus the tokenizer has fewer ids than the model's rows; the rows beyond
it are suppressed like padding, which changes no tensor's size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

DEFAULTS = ["model=tiny", "model.vocab_size=50257", "data.seq_length=512", "model.max_sequence_length=512",
            "train.micro_batch_size=4", "train.global_batch_size=4", "objective=proseco", "train.eval_interval=0",
            "logging.tensorboard=false", "checkpoint.save_at_end=false", "checkpoint.resume=false"]
IMPLS = ("reference", "current")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests/reference_losses.py: the loss code before the change


# ------------------------------------------------------------------ REFERENCE: the loss code before the change
def reference_loss_functions():
    """mdm_terms and sc_terms as they were (tests/reference_losses.py, which the bitwise tests compare
    the current code with), for the `reference` measurement."""
    from tests import reference_losses

    return reference_losses.mdm_terms, reference_losses.sc_terms


# ------------------------------------------------------------------ one measurement (a fresh process)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def measure(impl: str, overrides: list) -> dict:
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.diffusion import losses
    from prosec_mcore.training.trainer import Trainer

    if impl == "reference":
        losses.mdm_terms, losses.sc_terms = reference_loss_functions()
    with tempfile.TemporaryDirectory(prefix="logits_memory_") as run_dir:
        trainer = Trainer(load_config([*DEFAULTS, f"run_dir={run_dir}", *overrides]))
        try:
            batch = trainer.microbatches(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            before = _status_kib("VmRSS")
            metrics = trainer.train_step(batch, iteration=1)
            peak = _status_kib("VmHWM")
            cfg = trainer.cfg
            model = trainer.model[0]
            while hasattr(model, "module"):  # DDP (and any other wrapper) around the ProSeCoModel
                model = model.module
            rows = model.vocab_size
            size = logits_bytes(cfg.train.micro_batch_size, cfg.data.seq_length, rows,
                                torch.bfloat16 if trainer.bf16 else torch.float32)
        finally:
            trainer.close()
    return {"impl": impl, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "step_mib": (peak - before) / 1024, "logits_mib": size / 2 ** 20, "loss": metrics["loss"],
            "precision": "bf16" if trainer.bf16 else "fp32", "vocab_rows": rows, "seq": cfg.data.seq_length,
            "micro_batch": cfg.train.micro_batch_size, "objective": cfg.objective.name}


def measure_loss_only(impl: str, dtype_name: str, batch=4, seq=512, rows=50304, hidden=64) -> dict:
    """The MDM loss alone (forward and backward of mdm_terms) on logits of `dtype_name` made by a
    linear layer, without the model: how much memory the loss code itself adds on top of the
    logits. This runs bf16 on CPU too (the trainer's bf16 needs a GPU)."""
    import torch

    from prosec_mcore.diffusion import losses
    from prosec_mcore.runtime import initialize_distributed

    initialize_distributed(tp=1, pp=1, seed=1)
    mdm_terms = reference_loss_functions()[0] if impl == "reference" else losses.mdm_terms
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(batch, seq, hidden, generator=gen).to(dtype)
    weight = (torch.randn(rows, hidden, generator=gen) * 0.1).to(dtype).requires_grad_()
    clean = torch.randint(0, 50000, (batch, seq), generator=gen)
    masked = torch.rand(batch, seq, generator=gen) < 0.5
    invalid = losses.invalid_vocab_mask(rows, 50257, 50256)
    logits = torch.nn.functional.linear(hidden_states, weight)  # [b, L, V], a non-leaf like the model's output
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    terms = mdm_terms(logits, clean, masked, torch.ones(batch), invalid)
    del logits
    terms.per_token.sum().backward()
    peak = _status_kib("VmHWM")
    return {"impl": impl, "precision": dtype_name, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "step_mib": (peak - before) / 1024, "logits_mib": logits_bytes(batch, seq, rows, dtype) / 2 ** 20,
            "loss": terms.per_token.sum().item()}


def logits_bytes(batch, seq, rows, dtype) -> int:
    import torch

    return batch * seq * rows * torch.finfo(dtype).bits // 8


# ------------------------------------------------------------------ both, in separate processes
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS, default=None, help="measure one implementation in this process")
    parser.add_argument("--loss-only", choices=("fp32", "bf16"), default=None,
                        help="measure the MDM loss alone on logits of this dtype (no model, no trainer)")
    parser.add_argument("overrides", nargs="*", help="config overrides, after the defaults above")
    args = parser.parse_args()
    if args.impl:
        result = measure_loss_only(args.impl, args.loss_only) if args.loss_only else measure(args.impl, args.overrides)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.loss_only:
        return compare_loss_only(args.loss_only)
    results = measure_each_in_a_fresh_process(args.overrides)
    if results is None:
        return 1
    r = results["current"]
    print(f"\nobjective={r['objective']} model rows={r['vocab_rows']} seq={r['seq']} micro_batch={r['micro_batch']} "
          f"precision={r['precision']}: logits {r['logits_mib']:.0f} MiB per pass; one training step per fresh process")
    print("| loss code | RSS before the step (MiB) | peak RSS in the step (MiB) | step's own memory (MiB) | loss |")
    print("|---|---:|---:|---:|---:|")
    for impl in IMPLS:
        m = results[impl]
        print(f"| {impl} | {m['rss_before_mib']:.0f} | {m['peak_mib']:.0f} | {m['step_mib']:.0f} | {m['loss']:.6f} |")
    saved = results["reference"]["step_mib"] - r["step_mib"]
    print(f"\nsaved: {saved:.0f} MiB of the step's peak = {saved / r['logits_mib']:.2f} x the logits; "
          f"same loss: {results['reference']['loss'] == r['loss']}")
    return 0


def measure_each_in_a_fresh_process(arguments: list):
    """{impl: result} of this script run once per implementation with `--impl <impl> *arguments`,
    each in its own process (None, with the failing run's output, when one fails)."""
    results = {}
    for impl in IMPLS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--impl", impl, *arguments],
                             capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(out.stdout[-3000:] + out.stderr[-3000:], file=sys.stderr)
            return None
        results[impl] = json.loads(lines[-1][len("RESULT "):])
    return results


def compare_loss_only(dtype_name: str) -> int:
    results = measure_each_in_a_fresh_process(["--loss-only", dtype_name])
    if results is None:
        return 1
    r = results["current"]
    print(f"\nMDM loss alone (forward + backward) on {dtype_name} logits [4, 512, 50304] = {r['logits_mib']:.0f} MiB")
    print("| loss code | memory above the logits (MiB) | x the logits | loss |")
    print("|---|---:|---:|---:|")
    for impl in IMPLS:
        m = results[impl]
        print(f"| {impl} | {m['step_mib']:.0f} | {m['step_mib'] / m['logits_mib']:.2f} | {m['loss']:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
