#!/usr/bin/env bash
# `llm pretrain` under MPI: mpirun starts the ranks, DeepSpeed reads rank and world size through mpi4py.
#
#   NP=8 launch/mpirun.sh configs/recipes/gpt.yaml                               # eight ranks on this node
#   NP=16 HOSTFILE=hosts launch/mpirun.sh configs/recipes/gpt.yaml               # over the hosts of an MPI hostfile
#   NP=2 MPI_ARGS=--oversubscribe launch/mpirun.sh configs/recipes/gpt.yaml      # two CPU ranks (gloo)
#
# Environment: NP (ranks; default: all GPUs, 1 without), HOSTFILE (Open MPI format: `host slots=N`),
# MPI_PREFIX (the Open MPI installation other hosts run; default: the one mpirun comes from),
# MASTER_PORT (29500), MPI_ARGS (extra mpirun flags), MPIRUN, PYTHON.
set -euo pipefail

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
else
  gpus=1
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export MASTER_PORT=${MASTER_PORT:-29500}

args=(-n "${NP:-$gpus}" --bind-to none)
if [[ -n "${HOSTFILE:-}" ]]; then
  # Other hosts start Open MPI's daemon (prted/orted) from a bare ssh session: --prefix puts this installation's
  # bin/ and lib/ on their PATH and LD_LIBRARY_PATH (default: the directory above mpirun's bin/).
  mpirun_bin=$(command -v "${MPIRUN:-mpirun}")
  args+=(--hostfile "$HOSTFILE" --prefix "${MPI_PREFIX:-$(dirname "$(dirname "$mpirun_bin")")}")
fi
if [[ $EUID -eq 0 ]]; then args+=(--allow-run-as-root); fi
# Ranks on other nodes see only the variables passed with -x.
for var in PATH PYTHONPATH LD_LIBRARY_PATH MASTER_PORT DS_ACCELERATOR OMP_NUM_THREADS NCCL_DEBUG \
  NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME TORCH_EXTENSIONS_DIR HF_HOME; do
  if [[ -n "${!var:-}" ]]; then args+=(-x "$var"); fi
done
# shellcheck disable=SC2206  # MPI_ARGS is a list of flags
if [[ -n "${MPI_ARGS:-}" ]]; then args+=($MPI_ARGS); fi

exec "${MPIRUN:-mpirun}" "${args[@]}" "${PYTHON:-python}" -m llm pretrain "$@"
