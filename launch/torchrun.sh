#!/usr/bin/env bash
# `llm pretrain` under torchrun: one rank per GPU on this node; run the same command on every node for several.
#
#   launch/torchrun.sh configs/recipes/gpt.yaml                                  # every GPU on this node
#   NPROC_PER_NODE=2 launch/torchrun.sh configs/recipes/gpt.yaml                 # two ranks (on CPU too: gloo)
#   # two nodes: on node 0 and node 1 respectively
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 launch/torchrun.sh configs/recipes/gpt.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-001 launch/torchrun.sh configs/recipes/gpt.yaml
#   # or with c10d rendezvous (node ranks assigned as nodes join): the same command on every node
#   NNODES=2 RDZV_ENDPOINT=node-001:29400 RDZV_ID=job42 launch/torchrun.sh configs/recipes/gpt.yaml
#
# Environment: NPROC_PER_NODE (default: all GPUs, 1 without), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), RDZV_ENDPOINT (host:port: c10d rendezvous instead of
# MASTER_ADDR/NODE_RANK), RDZV_ID (default llm), TORCHRUN (the launcher).
set -euo pipefail

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | wc -l)
else
  gpus=1
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  # the agent on the endpoint's host serves the rendezvous store; the others join it
  rdzv=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-llm}")
else
  rdzv=(--node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi

exec "${TORCHRUN:-torchrun}" \
  --nnodes "${NNODES:-1}" \
  --nproc_per_node "${NPROC_PER_NODE:-$gpus}" \
  "${rdzv[@]}" \
  -m llm pretrain "$@"
