#!/usr/bin/env bash
# GPU acceptance run, one command, under 8 minutes on one H100/H200: the CUDA-marked tests (pytest -m cuda: bf16
# autocast, fp16 + GradScaler, fused AdamW, the SDPA flash path, --compile, nccl and FSDP with one process) and the
# pretraining benchmark with MFU (ours in bf16 vs the official recipe); writes into OUT at most 8 files: the verdict
# (gpu_check.json), the table (gpu_check.txt), the junit report (pytest.xml), the benchmark's numbers
# (benchmark.json) and the logs (setup.log, tests.log, benchmark.log).  Exit status 0: accepted; 1: a test failed or
# skipped, or the benchmark failed; 2: the run could not start (no GPU, no interpreter with torch, a missing
# package), in one line.  Logic and limits: pipeline/gpu_check.py; the call itself: README, "GPU acceptance".
#
#   tools/gpu_check.sh [OUT]        (default OUT: runs/gpu_check)
#
# The interpreter: $PYTHON if set, else the first of $GPU_CHECK_PYTHONS (default: .venv/bin/python python3 python)
# that imports torch.  Wheels in $GPU_WHEELS (default .whl, made by tools/gpu_wheels.sh) are installed with
# pip --no-index into a temporary target first, which goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT_S=480
OUT="${1:-runs/gpu_check}"
fail() { echo "error: $*" >&2; exit 2; }

mkdir -p "$OUT" || fail "cannot create the output folder $OUT"
LOG="$OUT/setup.log"
: >"$LOG"

if [ -n "${PYTHON:-}" ]; then
    candidates=("$PYTHON")
else
    read -r -a candidates <<<"${GPU_CHECK_PYTHONS:-.venv/bin/python python3 python}"
fi
PY=""
for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >>"$LOG" 2>&1; then PY="$c"; break; fi
    echo "python: $c does not import torch" >>"$LOG"
done
[ -n "$PY" ] || fail "no interpreter here imports torch (tried: ${candidates[*]}); set PYTHON to one that does"
PY="$(command -v "$PY")"
echo "python: $PY" | tee -a "$LOG"

WHEELS="${GPU_WHEELS:-.whl}"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
SITE=""
if [ ${#wheels[@]} -gt 0 ]; then
    SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")" || fail "cannot make a temporary folder"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1 \
        || fail "pip could not install the ${#wheels[@]} wheels of $WHEELS (see $LOG)"
    echo "wheels: ${#wheels[@]} from $WHEELS into $SITE" | tee -a "$LOG"
else
    echo "wheels: none in $WHEELS" | tee -a "$LOG"
fi
export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
# the stages have their own limits (300 s + 150 s) inside the run's (--time_limit); timeout guards the whole,
# the set-up above included
left=$((LIMIT_S - SECONDS))
timeout -k 10 "$left" "$PY" -m pipeline.gpu_check --out "$OUT" --time_limit $((left - 5))
rc=$?
[ -z "$SITE" ] || rm -rf "$SITE"
case $rc in 124 | 137) echo "gpu_check: stopped at the ${LIMIT_S} s limit (see $OUT)" >&2; exit 1 ;; esac
exit $rc
