#!/usr/bin/env bash
# The one-GPU check, as one command from the repository root:
#     bash bench/gpu_check.sh --out "$OUT"       # or no --out: results/gpu/<date>-<gpu>/
#     bash bench/gpu_check.sh --dry-run          # list the checks, run nothing
# Without a CUDA GPU: one line, exit 0, nothing installed or run. With one: installs this project
# offline into the Python that has the CUDA torch (pip --no-deps --no-build-isolation --no-index
# -e ., unless it is installed from here already), then `python -m dist_ortho.testing.gpu_check`: every
# check in its own process with its own time budget (400 s in all), summary.md and json files
# under the output folder, exit 1 if any check failed. The GPU machine brings torch with CUDA;
# without one, install the project's version (the torch== line of constraints-cpu.txt) from the
# CUDA wheel index first: pip install torch==<version> --index-url https://download.pytorch.org/whl/cu1XX
# PYTHON selects the interpreter (default: the README's .venv where there is one, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi

installed_here() {
    "$PY" -c 'import sys, dist_ortho.strategies as s, pathlib
sys.exit(0 if pathlib.Path(s.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve()) else 1)' \
        >/dev/null 2>&1
}

install() {
    installed_here && return 0
    echo "gpu_check: installing this project offline into $("$PY" -c 'import sys; print(sys.prefix)')"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || {
        echo "gpu_check: error: offline install failed (pip install --no-deps --no-build-isolation --no-index -e .)"
        exit 2
    }
}

for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then  # lists, installs nothing
        installed_here || echo "gpu_check: would first install this project offline:" \
            "$PY -m pip install --no-deps --no-build-isolation --no-index -e ."
        if "$PY" -c 'import dist_ortho.testing.gpu_check' >/dev/null 2>&1; then
            exec "$PY" -m dist_ortho.testing.gpu_check "$@"
        fi
        echo "gpu_check: error: listing the checks needs dist_ortho importable by $PY; install it" \
            "first (README) or set PYTHON"
        exit 2
    fi
done

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU visible to $PY's torch; nothing to check (exit 0)"
    exit 0
fi
install
exec "$PY" -m dist_ortho.testing.gpu_check "$@"
