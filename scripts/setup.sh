#!/usr/bin/env bash
# Create .venv and install lmforge with every extra.
# torch==2.13.0 is installed first when no torch is present: a bare `torch` requirement on a fresh venv
# would resolve to a multi-GB CUDA build, while the pinned CPU wheel is found on local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    "$VPY" -m pip install -q "torch==2.13.0"
fi
"$VPY" -m pip install -q -e ".[${LMFORGE_EXTRAS:-all}]"
echo "lmforge installed in $(pwd)/.venv"
