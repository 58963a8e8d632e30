"""ProSeCo pre-training entry point.

    torchrun --nproc-per-node 8 tools/pretrain_prosec.py --tp 4 --pp 2 model=tiny objective=proseco train.iters=100
    python tools/pretrain_prosec.py model=tiny train.iters=50 run_dir=runs/quick   # one process

`--tp/--pp/--sp` are shorthands for the Hydra overrides parallel.tp/parallel.pp/
parallel.sequence_parallel; every other argument is a Hydra override of `configs/`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved)")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny train.iters=100")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.tp is not None:
        overrides.append(f"parallel.tp={args.tp}")
    if args.pp is not None:
        overrides.append(f"parallel.pp={args.pp}")
    if args.vpp is not None:
        overrides.append(f"parallel.vpp={args.vpp}")
    if args.sp:
        overrides.append("parallel.sequence_parallel=true")
    return overrides


def main(argv=None) -> int:
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    from prosec_mcore.config import ConfigError
    from prosec_mcore.config_loader import load_config
    from prosec_mcore.training.trainer import Trainer

    try:
        cfg = load_config(parse_args(argv))
        trainer = Trainer(cfg)
    except (ConfigError, FileNotFoundError) as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    trainer.train()
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's writer re-imports the main module
    sys.exit(main())
