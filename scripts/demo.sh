#!/usr/bin/env bash
# The README's first command: install, start `slofleet up` (built-in tiny sample), replay two
# minutes of the Azure conversation trace against it, print the report, stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
state=${SLOFLEET_STATE_DIR:-.slofleet/demo}
mkdir -p "$state"
.venv/bin/slofleet up --state-dir "$state" > "$state/up.log" 2>&1 &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
echo "starting the local fleet (2 vLLM CPU instances; about a minute) ..."
for _ in $(seq 600); do
  if grep -q "ready in" "$state/up.log"; then break; fi
  if ! kill -0 $up 2>/dev/null; then cat "$state/up.log"; exit 1; fi
  sleep 1
done
grep "ready in" "$state/up.log"
.venv/bin/slofleet status --state-dir "$state"
# Half the trace's rate: what two vLLM CPU instances of the tiny model serve within the SLO on 2 cores.
.venv/bin/slofleet replay --state-dir "$state" --trace azure-conv --start 600 --duration 120 --load 0.5 "$@"
