#!/usr/bin/env bash
# One run across several nodes. Start this script on every node with the same NNODES and
# RDZV_ENDPOINT (host:port of node 0, reachable from all nodes) and a distinct NODE_RANK:
#   node 0:  NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 launch/multinode.sh launch/configs/llama8b_gpu.yaml
#   node 1:  NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=node0:29500 launch/multinode.sh launch/configs/llama8b_gpu.yaml
# torchrun's flags: --nnodes (node count), --node_rank (this node), --nproc_per_node (ranks
# here, one per GPU), --rdzv_backend=c10d --rdzv_endpoint (where the nodes meet; node 0 hosts the
# store) and --rdzv_id (a job id shared by all nodes, so two jobs never join each other).
# Output goes to output.dir on node 0's filesystem: point it at shared storage.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# the repo's .venv when there is one, else python3 on PATH; override with PYTHON=...
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
CONFIG=${1:?usage: launch/multinode.sh CONFIG.yaml [--set key=value]... [-o OUT]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
# every node checks the config the same way before torchrun starts (a bad key: one line, exit 2)
WORLD_SIZE=$((NNODES * NPROC)) "$PYTHON" -m dist_ortho run "$CONFIG" "$@" --check
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-dist_ortho}" \
  -m dist_ortho run "$CONFIG" "$@"
