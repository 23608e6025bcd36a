#!/usr/bin/env bash
# Set up a project-local virtual environment (.venv) and build pbp_fast into it.
#
# - A torch that is already importable (system-wide, or in an existing .venv) is kept as it is.
# - Otherwise torch is installed pinned (PBP_TORCH, default torch==2.13.0), so pip never picks
#   a newer multi-GB build by itself. On a Linux machine without a GPU, point pip at the CPU
#   wheels if your PyPI mirror does not serve them:
#     PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# - The extension is compiled against that torch (pip install --no-build-isolation -e .).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${PBP_TORCH:-torch==2.13.0}"
  "$VPY" -m pip install -q "${PBP_TORCH:-torch==2.13.0}"
fi
"$VPY" -m pip install -q setuptools wheel ninja numpy
extras=${PBP_EXTRAS:-test}
echo "setup: building pbp_fast (torch $("$VPY" -c 'import torch; print(torch.__version__)'))"
"$VPY" -m pip install -q --no-build-isolation -e ".[${extras}]"
"$VPY" -c "import pbp_fast; print('setup: pbp_fast backends:', pbp_fast.backends())"
