#!/usr/bin/env bash
# Builds the web dashboard: dashboard/ (its sources; esbuild, xterm.js and uPlot from npm, pinned by its
# package-lock.json) bundled into src/sandboxd/dashboard/static/, which the server serves at /dashboard.
# Cached: rebuilt only when a source, the build script or the lock changed. Needs node and npm.
set -euo pipefail
cd "$(dirname "$0")/.."
out=src/sandboxd/dashboard/static
sum=$(cat dashboard/package-lock.json dashboard/build.mjs dashboard/src/* | sha256sum | cut -d' ' -f1)
if [ -f "$out/app.js" ] && [ "$(cat "$out/.build-sum" 2>/dev/null)" = "$sum" ]; then
    echo "current ($out)"
    exit 0
fi
(cd dashboard && npm ci --no-audit --no-fund --loglevel=error >&2 && node build.mjs >&2)
echo "$sum" > "$out/.build-sum"
echo "built into $out ($(du -sh "$out" | cut -f1))"
