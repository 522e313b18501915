#!/usr/bin/env bash
# `llm pretrain` under DeepSpeed's launcher: one rank per GPU on this node, or on every host of a hostfile.
#
#   launch/deepspeed.sh configs/recipes/gpt.yaml --set train.max_steps=100     # every GPU on this node
#   NUM_GPUS=2 launch/deepspeed.sh configs/recipes/gpt.yaml                    # two ranks (on CPU too: gloo)
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/recipes/gpt.yaml   # several nodes over ssh
#
# Environment: NUM_GPUS (ranks per node; default: all GPUs, 1 without), HOSTFILE, NUM_NODES (first N hosts
# of the hostfile), MASTER_ADDR (default: the first host), MASTER_PORT (default 29500), DS_ARGS (extra launcher
# flags, e.g. --no_ssh_check for a hostfile naming only this machine), DEEPSPEED (the launcher).
# With a hostfile, ranks on other hosts start from a bare ssh session: the launcher passes on PYTHON*, NCCL_*
# and the lines of DS_ENV_FILE (default ~/.deepspeed_env, ./.deepspeed_env); this script adds PATH, DS_ACCELERATOR,
# OMP_NUM_THREADS, GLOO_SOCKET_IFNAME, TORCH_EXTENSIONS_DIR and HF_HOME when set, through a DS_ENV_FILE of its own.
# Extra arguments after the recipe go to `llm pretrain` (e.g. --set train.zero_stage=3 --resume auto).
set -euo pipefail

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
else
  gpus=1
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # DeepSpeed on CPU: gloo, one rank per --num_gpus slot
fi

# The ranks read LOCAL_RANK from the environment; no --local_rank argument is appended.
args=(--no_local_rank --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
  if [[ -n "${NUM_NODES:-}" ]]; then args+=(--num_nodes "$NUM_NODES"); fi
  if [[ -n "${NUM_GPUS:-}" ]]; then args+=(--num_gpus "$NUM_GPUS"); fi
  if [[ -n "${MASTER_ADDR:-}" ]]; then args+=(--master_addr "$MASTER_ADDR"); fi
else
  args+=(--num_gpus "${NUM_GPUS:-$gpus}")
fi

# shellcheck disable=SC2206  # DS_ARGS is a list of flags
if [[ -n "${DS_ARGS:-}" ]]; then args+=($DS_ARGS); fi

if [[ -n "${HOSTFILE:-}" && -z "${DS_ENV_FILE:-}" ]]; then
  DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/llm-deepspeed-env.XXXXXX")
  export DS_ENV_FILE
  trap 'rm -f "$DS_ENV_FILE"' EXIT
  for var in PATH DS_ACCELERATOR OMP_NUM_THREADS GLOO_SOCKET_IFNAME TORCH_EXTENSIONS_DIR HF_HOME; do
    if [[ -n "${!var:-}" ]]; then echo "$var=${!var}" >>"$DS_ENV_FILE"; fi
  done
  "${DEEPSPEED:-deepspeed}" "${args[@]}" --module llm pretrain "$@"
  exit $?
fi
exec "${DEEPSPEED:-deepspeed}" "${args[@]}" --module llm pretrain "$@"
