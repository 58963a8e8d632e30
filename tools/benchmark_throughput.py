"""Training throughput of ProSeCo vs MDLM: tokens/s/GPU, TFLOP/s/GPU, MFU, peak memory.

    # CPU (2 cores, seconds): the tiny model
    python tools/benchmark_throughput.py model=tiny
    # one H100/H200: the 1B model at sequence 2048, bf16 and both FP8 recipes
    python tools/benchmark_throughput.py --precisions bf16,fp8-delayed,fp8-tensorwise \\
        model=1b data.seq_length=2048 model.vocab_size=32000 train.micro_batch_size=4 train.global_batch_size=16
    # 8 GPUs, TP 2 x DP 4
    torchrun --nproc-per-node 8 tools/benchmark_throughput.py --tp 2 model=1b data.seq_length=2048 ...

For every precision the model is built through the real Trainer (megatron-core DDP, optimizer,
the two-pass ProSeCo step on megatron's schedules); each objective runs `--warmup` steps, then
`--iters` timed steps (median) on the same global batch, the objectives' steps alternating so
that a change of load on the machine hits all of them alike. FLOPs are model FLOPs
(prosec_mcore/perf/flops.py: MDLM one forward+backward, ProSeCo two); MFU divides by the GPU's
peak for the precision (fp8 rows by the FP8 peak, so they are not inflated). Memory is the peak
allocated GPU memory of each row (max over ranks), or the process's peak RSS on CPU (which only
grows: the CPU rows share one value). Every other argument is a Hydra override.
Precisions: fp32, bf16, fp8-delayed, fp8-tensorwise (fp8 = hybrid format on bf16 parameters).
"""
import argparse
import gc
import statistics
import sys
import time

PRECISIONS = {
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16"],
    "fp8-delayed": ["train.precision=bf16", "train.fp8=hybrid", "train.fp8_recipe=delayed"],
    "fp8-tensorwise": ["train.precision=bf16", "train.fp8=hybrid", "train.fp8_recipe=tensorwise"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default=None,
                        help=f"comma-separated, from {', '.join(PRECISIONS)} (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--objectives", default="mdlm,proseco")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    for name in (args.precisions or "").split(","):
        if name and name not in PRECISIONS:
            parser.error(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    return args


def _timed_step(trainer, objective: str, batch) -> tuple:
    """Seconds and peak memory (GiB) of one training step of `objective`."""
    import torch

    from prosec_mcore.perf.report import peak_memory_gib

    trainer.objective = objective
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train_step(batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, peak_memory_gib()


def measure(trainer, objectives: list, batch, warmup: int, iters: int) -> dict:
    """Median step time and peak memory per objective, plus throughput. The objectives' timed
    steps alternate, so a change in the machine's load during the run affects all of them alike."""
    import torch

    from prosec_mcore.model.builder import padded_vocab_size
    from prosec_mcore.perf.report import StepAccounting

    for objective in objectives:
        for _ in range(warmup):
            _timed_step(trainer, objective, batch)
    times, memory = {o: [] for o in objectives}, {o: 0.0 for o in objectives}
    for _ in range(iters):
        for objective in objectives:
            seconds, gib = _timed_step(trainer, objective, batch)
            times[objective].append(seconds)
            memory[objective] = max(memory[objective], gib)
    rows = {}
    for objective in objectives:
        peak_mem = torch.tensor([memory[objective]], dtype=torch.float64, device=trainer.device)
        torch.distributed.all_reduce(peak_mem, op=torch.distributed.ReduceOp.MAX)
        step = statistics.median(times[objective])
        acc = StepAccounting.for_run(trainer.cfg, padded_vocab_size(trainer.vocab_size),
                                     torch.distributed.get_world_size(), objective=objective)
        per_gpu = acc.step_flops / step / acc.world_size
        rows[objective] = {"step_s": step, "tokens_per_s_per_gpu": acc.tokens_per_step / step / acc.world_size,
                           "tflops_per_gpu": per_gpu / 1e12, "mfu": per_gpu / acc.peak if acc.peak else None,
                           "memory_gib": peak_mem.item(), "peak": acc.peak}
    return rows


def run_precision(precision: str, args) -> tuple:
    from megatron.core import parallel_state

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.training.trainer import Trainer

    overrides = [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", "train.eval_interval=0",
                 f"train.iters={args.warmup + args.iters}", "logging.tensorboard=false", "logging.wandb=false",
                 "checkpoint.resume=false", "checkpoint.save_interval=0", "checkpoint.save_at_end=false",
                 "run_dir=runs/benchmark-throughput",
                 *PRECISIONS[precision], *args.overrides]
    trainer = Trainer(load_config(overrides))
    batch = trainer.microbatches(0)  # the same batch for every step
    objectives = list(dict.fromkeys(args.objectives.split(",")))
    rows = measure(trainer, objectives, batch, args.warmup, args.iters)
    n_params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    cfg = trainer.cfg
    trainer.close()
    del trainer, batch
    gc.collect()
    parallel_state.destroy_model_parallel()  # the next precision builds its groups again
    return cfg, n_params, rows


def main(argv=None) -> int:
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch

    from prosec_mcore.config import ConfigError

    args = parse_args(argv)
    precisions = (args.precisions or ("bf16" if torch.cuda.is_available() else "fp32")).split(",")
    results = {}
    try:
        for precision in precisions:
            results[precision] = run_precision(precision, args)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if torch.distributed.get_rank() != 0:
        return 0
    cfg, n_params, _ = results[precisions[0]]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    world = torch.distributed.get_world_size()
    print(f"\nmodel={cfg.model.name} ({n_params / 1e6:.1f}M params on rank 0) seq={cfg.data.seq_length} "
          f"global_batch={cfg.train.global_batch_size} micro_batch={cfg.train.micro_batch_size} "
          f"tp={cfg.parallel.tp} pp={cfg.parallel.pp} world={world} device={device} "
          f"(median of {args.iters} steps after {args.warmup} warm-up)")
    memory = "peak alloc GiB" if torch.cuda.is_available() else "peak RSS GiB"
    print(f"| precision | objective | step ms | tokens/s/GPU | TFLOP/s/GPU | MFU | {memory} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for precision, (_, _, rows) in results.items():
        for objective, r in rows.items():
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"| {precision} | {objective} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s_per_gpu']:.0f} | "
                  f"{r['tflops_per_gpu']:.3g} | {mfu} | {r['memory_gib']:.2f} |")
    print()
    for precision, (_, _, rows) in results.items():
        if "mdlm" in rows and "proseco" in rows:
            print(f"{precision}: proseco / mdlm step time {rows['proseco']['step_s'] / rows['mdlm']['step_s']:.3f}x "
                  f"(2.0x = the same FLOP/s for twice the FLOPs)")
    peaks = {p: rows[next(iter(rows))]["peak"] for p, (_, _, rows) in results.items()}
    if all(v is None for v in peaks.values()):
        print("MFU n/a: no peak FLOP/s known for this device (set PROSEC_PEAK_TFLOPS to give one)")
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's writer re-imports the main module
    sys.exit(main())
