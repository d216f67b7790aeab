#!/usr/bin/env bash
# The GPU check (see check.py): one table of training MFU, engine vs transformers decode, single-stream
# decode vs the bandwidth bound, and the CUDA-only paths. Finishes in under 8 minutes on one H200.
#   bash benchmarks/gpu/check.sh               # on a machine with a CUDA GPU (torch and transformers there)
#   bash benchmarks/gpu/check.sh --cpu-smoke   # tiny models on the CPU: a dry run
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu/check.py "$@"
