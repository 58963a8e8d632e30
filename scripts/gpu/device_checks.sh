#!/usr/bin/env bash
# Issue 6's GPU measurements in one command, for a GPU machine with no network (the lent H100 /
# H200: torch preinstalled, the rest staged by scripts/gpu/stage_wheels.sh into .whl/) or the NGC
# container of docker/ (everything installed; .whl/ absent). Each step's log goes to $OUT, with
# a summary of return codes; a failing step does not stop the others.
#   OUT=/tmp/out bash scripts/gpu/device_checks.sh            # the whole protocol (~6 min on an H100)
#   SMALL=1 bash scripts/gpu/device_checks.sh                  # the same steps on the tiny model (CPU too)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/device-checks}"
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/prosec-site .whl/*.whl \
    || { echo "installing the staged wheels failed" | tee -a "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH="$PWD:/tmp/prosec-site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME TIMEOUT_S command...: run, keep the log, record the return code
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
}

if [ -n "${SMALL:-}" ]; then  # the protocol's flow on the tiny model: for trying the script anywhere
  MODEL=(model=tiny data.seq_length=128 train.micro_batch_size=4 train.global_batch_size=8)
  ITERS=(--warmup 1 --iters 2)
else  # issue 6's target shape: ~1.1B parameters, sequence 2048, a 32k-row logits layer
  MODEL=(model=1b data.seq_length=2048 model.vocab_size=32000 train.micro_batch_size=4 train.global_batch_size=16)
  ITERS=(--warmup 2 --iters 5)
fi
HAS_TE=$(python3 -c "import importlib.util as u; print(int(u.find_spec('transformer_engine') is not None))")

step environment 60 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; python3 -c \"import torch, megatron.core as m; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'megatron-core', m.__version__)\"; \
python3 -c 'import transformer_engine as te; print(\"transformer_engine\", te.__version__)' 2>&1 | tail -1"
step prepare_data 300 python3 tools/prepare_data.py --out-dir data_cache/shakespeare
# tests/gpu checks that each feature engaged (tests/gpu/engagement.py) before comparing runs;
# every training run's evidence and metrics are kept in $OUT/gpu_tests; -rs names skipped tests.
step gpu_tests 900 env PROSEC_GPU_EVIDENCE_DIR="$OUT/gpu_tests" python3 -m pytest -q -s -rs -p no:cacheprovider tests/gpu
step bench_bf16 600 python3 tools/benchmark_throughput.py "${ITERS[@]}" "${MODEL[@]}"
step bench_bf16_fused_ce 600 python3 tools/benchmark_throughput.py "${ITERS[@]}" "${MODEL[@]}" \
  train.cross_entropy_loss_fusion=true
step bench_bf16_selective_recompute 600 python3 tools/benchmark_throughput.py "${ITERS[@]}" "${MODEL[@]}" \
  train.recompute_granularity=selective
# megatron's unfused attention stores the s x s scores: half the micro-batch keeps it in memory.
step bench_attention_sdpa_mb2 600 python3 tools/benchmark_throughput.py "${ITERS[@]}" "${MODEL[@]}" \
  train.micro_batch_size=2 train.global_batch_size=8
step bench_attention_unfused_mb2 600 python3 tools/benchmark_throughput.py "${ITERS[@]}" "${MODEL[@]}" \
  train.micro_batch_size=2 train.global_batch_size=8 model.local_attention=unfused
if [ "$HAS_TE" = 1 ]; then
  step bench_fp8 900 python3 tools/benchmark_throughput.py --precisions bf16,fp8-delayed,fp8-tensorwise \
    "${ITERS[@]}" "${MODEL[@]}"
else
  echo "bench_fp8 not run: Transformer Engine is not installed here (FP8 needs it; use the NGC container)" \
    | tee -a "$OUT/summary.txt"
fi
echo "=== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
