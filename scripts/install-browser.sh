#!/usr/bin/env bash
# Install the headless browser the feature-page tests drive (tests/test_pages_browser.py): Debian's
# chromium and its chromedriver, plus the selenium client. Idempotent: what is present is left alone.
# Needs root (or sudo) for apt-get on a Debian/Ubuntu machine.
set -euo pipefail
PY=${PYTHON:-python3}

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if ! command -v chromedriver >/dev/null 2>&1 || ! { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # Debian names the packages chromium / chromium-driver; Ubuntu's apt names differ (snap), so fail loudly there.
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core
fi

"$PY" -c "import selenium" 2>/dev/null || "$PY" -m pip install --quiet "selenium>=4.10"

chromedriver --version
