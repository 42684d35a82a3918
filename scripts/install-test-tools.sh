#!/usr/bin/env bash
# Tools the tests run for real: Prometheus and promtool (Debian package), checkov.
set -euo pipefail
if ! { command -v prometheus >/dev/null && command -v promtool >/dev/null; }; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package's service is not wanted: tests start their own servers on free ports.
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
# checkov pins packaging<24, which pytest cannot share: it gets a venv of its own, where
# tests/test_ops_static.py finds it.
checkov_venv="${HOME}/.cache/slofleet/checkov-venv"
if [ ! -x "$checkov_venv/bin/checkov" ]; then
  python3 -m venv "$checkov_venv"
  "$checkov_venv/bin/pip" install -q 'checkov>=3.2,<4'
fi
