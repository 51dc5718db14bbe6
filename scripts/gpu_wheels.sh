#!/usr/bin/env bash
# Download the pure-Python wheels Easel's engine needs on the GPU machine (Python 3.12, torch 2.11,
# no network there) that its image lacks, into bench/wheels/ (git-ignored). bench/gpu_check.sh
# installs them there with `pip install --no-index --find-links bench/wheels`.
#
#   bash scripts/gpu_wheels.sh            # then: device run, carry ["bench/wheels"]
#
# The image already holds transformers, accelerate, peft, safetensors, huggingface-hub, numpy,
# pillow, regex, requests, filelock, einops, torchvision, opencv (KINDS.md): not fetched again.
# Never torch, nvidia-* or gradio. Kept well under the device tool's 64 MiB.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${GPU_WHEELS_DIR:-$ROOT/bench/wheels}"
PY="${PYTHON:-$ROOT/venv/bin/python}"
[ -x "$PY" ] || PY=python3
pin() {  # the exact version constraints.txt names, else $2
    local v
    v="$(grep -iE "^$1==" "$ROOT/constraints.txt" | head -1 | cut -d= -f3)"
    echo "${v:-$2}"
}
# diffusers (pinned in constraints.txt), the dependency of it the image lacks (importlib_metadata,
# which needs lazy-importer; the versions the venv here was tested with), and spandrel (ESRGAN
# loading, pinned too; its needs - einops, torchvision, typing_extensions - are in the image).
PACKAGES=(
    "diffusers==$(pin diffusers 0.42.1)"
    "importlib_metadata==10.2.0"
    "lazy-importer==0.1.0"
    "spandrel==$(pin spandrel 0.4.2)"
)
mkdir -p "$DEST"
for pkg in "${PACKAGES[@]}"; do
    "$PY" -m pip download -q --dest "$DEST" --python-version 3.12 --implementation py --abi none \
        --platform any --only-binary=:all: --no-deps "$pkg"
done
SIZE_KB=$(du -sk "$DEST" | cut -f1)
ls -1 "$DEST"
echo "bench/wheels: ${SIZE_KB} KiB"
if [ "$SIZE_KB" -gt $((60 * 1024)) ]; then
    echo "bench/wheels is over 60 MiB: the device tool carries at most 64 MiB in all" >&2
    exit 1
fi
