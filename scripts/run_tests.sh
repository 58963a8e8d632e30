#!/usr/bin/env bash
# Install everything from scratch (if needed) and run the test suite: unit, distributed (gloo,
# several processes, real megatron-core schedules) and end-to-end tiers. GPU tests skip without CUDA.
#   bash scripts/run_tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
