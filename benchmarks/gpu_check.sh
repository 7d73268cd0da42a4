#!/usr/bin/env bash
# Time one rollout group and one training step of each diffusers backend on a GPU machine
# (random weights at a reduced but realistic size; nothing downloaded). Needs the [diffusers] extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python benchmarks/gpu_check.py --device "${DEVICE:-cuda}" --size "${SIZE:-reduced}" "$@"
