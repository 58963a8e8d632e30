"""Cluster launchers: the SLURM srun/torchrun command (slurm.py). Standard library only, so the
batch script can run it on the batch host, outside the container."""
