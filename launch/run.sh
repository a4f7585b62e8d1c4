#!/usr/bin/env bash
# One run on this node under torchrun.
#   launch/run.sh launch/configs/base.yaml                      # one rank per GPU (or 2 on CPU)
#   NPROC=4 launch/run.sh launch/configs/tiny.yaml --set strategy.name=balanced
# Everything after the config goes to dist_ortho.studies.run (e.g. --set key=value ...).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# the repo's .venv when there is one, else python3 on PATH; override with PYTHON=...
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
CONFIG=${1:?usage: launch/run.sh CONFIG.yaml [--set key=value ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  -m dist_ortho.studies.run --config "$CONFIG" "$@"
