#!/usr/bin/env bash
# Installs everything (as setup.sh --dev) and runs the test suite against real sandboxes: ruff, mypy, pytest
# (the Python SDKs), then node's test runner (the JavaScript SDKs, tests/js).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
VENV=${SANDBOXD_VENV:-/opt/sandboxd/venv}
"$VENV/bin/ruff" check src tests bench
"$VENV/bin/mypy"  # the packages under src/sandboxd (pyproject.toml [tool.mypy])
status=0
"$VENV/bin/pytest" "$@" || status=$?
if [ $# -eq 0 ]; then  # the whole suite: the JavaScript SDK tests too
    if node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=18)?0:1)'; then
        (cd tests/js && node --test --test-concurrency=1) || status=$?
    else
        echo "test.sh: node $(node --version) is older than 20.18: the JavaScript SDK tests (tests/js) need a newer node" >&2
        status=1
    fi
fi
exit $status
