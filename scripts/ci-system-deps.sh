#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Debian's chromium for the chat-page browser tests
# (driven by the python playwright package; `playwright install` is never used). Quick when present.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium
/usr/bin/chromium --version
