#!/usr/bin/env bash
# Train the QM9 comparison with the reference's recipe scaled to 2 CPU cores
# (configs/recipe/qm9_guidance_corrector_cpu.yaml): MDLM and ProSeCo, training seeds 1 2 3, two
# runs at a time (one core each). Run dirs: runs/qm9-cpu-<objective>-seed<seed>; logs beside them.
#   bash examples/qm9/train_reference_recipe.sh            # ~50 min on 2 idle cores
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f data_cache/qm9/qm9_labels_qed.npy ] || python tools/prepare_data.py --dataset qm9 --labels qed
train() {  # objective seed
  mkdir -p runs
  OMP_NUM_THREADS=1 python tools/pretrain_prosec.py recipe=qm9_guidance_corrector_cpu objective="$1" \
    train.seed="$2" > "runs/qm9-cpu-$1-seed$2.log" 2>&1
  echo "[qm9] trained $1 seed $2: runs/qm9-cpu-$1-seed$2 (log runs/qm9-cpu-$1-seed$2.log)"
}
( train proseco 1; train mdlm 2; train proseco 3 ) &
( train mdlm 1; train proseco 2; train mdlm 3 ) &
wait
