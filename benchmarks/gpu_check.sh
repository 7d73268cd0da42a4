#!/usr/bin/env bash
# One training step of every method on every diffusers backend on a GPU machine: peak memory and
# s/step (random weights at real widths, 512² output; nothing downloaded). Needs the [diffusers] extra.
#   SIZE=reduced GROUP=8 MICRO=1 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/gpu_check.py --device "${DEVICE:-cuda}" --size "${SIZE:-full}" --group "${GROUP:-6}" \
    --micro-batch "${MICRO:-0}" --dtype "${DTYPE:-bf16}" --mixed-precision "${MP:-bf16}" "$@"
