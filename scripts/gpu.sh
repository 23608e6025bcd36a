#!/usr/bin/env bash
# The GPU half of the project's checks and numbers, on a machine with a CUDA device and this
# project's Python environment (torch with CUDA, triton, pytest, pytest-benchmark):
#
#   bash scripts/gpu.sh build     # the C++ extension against the installed torch
#   bash scripts/gpu.sh tests     # every test, the CUDA ones included
#   bash scripts/gpu.sh kernels   # bench/test_gpu.py: ops, copy bandwidth, tile sweep
#   bash scripts/gpu.sh steps     # bench/test_step.py: eager, torch.compile, CUDA graphs
#   bash scripts/gpu.sh report    # the JSON results -> the GPU tables of docs/benchmarks.md
#
# With no argument it runs all five in that order.  PYTHON selects the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"

stage() {
    case "$1" in
        build) "$PY" -m pip install --no-build-isolation --no-deps -e . -q ;;
        tests) "$PY" -m pytest tests -q ;;
        kernels) "$PY" -m pytest bench/test_gpu.py --benchmark-only -q \
                     --ratios-json bench/results/gpu_ops.json ;;
        steps) "$PY" -m pytest bench/test_step.py --benchmark-only -q \
                   --ratios-json bench/results/step_gpu.json ;;
        report) "$PY" bench/report.py bench/results/gpu_ops.json bench/results/step_gpu.json \
                    --readme docs/benchmarks.md ;;
        *) echo "unknown stage: $1 (build, tests, kernels, steps, report)" >&2; exit 2 ;;
    esac
}

if [ $# -eq 0 ]; then
    set -- build tests kernels steps report
fi
for s in "$@"; do
    echo "== $s"
    stage "$s"
done
