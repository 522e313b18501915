#!/usr/bin/env bash
# `llm pretrain` under torchrun: one rank per GPU on this node; run the same command on every node for several.
#
#   launch/torchrun.sh configs/recipes/gpt.yaml                                  # every GPU on this node
#   NPROC_PER_NODE=2 launch/torchrun.sh configs/recipes/gpt.yaml                 # two ranks (on CPU too: gloo)
#   # two nodes: on node 0 and node 1 respectively
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 launch/torchrun.sh configs/recipes/gpt.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-001 launch/torchrun.sh configs/recipes/gpt.yaml
#
# Environment: NPROC_PER_NODE (default: all GPUs, 1 without), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), TORCHRUN (the launcher).
set -euo pipefail

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
else
  gpus=1
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

exec "${TORCHRUN:-torchrun}" \
  --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" \
  --nproc_per_node "${NPROC_PER_NODE:-$gpus}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" \
  -m llm pretrain "$@"
