#!/usr/bin/env bash
# `make gpu-check`: the paper-scale path on a GPU, one short script (see benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh                      # GPU: gpu tests, 0.5B-shape pretraining, 10k users x 10 queries
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu_check.sh   # anywhere: the same path, tiny sizes
# Non-zero exit and one line on any failure or mismatch; the figures land in $GPU_CHECK_OUT (results/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec "$PY" benchmarks/gpu_check.py "$@"
