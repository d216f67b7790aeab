#!/usr/bin/env bash
# The main job: set up (idempotent), then run the whole lifecycle demo. Arguments go to `lmforge demo`,
# e.g. `bash scripts/demo.sh --size small` or `bash scripts/demo.sh --no-serve --corpus my_docs.jsonl`.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo needs the core plus the data and serve extras; the test tools and Ray stay out (scripts/test.sh
# installs every extra into the same .venv).
LMFORGE_EXTRAS="${LMFORGE_EXTRAS:-data,serve}" bash scripts/setup.sh
exec .venv/bin/lmforge demo "$@"
