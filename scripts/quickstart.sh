#!/usr/bin/env bash
# The quick start: install, prepare the bundled Shakespeare corpus, and run a short ProSeCo
# pre-training of the tiny bidirectional model (CPU when there is no GPU, bf16 on a GPU).
#   bash scripts/quickstart.sh [extra Hydra overrides, e.g. train.iters=50 objective=mdlm]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python tools/prepare_data.py --out-dir data_cache/shakespeare
exec .venv/bin/python tools/pretrain_prosec.py model=tiny objective=proseco run_dir=runs/quickstart "$@"
