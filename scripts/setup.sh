#!/usr/bin/env bash
# Create .venv (if needed) and install convscope with its test dependencies into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
# The report's browser test drives Debian's chromium; install it when this machine can.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium chromium-driver >/dev/null) || echo "setup: could not install chromium; the browser test will skip"
    else
        echo "setup: no chromium/chromedriver (apt-get install chromium chromium-driver); the browser test will skip"
    fi
fi
