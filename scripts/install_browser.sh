#!/usr/bin/env bash
# Debian's headless Chromium for the playground's browser test (tests/test_playground.py).
# Idempotent: returns at once when chromium and chromedriver are already installed.
# Never `playwright install`: the test drives this system browser through Playwright's executable_path.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
