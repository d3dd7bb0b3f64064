#!/usr/bin/env bash
# Installs sandboxd and everything it needs on Debian 12, as root, and builds the default templates.
# Idempotent: a second run installs nothing new and reuses the cached template builds.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # + test and lint dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
VENV=${SANDBOXD_VENV:-/opt/sandboxd/venv}
DATA_DIR=${SANDBOXD_DATA_DIR:-/var/lib/sandboxd}

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (sandboxd creates namespaces, mounts and cgroups)" >&2
    exit 1
fi

step() { printf '\n==> %s\n' "$*" >&2; }

PKGS=(python3 python3-venv python3-dev build-essential libseccomp-dev mmdebstrap iproute2 util-linux procps
      ca-certificates curl nftables skopeo zstd)
# tests: dnsmasq is the DNS server of the tests' stand-in internet (tests/netlab.py); conntrack reads the
# kernel's connection table for the leak checks; docker-registry (the CNCF distribution server) is the OCI
# registry the template tests start on loopback; chromium is the browser (driven by Playwright) of the
# dashboard's test
[ $DEV = 1 ] && PKGS+=(dnsmasq-base conntrack docker-registry chromium)
# postgresql: the tests start their own servers (tests/pg.py), so the package makes no cluster of its own
# docker-compose (Debian's, no daemon needed) checks deploy/compose's file
[ $DEV = 1 ] && PKGS+=(postgresql docker-compose)
if [ $DEV = 1 ] && [ ! -d /etc/postgresql-common ]; then
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/sandboxd.conf
fi
source scripts/apt-missing.sh
read -r -a missing <<<"$(apt_missing "${PKGS[@]}")"
if [ ${#missing[@]} -gt 0 ]; then
    step "apt: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # the package's own registry service (all interfaces, :5000) is not wanted: tests start their own
    if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null; then
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
else
    step "apt: all ${#PKGS[@]} packages present"
fi

if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtualenv $VENV (Debian's /usr/bin/python3)"
    /usr/bin/python3 -m venv "$VENV"
fi
extra=""
[ $DEV = 1 ] && extra="[dev]"
step "pip: installing sandboxd$extra into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".$extra" 2>&1 | grep -v -e '^WARNING: Location' || true
ln -sf "$VENV/bin/sandboxd" /usr/local/bin/sandboxd
# node and npm build the web dashboard (and run the JavaScript SDK tests: npm e2b needs node >= 20.18)
if ! command -v npm >/dev/null; then
    step "apt: installing nodejs npm (the dashboard's build, the JavaScript SDK tests)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
fi
step "dashboard: $(bash scripts/build-dashboard.sh)"
if [ $DEV = 1 ]; then
    # The official JavaScript SDKs for tests/js (pinned by its package-lock.json).
    lock_sum=$(sha256sum tests/js/package-lock.json | cut -d' ' -f1)
    if [ "$(cat tests/js/node_modules/.sandboxd-lock 2>/dev/null)" != "$lock_sum" ]; then
        step "npm: installing the JavaScript SDKs into tests/js"
        (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
        echo "$lock_sum" > tests/js/node_modules/.sandboxd-lock
    else
        step "npm: the JavaScript SDKs in tests/js are current"
    fi
    # An older official SDK release (v1 create/connect paths), for tests/test_compat.py.
    OLD=${SANDBOXD_OLD_SDK_VENV:-/opt/sandboxd/venv-e2b-2.45}
    [ -x "$OLD/bin/python" ] || /usr/bin/python3 -m venv "$OLD"
    step "pip: e2b==2.45.1, e2b-code-interpreter==2.9.2 into $OLD (compatibility tests)"
    "$OLD/bin/pip" install -q --disable-pip-version-check e2b==2.45.1 e2b-code-interpreter==2.9.2 2>&1 \
        | grep -v -e '^WARNING: Location' || true
fi

# CRIU 4.x (checkpoint/restore, for pause to disk), built from Debian's source archive once, cached in the
# data dir: bookworm's criu 3.17 fails on this kernel
step "criu: $(SANDBOXD_DATA_DIR="$DATA_DIR" bash scripts/build-criu.sh)"
# made by the template builder through a server of their own (apt runs in the build's sandboxes, over the
# network); cached: built only when missing or when their recipe changed (about 1 + 2 minutes the first time)
step "templates: base, code-interpreter-v1, httpbin (cached in $DATA_DIR/templates)"
"$VENV/bin/sandboxd" template build base code-interpreter-v1 httpbin --data-dir "$DATA_DIR"
step "ready: start the server with 'sandboxd serve' (prints the API key and the E2B_* variables to export)"
