#!/usr/bin/env bash
# Set up and run the pyops test suite (the README's test command; CI calls it too).
#   bash tests/run.sh            # everything that can run here (GPU tests skip without CUDA)
#   bash tests/run.sh -m gpu     # extra pytest arguments are passed through
# Without a GPU: the PyTorch references, the Triton kernels under TRITON_INTERPRET=1, opcheck,
# torch.compile, and compile-only nvcc/CMake builds of every CUDA source.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch is never pinned by the package (2.11+ works). Without an importable torch this installs
# torch==2.13.0 from your pip index; set PYOPS_TORCH_SPEC to choose another (e.g. a CUDA build).
if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "${PYOPS_TORCH_SPEC:-torch==2.13.0}"
fi
# Build against the torch already installed (no build isolation); test extras (triton for the
# interpreter, pytest, and the optional peers some tests compare with).
pip_install --no-build-isolation -e ".[test]"

set +e
"$PY" -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests -- treating that as a failure" >&2
  exit 1
fi
exit "$rc"
