#!/usr/bin/env bash
# Install everything from scratch (if needed) and run the test suite: unit, distributed (gloo,
# several processes, real megatron-core schedules) and end-to-end tiers; tests/gpu (Transformer
# Engine, FP8) only where CUDA is present: elsewhere it is left out, not counted as skipped.
#   bash scripts/run_tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# The DALI tier (data.loader=dali, tests/distributed/test_shard_resume.py, tests/unit/test_shards.py):
# the reader needs only DALI's own wheel and its pure-Python dependencies on a CPU machine, not the
# GPU codec libraries its full dependency list pulls (`pip install '.[dali]'` installs those).
# (dependencies first: pip then has nothing to report about the codec packages left out)
.venv/bin/python -m pip install --quiet astunparse gast libcst makefun nvtx optree 'packaging<=26.3' six
.venv/bin/python -m pip install --quiet --no-deps nvidia-dali-cuda120==2.4.0
gpu=(--ignore=tests/gpu)
if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then gpu=(); fi
# The slow tier (tests/conftest.py: SLOW_TIER, each covered in the default run by a cheaper test) is
# deselected unless PROSEC_TESTS=all; `-m slow` runs it alone. --durations: the slowest tests are
# listed at the end of every run, to keep the suite within its budget.
tier=(-m "not slow")
if [ "${PROSEC_TESTS:-}" = "all" ]; then tier=(); fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 "${tier[@]}" tests "${gpu[@]}" "$@"
