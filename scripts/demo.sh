#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the main job: baseline vs Perforated
# Backpropagation on scikit-learn's digits (offline, CPU, a few minutes). Extra arguments go to
# `pbp-fast demo` (e.g. --data ../shared/data/cifar10_jpeg_train.npz).
set -euo pipefail
cd "$(dirname "$0")/.."
PBP_EXTRAS=${PBP_EXTRAS:-demo} bash scripts/setup.sh
exec .venv/bin/pbp-fast demo "$@"
