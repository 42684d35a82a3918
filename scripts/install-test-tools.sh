#!/usr/bin/env bash
# System tools the tests run for real: Prometheus and promtool (Debian package).
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package's service is not wanted: tests start their own servers on free ports.
$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
