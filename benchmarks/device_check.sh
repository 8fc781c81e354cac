#!/usr/bin/env bash
# The GPU check, in one go and under 8 minutes on a CUDA machine (not run in CI: there is no GPU there):
#   1. the parity tests (calm's never-exit output = transformers' greedy generate) on cuda;
#   2. bench rows on cuda: full, fixed:15, the knob (speed 0.5) and lossless, batch 1 and 32, dynamic and
#      static+compile (benchmarks/device_check.py), into benchmarks/results/device_check_smollm2.{json,md}.
# Where there is no CUDA device it prints one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "device check skipped: no CUDA device (torch.cuda.is_available() is False)"
    exit 0
fi
CALM_TEST_DEVICE=cuda timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_parity.py
timeout 330 "$PY" benchmarks/device_check.py --device cuda --out benchmarks/results "$@"
