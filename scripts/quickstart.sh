#!/usr/bin/env bash
# The quick start: install, prepare the bundled Shakespeare corpus, run a short ProSeCo
# pre-training of the tiny bidirectional model (CPU when there is no GPU, bf16 on a GPU), then
# sample from the model it trained with the ProSeCo sampler and print the samples.
#   bash scripts/quickstart.sh [extra Hydra overrides, e.g. train.iters=50 objective=mdlm]
# Each call trains in a new run directory (runs/quickstart-<date>-<time>), so an earlier run is
# never overwritten nor resumed with other settings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python tools/prepare_data.py --out-dir data_cache/shakespeare
RUN_DIR="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
.venv/bin/python tools/pretrain_prosec.py model=tiny objective=proseco run_dir="$RUN_DIR" "$@"

# The corrector *samples* its proposal: after 200 steps of the tiny model, argmax corrector loops
# collapse the draft onto the most frequent tokens (newlines, commas; examples/shakespeare/README.md).
SAMPLES="$RUN_DIR/samples/proseco.jsonl"
SAMPLE=(tools/generate_prosec.py "$RUN_DIR" --sampler proseco --steps 32 --corrector-steps 1 --corrector-every 4
        --corrector-mode sample --num-samples 4 --batch-size 4 --out "$SAMPLES")
echo
echo "[quickstart] sampling from the model just trained: ProSeCo, 32 unmasking steps, a sampled corrector step every 4"
.venv/bin/python "${SAMPLE[@]}"
.venv/bin/python - "$SAMPLES" <<'EOF'
import json, sys
path = sys.argv[1]
with open(path + ".summary.json") as f:
    summary = json.load(f)
print(f"[quickstart] network evaluations per batch: {summary['nfe_per_batch']:.0f} "
      f"({summary['nfe_unmask_per_batch']:.0f} unmasking + {summary['nfe_correct_per_batch']:.0f} correcting)")
with open(path) as f:
    for line in f:
        sample = json.loads(line)
        print(f"--- sample {sample['index']} ---\n{sample['text'].strip()}")
EOF
cat <<EOF

[quickstart] done. Run directory: $RUN_DIR (metrics.jsonl, checkpoints/, samples/)
  sample again:      .venv/bin/python ${SAMPLE[*]}
  evaluate samples:  .venv/bin/python tools/evaluate_prosec.py samples $SAMPLES
  validation NELBO:  .venv/bin/python tools/evaluate_prosec.py nelbo $RUN_DIR
  plot the losses:   .venv/bin/python tools/plot_metrics.py $RUN_DIR --out $RUN_DIR/losses.png
EOF
