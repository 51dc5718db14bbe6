#!/usr/bin/env bash
# Issue 21's GPU check: Easel's CUDA path measured against stock diffusers, in under 8 minutes.
#
#   bash scripts/gpu_wheels.sh                       # here, once: bench/wheels/ (ignored)
#   device run, carry ["bench/wheels"]: bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --dry-run                # here: tiny models on the CPU, ~1 minute
#
# Writes report.md and report.json (and one sec-*.json / sec-*.log per section) to $OUT, or to a
# temp folder when OUT is unset. Each section is its own process under its own `timeout`: one that
# fails or hangs is recorded as such and the rest still run. Exit status 0 only when all are ok.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$(mktemp -d /tmp/easel-gpu-check-out.XXXXXX)}"
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/easel-gpu-check.XXXXXX)}"
mkdir -p "$OUT" "$WORK"
START=$(date +%s)
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"  # whatever happens, the sections stop by START + this
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$DRY" = 1 ]; then
    PY="${PYTHON:-$ROOT/venv/bin/python}"
    [ -x "$PY" ] || PY=python3
    FLAG=--dry-run
    # section: seconds (tiny models on the CPU)
    LIMITS="env:60 sd15:60 sdxl:60 ladder-8gb:60 ladder-4gb:60 lora:60 hires:60 esrgan:60 inpaint:60"
else
    PY="${PYTHON:-python3}"
    FLAG=
    SITE="$WORK/site"
    # No network there: only the carried wheels, into a target folder (the image's own packages stay).
    if ! timeout 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --find-links "$ROOT/bench/wheels" --target "$SITE" "$ROOT"/bench/wheels/*.whl >"$OUT/pip.log" 2>&1; then
        echo "wheel install failed (did scripts/gpu_wheels.sh run, and is bench/wheels carried?):" >&2
        tail -5 "$OUT/pip.log" >&2
    fi
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.txt" 2>&1 || true
    # 8 minutes in all (the limits sum to 440 s, the wheel install is capped at 30 s); each model
    # is built by the first section that needs it (sd15, sdxl, inpaint), inside that one's limit.
    LIMITS="env:20 sd15:90 sdxl:120 ladder-8gb:50 ladder-4gb:35 lora:35 hires:30 esrgan:30 inpaint:30"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

for item in $LIMITS; do
    name="${item%%:*}"; limit="${item##*:}"
    left=$(( START + BUDGET_S - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "skipped: the ${BUDGET_S} s budget was spent" >"$WORK/sec-$name.status"
        echo "[$name] skipped: out of time"
        continue
    fi
    timeout --kill-after=5 "$limit" "$PY" bench/gpu_check.py --section "$name" --work "$WORK" $FLAG \
        >"$WORK/sec-$name.log" 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "timed out after ${limit} s" >"$WORK/sec-$name.status"
    elif [ ! -f "$WORK/sec-$name.json" ]; then
        echo "crashed, exit $rc: $(tail -c 300 "$WORK/sec-$name.log" | tr '\n' ' ')" >"$WORK/sec-$name.status"
    fi
    grep -E "^\[$name\]" "$WORK/sec-$name.log" || echo "[$name] failed: $(cat "$WORK/sec-$name.status" 2>/dev/null)"
done
"$PY" bench/gpu_check.py --report --work "$WORK" --out "$OUT" >/dev/null
rc=$?
# Logs of the sections that failed come back too (the device tool returns at most 8 files).
cat "$WORK"/sec-*.log >"$OUT/sections.log" 2>/dev/null
echo "report: $OUT/report.md ($(( $(date +%s) - START )) s)"
exit $rc
