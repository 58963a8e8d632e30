#!/usr/bin/env bash
# The QM9 comparison end to end (examples/qm9/README.md): prepare the molecules, train the same
# model with the same budget once with objective=mdlm and once with objective=proseco, then sample
# both at several step counts and corrector settings and score every sample set.
#   bash examples/qm9/run.sh [checkpoint iteration to compare, default 2500 (the end of train=qm9)]
set -euo pipefail
cd "$(dirname "$0")/../.."
ITER="${1:-2500}"
bash scripts/setup_env.sh
PY=.venv/bin/python
$PY tools/prepare_data.py --dataset qm9                     # 130,742 canonical SMILES, 24 ids
for OBJ in mdlm proseco; do
  OMP_NUM_THREADS=1 $PY tools/pretrain_prosec.py data=qm9 model=qm9 train=qm9 objective=$OBJ \
    checkpoint.save_interval=500 run_dir=runs/qm9-$OBJ &
done
wait
CK=$(printf "checkpoints/iter_%07d" "$ITER")
$PY tools/evaluate_prosec.py nelbo runs/qm9-mdlm/$CK --out runs/qm9-mdlm/nelbo_$ITER.json
$PY tools/evaluate_prosec.py nelbo runs/qm9-proseco/$CK --out runs/qm9-proseco/nelbo_$ITER.json
$PY tools/plot_metrics.py runs/qm9-mdlm runs/qm9-proseco --out examples/qm9/results/training.png
OMP_NUM_THREADS=1 $PY examples/qm9/sweep.py --mdlm runs/qm9-mdlm/$CK --proseco runs/qm9-proseco/$CK \
  --steps 4 8 16 32 --corrector 1:1 4:2 --num-samples 300 --batch-size 300 --seeds 1 2 3 \
  --out examples/qm9/results
