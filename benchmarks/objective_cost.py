"""Step time of `mdlm` vs `proseco` for the same model and the same global batch.

    python benchmarks/objective_cost.py model=tiny train.global_batch_size=16 train.micro_batch_size=8
    torchrun --nproc-per-node 4 benchmarks/objective_cost.py --tp 2 --pp 2 model=tiny

Both objectives run on one Trainer (same weights, data and noise). ProSeCo does two full
forward-backward passes, so 2.0x the MDLM step is the natural cost; the table splits each step
into its phases (noise drawing, the MDM pass, the hand-off of y between pipeline stages, the SC
pass, the optimizer step) to show where any excess goes.

The row `mdlm x2` runs MDLM on twice the micro-batches in ONE schedule call: the same total
forward-backward work as a ProSeCo step, but with one pipeline fill/drain instead of two and no
hand-off. (proseco passes) - (mdlm x2 pass) is what the double pass costs in pipeline bubble
and communication.
"""
import argparse
import statistics
import time


def main():
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.training.trainer import Trainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [f"parallel.tp={args.tp}", f"parallel.pp={args.pp}", "train.eval_interval=0",
                 "logging.tensorboard=false", "checkpoint.resume=false", "checkpoint.save_at_end=false",
                 "run_dir=runs/benchmark-objective", *args.overrides]
    trainer = Trainer(load_config(overrides))
    trainer.step.time_phases = True  # ProSeCoStep fills last_timings with the seconds of each phase
    # The phases of the two-call step (MDM pass, hand-off, SC pass); the one-call step, which runs both
    # passes in one schedule call, is compared with it in benchmarks/one_call_schedule.py.
    trainer.step.schedule_mode = "two_call"
    batch = trainer.microbatches(0)  # the same global batch for every step
    double = batch + trainer.microbatches(1)

    rows = {}
    for row, objective, microbatches in (("mdlm", "mdlm", batch), ("proseco", "proseco", batch),
                                         ("mdlm x2", "mdlm", double)):
        trainer.objective = objective
        totals, phases = [], {}
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            trainer.train_step(microbatches)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            total = time.perf_counter() - start
            if i >= args.warmup:
                totals.append(total)
                laps = dict(trainer.step.last_timings)
                laps["optimizer"] = total - sum(laps.values())
                for key, value in laps.items():
                    phases.setdefault(key, []).append(value)
        rows[row] = (statistics.median(totals), {k: statistics.median(v) for k, v in phases.items()})

    if torch.distributed.get_rank() != 0:
        return
    cfg = trainer.cfg
    print(f"\nmodel={cfg.model.name} tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={trainer.dp_size} "
          f"global_batch={cfg.train.global_batch_size} micro_batch={cfg.train.micro_batch_size} "
          f"seq={cfg.data.seq_length} device={'cuda' if torch.cuda.is_available() else 'cpu'} "
          f"(median of {args.iters} steps after {args.warmup} warm-up)")
    names = ["noise", "mdm_pass", "handoff", "sc_pass", "optimizer"]
    print("| objective | step ms | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for row, (total, laps) in rows.items():
        cells = " | ".join(f"{laps.get(n, 0.0) * 1e3:.1f}" for n in names)
        print(f"| {row} | {total * 1e3:.1f} | {cells} |")
    ratio = rows["proseco"][0] / rows["mdlm"][0]
    passes = (rows["proseco"][1]["mdm_pass"] + rows["proseco"][1]["sc_pass"]) / rows["mdlm"][1]["mdm_pass"]
    bubble = (rows["proseco"][1]["mdm_pass"] + rows["proseco"][1]["handoff"] + rows["proseco"][1]["sc_pass"]
              - rows["mdlm x2"][1]["mdm_pass"])
    print(f"\nproseco / mdlm step time: {ratio:.3f}x   (forward-backward passes only: {passes:.3f}x)")
    print(f"double-pass overhead vs one pass of the same work (bubble + hand-off): {bubble * 1e3:.1f} ms "
          f"({100 * bubble / rows['mdlm x2'][1]['mdm_pass']:.1f}% of that pass)")


if __name__ == "__main__":
    main()
