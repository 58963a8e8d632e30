#!/usr/bin/env bash
# Step time of mdlm / proseco / "mdlm x2" for each parallel layout (benchmarks/objective_cost.py).
#   bash benchmarks/layouts.sh [extra Hydra overrides]     (prints markdown tables)
# On a small CPU machine the multi-process layouts share the cores: compare rows within a
# layout, not across layouts.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
CORES="$(nproc)"
run() {  # nproc tp pp
  local n=$1; shift
  local threads=$(( CORES / n )); [ "$threads" -ge 1 ] || threads=1
  echo; echo "### nproc=$n $*"
  OMP_NUM_THREADS=$threads "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" \
    benchmarks/objective_cost.py "$@" "${EXTRA[@]}" 2>/dev/null | sed -n '/^model=/,$p'
}
EXTRA=("$@")
run 1 --tp 1 --pp 1
run 2 --tp 2 --pp 1
run 2 --tp 1 --pp 2
run 2 --tp 1 --pp 1
run 4 --tp 2 --pp 2
run 4 --tp 1 --pp 4
