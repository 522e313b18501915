#!/usr/bin/env bash
# The GPU suite: everything a GPU run measures, in one call (~8 minutes on an H200).
#
#   benchmarks/gpu_suite.sh            # on a CUDA machine (torch, triton, pyarrow; no index needed)
#   benchmarks/gpu_suite.sh --dry-run  # on a CPU: every step in a cheap form, to check the script
#
# Steps: build csrc/ into llm._C for this card; the gpu-marked tests; `llm bench kernels`
# at the target shapes (norms hidden 4096/8192 bf16, attention seq 4096 head dim 128
# causal bf16 fwd and fwd+bwd, cross-entropy vocabulary 128k); a short `llm bench train`
# (bf16, one rank, GPT-2 124M and 355M). Each step has its own time limit inside one overall limit
# (SUITE_SECONDS, default 480); a failed step is recorded and the suite goes on. Logs,
# JSON and PNG go to $OUT (default benchmarks/results/); a short table is printed last.
set -uo pipefail

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
STEPS="$OUT/gpu_suite_steps.tsv"
: >"$LOG"
: >"$STEPS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=$((SECONDS + ${SUITE_SECONDS:-480}))

# step NAME LIMIT_SECONDS COMMAND...: run with the smaller of its limit and the time left.
step() {
  local name=$1 limit=$2 left rc start
  shift 2
  left=$((DEADLINE - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit <= 5)); then
    printf '%s\tskipped\t0\tno time left\t%s\n' "$name" "$*" >>"$STEPS"
    echo "== $name: skipped, no time left"
    return
  fi
  echo "== $name: $* (limit ${limit}s)" | tee -a "$LOG"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && status=failed
  printf '%s\t%s\t%s\trc=%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$rc" "$*" >>"$STEPS"
  echo "   $status in $((SECONDS - start))s (rc $rc)"
}

if ((DRY_RUN)); then
  echo "gpu_suite: dry run (cheap form of every step)"
  step "build csrc" 60 "$PY" setup.py --version
  step "gpu tests" 120 "$PY" -m pytest -m gpu tests --collect-only -q
  step "bench kernels" 120 "$PY" -m llm bench kernels --quick --ops rms_norm linear_cross_entropy --repeat 2
  step "bench train" 60 "$PY" -m llm bench train --help
else
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: use --dry-run'" || exit 2
  ARCH=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  step "build csrc" 150 env LLM_CUDA_ARCHS="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
  step "import llm._C" 30 "$PY" -c "import llm._C"
  step "gpu tests" 150 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider
  step "bench kernels" 150 "$PY" -m llm bench kernels
  # shellcheck disable=SC2086  # LLM_SUITE_TRAIN_ARGS is a list of flags
  step "bench train" 90 "$PY" -m llm bench train \
    ${LLM_SUITE_TRAIN_ARGS:---models gpt2-124m gpt2-355m --stages 0 3 --ranks 1 --precision bf16 --seq-len 2048 --micro-batch 4}
fi

echo "== log: $LOG"
"$PY" -m llm.bench.suite_summary "$STEPS" "$OUT" "$DRY_RUN"
