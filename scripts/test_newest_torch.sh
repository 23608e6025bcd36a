#!/usr/bin/env bash
# The second environment: the newest torch this project is tested with, with torchvision and
# timm, in .venv-newest (PBP_NEWEST_TORCH / PBP_NEWEST_VISION override the versions). It builds
# the extension against that torch and runs the op tests and the real-model tests
# (tests/test_real_models.py: torchvision's and timm's models through convert, both phases,
# adoption, fold and ONNX), the Triton tests on the interpreter included. Extra arguments go to
# pytest.
#
#   bash scripts/test_newest_torch.sh
#
# CI runs it after scripts/test.sh. torch 2.14.1 is a 5.5 GB CUDA build (it runs on the CPU);
# the README's "Tested versions" says what the environment costs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-newest
TORCH=${PBP_NEWEST_TORCH:-torch==2.14.1}
VISION=${PBP_NEWEST_VISION:-torchvision==0.29.1}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VPY" -m pip install -q "$TORCH" "$VISION"
"$VPY" -m pip install -q timm setuptools wheel ninja numpy pillow pytest onnx onnxruntime \
    onnxscript scikit-learn
"$VPY" -m pip install -q --no-build-isolation --no-deps -e .
"$VPY" -c "import torch, torchvision, timm, pbp_fast; print('newest:', 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'timm', timm.__version__, pbp_fast.backends())"
exec "$VPY" -m pytest tests/test_ops.py tests/test_errors.py tests/test_candidate.py \
    tests/test_nn.py tests/test_convert.py tests/test_triton.py tests/test_real_models.py -q \
    -p no:cacheprovider "$@"
