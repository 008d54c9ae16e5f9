#!/usr/bin/env bash
# Installs Debian's chromium for the end-to-end tests of `osdiff serve` (Playwright drives it;
# Playwright's own browser download is not used). Does nothing if chromium is already there.
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_browser.sh: not root and no sudo: install Debian's chromium by hand (apt-get install chromium)" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "install_browser.sh: no apt-get: install chromium by hand and set OSDIFF_CHROMIUM=/path/to/chromium" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q chromium >/dev/null \
  || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
