"""Data-loader throughput per path and worker count, beside what training consumes.

    python tools/benchmark_loader.py data=multisource \\
        "data.shards=[data_cache/multisource/shards/shakespeare/manifest.json]" --workers sync,0,1,2

Three tables:
1. **Loader alone**: tokens/s that the indexed, webdataset and DALI paths deliver to a consumer
   that takes batches as fast as they come (`--iters` global batches of the config's
   train.global_batch_size x data.seq_length, after the source is opened), for each worker setting:
   `sync` (assembled in the loop), `0` (a background thread), `N` (N worker processes).
2. **Training**: the real Trainer (`model=tiny` unless overridden) for `--train-steps` steps per
   path, fed by its batch loader (data.num_workers / data.prefetch): the tokens/s a step consumes
   and the time each step was blocked waiting for data (mean and max), i.e. whether training ever
   waits.
3. **What a GPU would consume**: tokens/s of a ProSeCo step of `model=1b` at sequence 2048 on one
   H100 (bf16 peak 989 TFLOP/s) at the stated `--mfu`, from the model FLOP count of
   prosec_mcore/perf/flops.py (two forward+backward passes per sample).

Rows whose input is missing (no data.shards, DALI not installed) are skipped with the reason.
Every other argument is a Hydra override, as for tools/pretrain_prosec.py.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

LOADERS = ("indexed", "webdataset", "dali")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--workers", default="sync,0,1,2", help="sync (in the loop), 0 (a thread), N processes")
    parser.add_argument("--iters", type=int, default=200, help="global batches read per loader row")
    parser.add_argument("--train-steps", type=int, default=6, help="training steps per path (0: skip table 2)")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed MFU of the 1B model on one H100")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    for name in args.loaders.split(","):
        if name not in LOADERS:
            parser.error(f"--loaders: unknown loader {name!r}; choose from {', '.join(LOADERS)}")
    for w in args.workers.split(","):
        if w != "sync" and not w.isdigit():
            parser.error(f"--workers: {w!r} is neither sync nor a number of processes")
    return args


def _skip_reason(cfg, loader: str):
    if loader != "indexed" and not cfg.data.shards:
        return "no data.shards given"
    if loader == "dali":
        import importlib.util

        if importlib.util.find_spec("nvidia.dali") is None:
            return "nvidia-dali-cuda120 is not installed"
    return None


def _config(overrides: list, loader: str, run_dir: str, extra=()):
    from prosec_mcore.config_loader import load_config

    cfg_overrides = [f"data.loader={loader}", "train.eval_interval=0", "logging.tensorboard=false",
                     "logging.wandb=false", "checkpoint.save_interval=0", "checkpoint.save_at_end=false",
                     f"run_dir={run_dir}", *overrides, *extra]
    if loader == "indexed":  # the shards are for the other rows, the indexed datasets for this one
        cfg_overrides.append("data.shards=null")
    else:
        cfg_overrides += [f"data.{key}=null" for key in
                          ("data_prefix", "data_path", "train_data_path", "valid_data_path", "test_data_path")]
    return load_config(cfg_overrides)


def loader_rows(args, loader: str, tmp: str) -> list:
    """Table 1: tokens/s the loader delivers alone, per worker setting. Each row opens the source
    afresh (no shard decoded by an earlier row is reused) and times the first batch (worker start,
    first shard decoded) apart from the steady stream of the remaining `--iters - 1` batches."""
    from prosec_mcore.data import make_batch_iterator
    from prosec_mcore.data.loader import BatchLoader
    from prosec_mcore.data.sources import build_run_data
    from prosec_mcore.training.trainer import build_run_tokenizer, resolve_tokenizer_path

    cfg = _config(args.overrides, loader, os.path.join(tmp, f"loader-{loader}"))
    t, d = cfg.train, cfg.data
    tokenizer = build_run_tokenizer(cfg, resolve_tokenizer_path(cfg))
    rows = []
    for setting in args.workers.split(","):
        workers, prefetch = (0, 0) if setting == "sync" else (int(setting), 2)
        begin = time.perf_counter()
        data = build_run_data(cfg, tokenizer, (args.iters * t.global_batch_size, 0, 0),
                              os.path.join(cfg.run_dir, "cache"))
        open_s = time.perf_counter() - begin
        batches = make_batch_iterator(data.train, t.global_batch_size, t.micro_batch_size, 0, 1)
        begin = time.perf_counter()
        batch_loader = BatchLoader(batches, 0, args.iters, workers, prefetch)
        next(batch_loader)
        first_s = time.perf_counter() - begin
        begin = time.perf_counter()
        count = sum(1 for _ in batch_loader)
        seconds = time.perf_counter() - begin
        batch_loader.close()
        rows.append((loader, setting, open_s, first_s, count * t.global_batch_size * d.seq_length / seconds))
    return rows


def training_row(args, loader: str, tmp: str) -> tuple:
    """Table 2: a real Trainer fed by its batch loader; step tokens/s and time blocked on data."""
    from megatron.core import parallel_state

    from prosec_mcore.training.trainer import Trainer

    steps = args.train_steps
    cfg = _config(["model=tiny", *args.overrides], loader, os.path.join(tmp, f"train-{loader}"),
                  [f"train.iters={steps}"])
    trainer = Trainer(cfg)
    batch_loader = trainer.batch_loader(0)
    waits, step_times = [], []
    for iteration in range(1, steps + 1):
        _, microbatches = next(batch_loader)
        waits.append(batch_loader.wait_s)
        begin = time.perf_counter()
        trainer.train_step(microbatches, iteration)
        step_times.append(time.perf_counter() - begin)
    batch_loader.close()
    trainer.close()
    parallel_state.destroy_model_parallel()
    step = statistics.median(step_times[1:] or step_times)  # the first step includes warm-up
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    return (loader, cfg.data.num_workers, cfg.data.prefetch, tokens / step, statistics.mean(waits[1:] or waits),
            max(waits[1:] or waits))


def gpu_demand(mfu: float) -> tuple:
    """Table 3: tokens/s one H100 consumes training model=1b (ProSeCo, sequence 2048)."""
    from prosec_mcore.config_loader import load_config
    from prosec_mcore.model.builder import padded_vocab_size
    from prosec_mcore.perf.flops import PEAK_TFLOPS, ModelShape, training_step_flops

    cfg = load_config(["model=1b", "data.seq_length=2048"])
    vocab = padded_vocab_size(32000)
    shape = ModelShape.from_config(cfg.model, vocab)
    per_sample = training_step_flops(shape, 2048, 1, "proseco").model
    peak = PEAK_TFLOPS["H100 SXM"]["bf16"] * 1e12
    return per_sample / 2048, mfu * peak / per_sample * 2048


def main(argv=None) -> int:
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    from prosec_mcore.config import ConfigError

    args = parse_args(argv)
    loaders = args.loaders.split(",")
    results, trained, skipped = [], [], []
    with tempfile.TemporaryDirectory(prefix="prosec_loader_bench_") as tmp:
        try:
            for loader in loaders:
                reason = _skip_reason(_config(args.overrides, loader, tmp), loader)
                if reason:
                    skipped.append(f"{loader}: skipped ({reason})")
                    continue
                results += loader_rows(args, loader, tmp)
                if args.train_steps:
                    trained.append(training_row(args, loader, tmp))
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print("\n1. loader alone: seconds to open the source and to get the first batch, then tokens/s delivered")
    print(f"{'loader':<11}{'workers':>8}{'open s':>9}{'first s':>9}{'tokens/s':>14}")
    for loader, setting, open_s, first_s, rate in results:
        print(f"{loader:<11}{setting:>8}{open_s:>9.2f}{first_s:>9.2f}{rate:>14,.0f}")
    if trained:
        print("\n2. training model=tiny fed by the loader (data.num_workers, data.prefetch)")
        print(f"{'loader':<11}{'workers':>8}{'prefetch':>9}{'step tokens/s':>15}{'wait mean s':>13}{'wait max s':>12}")
        for loader, workers, prefetch, rate, wait_mean, wait_max in trained:
            print(f"{loader:<11}{workers:>8}{prefetch:>9}{rate:>15,.0f}{wait_mean:>13.4f}{wait_max:>12.4f}")
    flops_per_token, demand = gpu_demand(args.mfu)
    print(f"\n3. one H100 training model=1b (ProSeCo, sequence 2048, vocabulary 32,000) at MFU {args.mfu:.0%}: "
          f"{flops_per_token / 1e9:,.1f} GFLOP per token -> {demand:,.0f} tokens/s to feed")
    for line in skipped:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
