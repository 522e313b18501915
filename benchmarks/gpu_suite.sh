#!/usr/bin/env bash
# The GPU suite: everything a GPU run measures, in one call (8 minutes on an H200, before bench sequence).
#
#   benchmarks/gpu_suite.sh            # on a CUDA machine (torch, triton, pyarrow; no index needed)
#   benchmarks/gpu_suite.sh --dry-run  # on a CPU: every step in a cheap form, to check the script
#
# Setup: packages the machine lacks (deepspeed and its few requirements the image has not) travel
# as wheels in .whl/ (scripts/gpu_wheelhouse.sh fills it; LLM_WHEELHOUSE names another folder);
# they are installed into a folder outside the tree and $OUT that goes on PYTHONPATH. Then torch,
# triton, deepspeed, pytest and llm must import and, unless --dry-run, a CUDA GPU must be seen:
# otherwise one line names what is missing and the suite exits 3 (no GPU: 2) before any step.
#
# Steps, each with its own time limit (seconds, sum 545) inside one overall limit (SUITE_SECONDS,
# default 570, which the setup counts against too): build csrc/ into llm._C for this card (110);
# import llm._C (15); the gpu-marked tests (90); `llm bench kernels` at the target shapes (130:
# norms hidden 4096/8192 bf16, attention seq 4096 head dim 128 causal bf16 fwd and fwd+bwd,
# cross-entropy vocabulary 128k); 2:4 semi-structured sparsity against dense bf16 Linear layers
# (benchmarks/sparse_24.py, 20); a short `llm bench train` (90: bf16, one rank, GPT-2 124M and
# 355M, ZeRO 0 and 3, eager; compiled points: LLM_SUITE_TRAIN_ARGS="... --modes eager compiled", whose
# compilation does not fit this step's limit); `llm bench sequence` (90: peak memory per rank
# against sequence length, 16k-128k, for sequence-parallel 1, 2 and 4 where there are that many
# GPUs, and the longest within 4 GiB). A failed step is recorded and the suite goes on.
#
# $OUT (default benchmarks/results/) receives at most 8 files: gpu_suite-<date>.json (steps,
# environment: card, driver, torch/CUDA/triton/deepspeed versions, the suite's command, the
# wheels used; the 2:4 rows, folded in from sparse_24-<date>.json), kernels-/train-<date>.json and
# .png, sequence-<date>.json, gpu_suite_table.txt (the short table, also printed last) and
# gpu_suite_logs.tar.gz (gpu_suite.log and the steps' TSV; both stay unpacked in $OUT while the
# suite runs, so a run cut short still returns them).
set -uo pipefail

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
SUITE_COMMAND="benchmarks/gpu_suite.sh${1:+ $1}"

cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
STEPS="$OUT/gpu_suite_steps.tsv"
: >"$LOG"
: >"$STEPS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=$((SECONDS + ${SUITE_SECONDS:-570}))
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/llm-gpu-suite.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
touch "$SCRATCH/start"

say() { echo "$*" | tee -a "$LOG"; }

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

# -- setup: the wheelhouse ---------------------------------------------------------------------
# The wheels are built for CPython 3.12 on manylinux x86-64 (the lent machine). Another Python
# (a dry run here) only checks that they install for that target; they are not used.
WHEELHOUSE="${LLM_WHEELHOUSE:-.whl}"
WHEELS_USED=""
install_wheelhouse() {
  local wheels=("$WHEELHOUSE"/*.whl) target="$SCRATCH/pydeps"
  if [[ ! -e ${wheels[0]} ]]; then
    say "wheelhouse: no $WHEELHOUSE/*.whl; using the installed packages"
    return
  fi
  if "$PY" -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 12) or platform.machine() != "x86_64")'; then
    if ! timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$target" "${wheels[@]}" >>"$LOG" 2>&1; then
      # Without a working pip a wheel is still a zip of importable files.
      say "wheelhouse: pip install failed (see $LOG); unpacking the wheels instead"
      for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$target" >>"$LOG" 2>&1; done
    fi
    export PYTHONPATH="$PWD:$target${PYTHONPATH#"$PWD"}"
    export PATH="$target/bin:$PATH"
    WHEELS_USED="${wheels[*]##*/}"
    say "wheelhouse: ${#wheels[@]} wheels from $WHEELHOUSE installed into $target (on PYTHONPATH)"
  elif timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$target" \
    --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux2014_x86_64 \
    "${wheels[@]}" >>"$LOG" 2>&1; then
    say "wheelhouse: ${#wheels[@]} wheels from $WHEELHOUSE install for CPython 3.12 x86-64 (not used by this Python)"
  else
    say "gpu_suite: the wheels in $WHEELHOUSE do not install for CPython 3.12 x86-64 (see $LOG); rebuild them with scripts/gpu_wheelhouse.sh"
    exit 3
  fi
}

# -- setup: what the steps need ----------------------------------------------------------------
# Imports torch, triton, deepspeed, pytest and llm in one process and looks for the GPU; prints
# one line. Exit 3: something does not import; 2: no CUDA GPU (fatal only without --dry-run).
preflight() {
  local verdict="$SCRATCH/preflight" rc
  timeout 180 "$PY" - "$verdict" "$DRY_RUN" >>"$LOG" 2>&1 <<'EOF'
import importlib, sys

verdict, dry_run = sys.argv[1], sys.argv[2] == "1"
found, missing = [], []
for name in ("torch", "triton", "deepspeed", "pytest", "llm"):
    try:
        version = getattr(importlib.import_module(name), "__version__", "")
        found.append(f"{name} {version}".strip())
    except Exception as e:  # a broken install raises more than ImportError
        missing.append(f"{name} ({type(e).__name__}: {e})")
problems, rc, gpu = [], 0, None
if missing:
    carried = any(m.startswith("deepspeed (") for m in missing)
    hint = " (deepspeed travels in .whl: run scripts/gpu_wheelhouse.sh here, carry .whl)" if carried else ""
    problems.append("cannot import " + "; ".join(missing) + hint)
    rc = 3
if "torch" in sys.modules:
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()} (sm_{major}{minor}, CUDA {torch.version.cuda})"
    else:
        no_gpu = f"no CUDA GPU (torch {torch.__version__}, CUDA {torch.version.cuda})"
        if dry_run:
            gpu = no_gpu + ", not needed by a dry run"
        else:
            problems.append(no_gpu + ": use --dry-run")
            rc = rc or 2
line = "gpu_suite: " + "; ".join(problems) if rc else "preflight: " + ", ".join(found) + "; GPU: " + gpu
open(verdict, "w").write(line + "\n")
sys.exit(rc)
EOF
  rc=$?
  if [[ -s $verdict ]]; then
    tee -a "$LOG" <"$verdict"
  else
    say "gpu_suite: the import check itself failed (rc $rc); see $LOG"
    rc=3
  fi
  ((rc == 0)) || exit "$rc"
}

install_wheelhouse
preflight

if ((DRY_RUN)); then
  echo "gpu_suite: dry run (cheap form of every step)"
  step "build csrc" 60 "$PY" setup.py --version
  step "gpu tests" 120 "$PY" -m pytest -m gpu tests --collect-only -q
  step "bench kernels" 120 "$PY" -m llm bench kernels --quick --ops rms_norm linear_cross_entropy --repeat 2
  step "sparse 2:4" 60 "$PY" benchmarks/sparse_24.py --dry-run
  step "bench train" 60 "$PY" -m llm bench train --help
  step "bench sequence" 60 "$PY" -m llm bench sequence --help
else
  ARCH=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  step "build csrc" 110 env LLM_CUDA_ARCHS="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
  step "import llm._C" 15 "$PY" -c "import llm._C"
  step "gpu tests" 90 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider
  step "bench kernels" 130 "$PY" -m llm bench kernels
  step "sparse 2:4" 20 "$PY" benchmarks/sparse_24.py
  # shellcheck disable=SC2086  # LLM_SUITE_TRAIN_ARGS is a list of flags
  step "bench train" 90 "$PY" -m llm bench train \
    ${LLM_SUITE_TRAIN_ARGS:---models gpt2-124m gpt2-355m --stages 0 3 --ranks 1 --precision bf16 --seq-len 2048 --micro-batch 4 --modes eager}
  step "bench sequence" 90 "$PY" -m llm bench sequence --sequences 1 2 4 --first-seq-len 16384 \
    --max-seq-len 131072 --budget-mib 4096
fi

echo "== log: $LOG (bundled into $OUT/gpu_suite_logs.tar.gz at the end)"
"$PY" -m llm.bench.suite_summary "$STEPS" "$OUT" "$DRY_RUN" | tee "$OUT/gpu_suite_table.txt"
RC=${PIPESTATUS[0]}

# The suite's own record in gpu_suite-<date>.json: its command, driver and nvcc, the wheels.
SUITE_COMMAND="$SUITE_COMMAND" WHEELS_USED="$WHEELS_USED" timeout 60 "$PY" - "$OUT" "$SCRATCH/start" >>"$LOG" 2>&1 <<'EOF'
import json, os, subprocess, sys
from pathlib import Path

out, start = Path(sys.argv[1]), os.path.getmtime(sys.argv[2])
found = sorted((p for p in out.glob("gpu_suite-*.json") if p.stat().st_mtime >= start), key=lambda p: p.stat().st_mtime)
if not found:
    sys.exit("no gpu_suite-*.json written by this run")


def output(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


record = json.loads(found[-1].read_text())
smi = output("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader")
nvcc = output("nvcc", "--version")
record["suite_command"] = " ".join(
    [f"{k}={os.environ[k]}" for k in ("SUITE_SECONDS", "LLM_SUITE_TRAIN_ARGS", "MAX_JOBS") if os.environ.get(k)]
    + [os.environ["SUITE_COMMAND"]]
)
record["machine"] = {
    "nvidia_smi": smi,
    "driver": smi.split(",")[1].strip() if smi and smi.count(",") >= 1 else None,
    "nvcc": nvcc.splitlines()[-1] if nvcc else None,
    "git_commit": output("git", "rev-parse", "HEAD"),
}
record["wheelhouse"] = os.environ["WHEELS_USED"].split()
found[-1].write_text(json.dumps(record, indent=2) + "\n")
EOF

# Logs travel as one file: the device tool returns at most 8 files of 16 MiB each.
if (($(stat -c %s "$LOG") > 24 * 1048576)); then
  { head -c 4M "$LOG"; printf '\n[... cut ...]\n'; tail -c 16M "$LOG"; } >"$SCRATCH/log" && mv "$SCRATCH/log" "$LOG"
fi
tar -czf "$OUT/gpu_suite_logs.tar.gz" -C "$OUT" "${LOG##*/}" "${STEPS##*/}" && rm -f "$LOG" "$STEPS"
written=$(find "$OUT" -maxdepth 1 -type f -newer "$SCRATCH/start" | wc -l)
((written <= 8)) || echo "gpu_suite: $written files written to $OUT; the device tool returns only 8" >&2
exit "$RC"
