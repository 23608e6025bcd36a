#!/usr/bin/env bash
# The extension and its tests against another torch than scripts/test.sh's, each in a venv of
# its own (.venv-<profile>). Extra arguments go to pytest.
#
#   bash scripts/test_torch.sh newest   # torch 2.14.1 + torchvision 0.29.1 + timm: the op,
#                                       # Triton-interpreter and real-model tests (CI runs it)
#   bash scripts/test_torch.sh oldest   # torch 2.4.1, the declared minimum: the op and PB tests
#
# torch 2.14.1 is a 5.5 GB CUDA build (it runs on the CPU); 2.4.1 is a 3 GB CUDA build from
# PyPI. The README's "Tested versions" says what each costs.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:?usage: scripts/test_torch.sh newest|oldest [pytest arguments]}
shift
CORE_TESTS="tests/test_ops.py tests/test_errors.py tests/test_candidate.py tests/test_nn.py
            tests/test_convert.py tests/test_controller.py"
case "$PROFILE" in
  newest) PACKAGES="torch==2.14.1 torchvision==0.29.1 timm onnx onnxruntime onnxscript"
          TESTS="$CORE_TESTS tests/test_triton.py tests/test_real_models.py" ;;
  oldest) PACKAGES="torch==2.4.1 numpy<2"
          TESTS="$CORE_TESTS tests/test_pb_training.py" ;;
  *) echo "unknown profile: $PROFILE (newest, oldest)" >&2; exit 2 ;;
esac
VENV=.venv-$PROFILE
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# shellcheck disable=SC2086
"$VPY" -m pip install -q $PACKAGES setuptools wheel ninja numpy pillow pytest
# Built from a copy of the working tree, not in place: the checkout's own pbp_fast/_C and build/
# belong to .venv (scripts/setup.sh).
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$SRC"
"$VPY" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$SRC"
cd tests  # so that pbp_fast is the installed one, not the checkout's
"../$VPY" -c "import torch, pbp_fast; print('$PROFILE: torch', torch.__version__, \
'from', pbp_fast.__file__, pbp_fast.backends())"
# shellcheck disable=SC2086
"../$VPY" -m pytest ${TESTS//tests\//} -q -p no:cacheprovider "$@"
