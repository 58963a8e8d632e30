"""ProSeCo pre-training entry point.

    torchrun --nproc-per-node 8 tools/pretrain_prosec.py --tp 4 --pp 2 model=tiny objective=proseco train.iters=100
    python tools/pretrain_prosec.py model=tiny train.iters=50 run_dir=runs/quick   # one process

`--tp/--pp/--vpp/--sp` are shorthands for the Hydra overrides parallel.tp/pp/vpp/sequence_parallel;
every other argument is a Hydra override of `configs/`; flags and overrides mix in any order.

Exit status: 0 done (or stopped after saving: SIGTERM, SIGUSR1, Ctrl-C, train.exit_interval,
train.exit_file); 2 bad input (configuration, data, checkpoint), found before training;
3 unhealthy training (NaN/Inf, health.*); 4 a checkpoint could not be written. Each comes with
one line on stderr that says what happened and what to do.
"""
import argparse
import gc
import os
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size")
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved)")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny train.iters=100")
    args = parser.parse_intermixed_args(argv)  # Megatron users mix flags and overrides freely
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


# How long another rank waits for rank 0 to report an error they share (see _report).
ALIKE_ERROR_WAIT_S = 20


def _report(err: BaseException, every_rank_alike: bool) -> None:
    """One line on stderr. An error that every rank raises alike (configuration, checkpoint and
    health checks agree across ranks) is printed by rank 0 only, not once per rank. The other
    ranks must not exit first: torchrun stops every worker as soon as one has exited, and rank 0
    could be stopped before it printed. So they wait for torchrun to stop them once rank 0 has
    exited; if that does not happen within ALIKE_ERROR_WAIT_S (rank 0 did not fail alike), they
    print their own line."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if every_rank_alike and rank != 0 and world > 1:
        time.sleep(ALIKE_ERROR_WAIT_S)
    print(f"error: {err}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    from prosec_mcore.config import ConfigError
    from prosec_mcore.config_loader import load_config
    from prosec_mcore.training.lifecycle import EXIT_BAD_INPUT, RunError
    from prosec_mcore.training.trainer import Trainer

    try:
        trainer = Trainer(load_config(parse_args(argv)))
        trainer.train()
        # Release the process groups before the interpreter exits: a group left to the exit-time
        # destructors can abort a finished run (SIGABRT, "terminate called without an active exception").
        from prosec_mcore.runtime import destroy_distributed

        destroy_distributed()
    except ConfigError as err:  # bad input: one line, no traceback
        _report(err, every_rank_alike=True)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, NotADirectoryError, PermissionError) as err:  # a file this rank could not read
        _report(err, every_rank_alike=False)
        return EXIT_BAD_INPUT
    except RunError as err:  # the run had to stop: unhealthy training, a failed save
        _report(err, every_rank_alike=getattr(err, "collective", True))
        return err.exit_code
    finally:
        # The interpreter's final garbage collections walk every object of the run (seconds under
        # load, measured 2.6 s of a SIGTERM exit on one rank); nothing is left to collect that matters.
        gc.freeze()
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's writer re-imports the main module
    sys.exit(main())
