#!/usr/bin/env bash
# Set up (if needed) and run the whole demo pipeline on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/moeharden demo --out "${1:-demo-out}"
