#!/usr/bin/env bash
# One run on this node under torchrun.
#   launch/run.sh launch/configs/base.yaml                      # one rank per GPU (or 2 on CPU)
#   NPROC=4 launch/run.sh launch/configs/tiny.yaml --set strategy.name=balanced
# Everything after the config goes to `dist-ortho run` (--set key=value, -o OUT, ...). The config
# is checked here first (`--check`), so a mistake is one line and exit 2, before torchrun starts.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# the repo's .venv when there is one, else python3 on PATH; override with PYTHON=...
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
CONFIG=${1:?usage: launch/run.sh CONFIG.yaml [--set key=value]... [-o OUT]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORLD_SIZE=$NPROC "$PYTHON" -m dist_ortho run "$CONFIG" "$@" --check
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m dist_ortho run "$CONFIG" "$@"
