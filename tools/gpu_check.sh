#!/usr/bin/env bash
# GPU acceptance run, one command, under 8 minutes on one H100/H200: the CUDA-marked tests (pytest -m cuda: bf16
# autocast, fp16 + GradScaler, fused AdamW, the SDPA flash path, --compile, nccl and FSDP with one process) and the
# pretraining benchmark with MFU (tools/benchmark.py --bench pretrain --baseline); writes OUT/gpu_check.json and a
# table (OUT/gpu_check.txt).  Exit status 0: accepted; 1: a test failed or skipped, or the benchmark failed;
# 2: no GPU.  Logic and limits: pipeline/gpu_check.py.
#
#   tools/gpu_check.sh [OUT]        (default OUT: runs/gpu_check; PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_check}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the stages have their own limits (300 s + 150 s); this one only guards the whole
exec timeout 480 "$PYTHON" -m pipeline.gpu_check --out "$OUT"
