"""The srun + torchrun command of a multi-node ProSeCo run under SLURM (pyxis/enroot containers).

One srun task per node starts torchrun inside the container; torchrun starts one rank per GPU
and the nodes meet through torchrun's c10d rendezvous on the first node:

    srun --nodes=N --ntasks-per-node=1 --container-image=IMG --container-mounts=... \\
        torchrun --nnodes=N --nproc-per-node=G --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT \\
                 --rdzv-id=JOBID tools/pretrain_prosec.py --tp T --pp P run_dir=... train.exit_file=...

World size = N * G ranks, split by the trainer into TP x PP x DP. Everything that names the run
(run_dir, the checkpoint directory under it, the rendezvous id = the SLURM job id, which a
requeued job keeps) is the same on every (re)start, so a requeued job resumes from the newest
complete checkpoint in run_dir (the trainer's automatic resume). Initial weights (an imported
LLaDA, say) are given as `checkpoint.pretrained=<path>`, which is used only while the run has no
checkpoint of its own; `checkpoint.load` (resume exactly this) is refused here, since every
requeue would go back to it.

Stopping before the time limit (scripts/slurm/pretrain_prosec.sbatch): `--signal=B:USR1@LEAD`
makes SLURM signal only the batch shell, LEAD seconds before the limit. Its trap creates
`train.exit_file`; every rank checks for it after each iteration (one all-reduce agrees),
saves and exits 0; torchrun and srun then return and the script requeues the job. A signal
sent to the ranks would have to pass through torchrun, which forwards SIGTERM but SIGKILLs its
ranks 30 s later (hard-coded until torch added --shutdown-timeout in 2026; the NGC 25.12 image's
torch 2.10 has the fixed 30 s), too soon for a large checkpoint, and which dies itself on
SIGUSR1 unless told to handle it (--signals-to-handle, recent torch only). The file needs neither.

This module only builds argument lists (standard library only: it runs on the batch host,
outside the container); tests/unit/test_launch.py checks them.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

DEFAULT_IMAGE = "prosec-mcore+25.12.sqsh"  # enroot image of docker/Dockerfile (docker/README.md)
CONTAINER_REPO = "/workspace/prosec-mcore"  # where docker/Dockerfile installs the package


@dataclass
class SlurmLaunch:
    nodes: int
    gpus_per_node: int
    run_dir: str  # absolute, on a file system every node sees
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False
    overrides: list = field(default_factory=list)  # Hydra overrides for tools/pretrain_prosec.py
    master_addr: str = "localhost"  # the first node of the allocation
    master_port: int = 29500
    job_id: str = "local"
    container_image: str = DEFAULT_IMAGE
    container_mounts: list = field(default_factory=list)  # "host:container" pairs
    container_workdir: str = CONTAINER_REPO

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def exit_file(self) -> str:
        """The file the batch script creates to make every rank save and stop."""
        return os.path.join(self.run_dir, "STOP_AND_REQUEUE")

    def validate(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"need at least one node and one GPU per node (got {self.nodes}, {self.gpus_per_node})")
        if self.tp < 1 or self.pp < 1 or self.world_size % (self.tp * self.pp):
            raise ValueError(f"world size {self.nodes} nodes x {self.gpus_per_node} GPUs = {self.world_size} is not "
                             f"divisible by tp*pp = {self.tp}*{self.pp}")
        if self.tp > self.gpus_per_node:
            raise ValueError(f"tp={self.tp} exceeds the {self.gpus_per_node} GPUs of a node: tensor parallelism "
                             f"needs NVLink, keep it inside one node")
        if not os.path.isabs(self.run_dir):
            raise ValueError(f"run_dir={self.run_dir!r} must be absolute (ranks run in the container's workdir)")
        for key in ("run_dir=", "train.exit_file=", "parallel.tp=", "parallel.pp="):
            if any(o.startswith(key) for o in self.overrides):
                raise ValueError(f"give {key.rstrip('=')} through its own option, not as an override")
        if any(o.startswith("checkpoint.load=") for o in self.overrides):
            raise ValueError("checkpoint.load resumes exactly that checkpoint on every (re)start of a requeued job; "
                             "start from initial weights with checkpoint.pretrained=<path> instead (used only until "
                             "the run has checkpoints of its own)")


def train_args(launch: SlurmLaunch) -> list:
    """tools/pretrain_prosec.py and its arguments (the part torchrun runs on every rank)."""
    args = ["tools/pretrain_prosec.py", "--tp", str(launch.tp), "--pp", str(launch.pp)]
    if launch.vpp:
        args += ["--vpp", str(launch.vpp)]
    if launch.sequence_parallel:
        args.append("--sp")
    return args + [f"run_dir={launch.run_dir}", f"train.exit_file={launch.exit_file}", *launch.overrides]


def torchrun_args(launch: SlurmLaunch) -> list:
    """torchrun on one node: all its GPUs, rendezvous at the first node under the job's id."""
    return ["torchrun", f"--nnodes={launch.nodes}", f"--nproc-per-node={launch.gpus_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.master_addr}:{launch.master_port}",
            f"--rdzv-id={launch.job_id}", "--max-restarts=0", *train_args(launch)]


def srun_args(launch: SlurmLaunch) -> list:
    """srun: one task per node, in the container (pyxis flags), killing the step if a node fails."""
    launch.validate()
    args = ["srun", f"--nodes={launch.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            f"--container-image={launch.container_image}", f"--container-workdir={launch.container_workdir}"]
    if launch.container_mounts:
        args.append(f"--container-mounts={','.join(launch.container_mounts)}")
    return args + torchrun_args(launch)


def command_line(launch: SlurmLaunch) -> str:
    """The srun command as one shell-quoted line (the sbatch script runs it with `eval`)."""
    return shlex.join(srun_args(launch))
