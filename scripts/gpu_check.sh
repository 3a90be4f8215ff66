#!/usr/bin/env bash
# The GPU check of README.md (section "Benchmark"): a few minutes on one CUDA GPU, JSON to $OUT.
# Sets up the environment when it is missing (make install), then runs scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make install
OUT="${OUT:-outputs}" .venv/bin/python scripts/gpu_check.py "$@"
