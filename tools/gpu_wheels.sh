#!/usr/bin/env bash
# Run here, on the CPU machine, before the GPU call: the Python 3.12 manylinux wheels of what the GPU image lacks
# (pycocotools, fvcore, submitit and what they need that it lacks), at the versions installed here, into .whl/
# (git-ignored), which the call carries; tools/gpu_check.sh installs them there.  Logic: pipeline/gpu_wheels.py.
#
#   tools/gpu_wheels.sh [DIR] [--list]      (PYTHON=... the project's interpreter; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m pipeline.gpu_wheels "$@"
