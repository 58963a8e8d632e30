"""One schedule call vs two for a ProSeCo step: measured step times and a timeline model.

    torchrun --nproc-per-node 2 benchmarks/one_call_schedule.py measure --pp 2 --microbatches 2,4,8 model=tiny
    torchrun --nproc-per-node 2 benchmarks/one_call_schedule.py measure --pp 2 --vpp 2 --microbatches 2,4,8 model=tiny
    python benchmarks/one_call_schedule.py model --pp 4 8 16 [--forward 1 --backward 2 --latency 0]

measure: one Trainer (same weights, data, noise); for each m (micro-batches per rank) the median
step time of `proseco` with two schedule calls (MDM pass, SC pass), `proseco` in one call of 2m
micro-batches (training/one_call.py), and `mdlm x2`: MDLM on 2m micro-batches in one call, the
same forward-backward work with no y hand-off (the floor a one-call ProSeCo step can reach).

model: megatron-core's 1F1B order for each rank (training/pipeline_order.py) run as a timeline
with forward f and backward b per micro-batch and stage and a per-message latency; ProSeCo adds the
y edges (SC forward m+i on the first stage after MDM forward i on the last). Bubble = 1 - busy /
makespan, where busy = 2m(f + b) per stage. Two calls: twice the makespan of m micro-batches.
"y wait": one call's makespan minus that of 2m micro-batches without the y edges (mdlm x2), the
time the first stage spends waiting for y beyond the schedule's own dependencies.
"""
import argparse
import time


def measure(args):
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.training.trainer import Trainer

    m_max = max(args.microbatches)
    overrides = [f"parallel.pp={args.pp}", "train.eval_interval=0", "logging.tensorboard=false",
                 "checkpoint.resume=false", "checkpoint.save_at_end=false", "run_dir=runs/benchmark-one-call",
                 *([f"parallel.vpp={args.vpp}"] if args.vpp else []), *args.overrides]
    cfg = load_config(overrides)
    overrides.append(f"train.global_batch_size={2 * m_max * cfg.train.micro_batch_size}")  # dp=1
    trainer = Trainer(load_config(overrides))
    trainer.step.time_phases = True
    pool = trainer.microbatches(0)  # 2 * m_max micro-batches of one global batch
    rows = []
    for m in args.microbatches:
        batch, double = pool[:m], pool[:2 * m]
        variants = (("proseco two calls", "proseco", "two_call", batch), ("proseco one call", "proseco", "one_call", batch),
                    ("mdlm x2 (one call)", "mdlm", "two_call", double))
        times = {row: [] for row, *_ in variants}
        for i in range(args.warmup + args.iters):  # round-robin: a load change on the machine hits every row
            for row, objective, mode, microbatches in variants:
                trainer.objective = objective
                trainer.step.schedule_mode = mode
                start = time.perf_counter()
                trainer.train_step(microbatches)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times[row].append(time.perf_counter() - start)
        rows.append((m, {row: min(t) for row, t in times.items()}))  # best of N: the machine may be shared
    if torch.distributed.get_rank() != 0:
        return
    c = trainer.cfg
    print(f"\nmodel={c.model.name} pp={c.parallel.pp}{f' vpp={c.parallel.vpp}' if c.parallel.vpp else ''} "
          f"micro_batch={c.train.micro_batch_size} seq={c.data.seq_length} "
          f"device={'cuda' if torch.cuda.is_available() else 'cpu'} (best of {args.iters} steps after {args.warmup}, rows taken in turn)")
    names = list(rows[0][1])
    print("| m | " + " | ".join(f"{n} ms" for n in names) + " | one / two calls |")
    print("|---:|" + "---:|" * (len(names) + 1))
    for m, cells in rows:
        ratio = cells["proseco one call"] / cells["proseco two calls"]
        print(f"| {m} | " + " | ".join(f"{cells[n] * 1e3:.1f}" for n in names) + f" | {ratio:.3f} |")


def model(args):
    from prosec_mcore.training.pipeline_order import one_call_guaranteed, simulate

    f, b, lat = args.forward, args.backward, args.latency
    print(f"\nTimeline model: f={f} b={b} latency={lat} per micro-batch and stage, vpp={args.vpp}")
    print("| p | m | two calls: bubble | one call: bubble | step time one / two | y wait | guaranteed (auto uses one call) |")
    print("|---:|---:|---:|---:|---:|---:|:---:|")
    for p in args.pp:
        for factor in args.m_factors:
            m = factor * p
            two = 2 * simulate(p, args.vpp, m, forward=f, backward=b, latency=lat).makespan
            one = simulate(p, args.vpp, 2 * m, y_offset=m, forward=f, backward=b, latency=lat).makespan
            floor = simulate(p, args.vpp, 2 * m, forward=f, backward=b, latency=lat).makespan  # mdlm x2
            busy = 2 * m * (f + b)
            print(f"| {p} | {m} | {1 - busy / two:.3f} | {1 - busy / one:.3f} | {one / two:.3f} | {one - floor:.3g} | "
                  f"{'yes' if one_call_guaranteed(p, args.vpp, m) else 'no'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    meas = sub.add_parser("measure")
    meas.add_argument("--pp", type=int, default=2)
    meas.add_argument("--vpp", type=int, default=None)
    meas.add_argument("--microbatches", type=lambda text: [int(m) for m in text.split(",")], default=[2, 4, 8],
                      help="comma-separated micro-batches per rank, e.g. 2,4,8 (then the Hydra overrides)")
    meas.add_argument("--warmup", type=int, default=2)
    meas.add_argument("--iters", type=int, default=6)
    meas.add_argument("overrides", nargs="*")
    mod = sub.add_parser("model")
    mod.add_argument("--pp", type=int, nargs="+", default=[4, 8, 16])
    mod.add_argument("--vpp", type=int, default=1)
    mod.add_argument("--m-factors", type=int, nargs="+", default=[1, 2, 4, 8])
    mod.add_argument("--forward", type=float, default=1.0)
    mod.add_argument("--backward", type=float, default=2.0)
    mod.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    measure(args) if args.what == "measure" else model(args)


if __name__ == "__main__":
    main()
