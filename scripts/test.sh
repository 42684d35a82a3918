#!/usr/bin/env bash
# The README's test command: install, check generated code and lint, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
scripts/install-test-tools.sh
.venv/bin/python proto/generate.py >/dev/null
git diff --exit-code -- proto/ || { echo "generated gRPC stubs drifted: run 'make proto' and commit"; exit 1; }
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a broken selection, not a pass.
if [ "$rc" = 5 ]; then echo "pytest collected no test"; exit 1; fi
exit "$rc"
