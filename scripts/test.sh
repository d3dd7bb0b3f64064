#!/usr/bin/env bash
# Installs everything (as setup.sh --dev) and runs the test suite against real sandboxes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
VENV=${SANDBOXD_VENV:-/opt/sandboxd/venv}
"$VENV/bin/ruff" check src tests bench
exec "$VENV/bin/pytest" "$@"
