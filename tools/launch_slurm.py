"""Print the srun/torchrun command of a multi-node run (scripts/slurm/pretrain_prosec.sbatch runs it).

    python3 tools/launch_slurm.py --nodes 2 --gpus-per-node 8 --tp 4 --pp 2 --run-dir /lustre/runs/a \\
        --master-addr node001 --job-id 1234 --image prosec-mcore+25.12.sqsh \\
        --mounts /lustre:/lustre -- model=1b train=owt
    python3 tools/launch_slurm.py ... --print exit-file      # the file that stops the run

Arguments after `--` are Hydra overrides for tools/pretrain_prosec.py. Runs with the standard
library only (on the batch host, outside the container); see prosec_mcore/launch/slurm.py.
"""
import argparse
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _slurm_module():
    """prosec_mcore/launch/slurm.py loaded by path: the batch host need not have the package installed."""
    spec = importlib.util.spec_from_file_location("prosec_slurm", os.path.join(ROOT, "prosec_mcore", "launch", "slurm.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    slurm = _slurm_module()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--run-dir", required=True, help="absolute path on a shared file system")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--sp", action="store_true", help="sequence parallelism")
    parser.add_argument("--master-addr", default="localhost", help="first node of the allocation")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--job-id", default="local", help="rendezvous id ($SLURM_JOB_ID: kept on requeue)")
    parser.add_argument("--image", default=slurm.DEFAULT_IMAGE, help="pyxis --container-image")
    parser.add_argument("--mounts", default="", help="pyxis --container-mounts, comma-separated host:container")
    parser.add_argument("--print", dest="what", choices=("command", "exit-file"), default="command")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for tools/pretrain_prosec.py")
    args = parser.parse_args(argv)
    launch = slurm.SlurmLaunch(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, run_dir=args.run_dir, tp=args.tp, pp=args.pp,
        vpp=args.vpp, sequence_parallel=args.sp, overrides=list(args.overrides), master_addr=args.master_addr,
        master_port=args.master_port, job_id=args.job_id, container_image=args.image,
        container_mounts=[m for m in args.mounts.split(",") if m],
    )
    try:
        print(slurm.command_line(launch) if args.what == "command" else launch.exit_file)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
