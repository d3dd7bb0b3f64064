#!/usr/bin/env bash
# Builds CRIU 4.2.1 (checkpoint/restore: pause to disk) from Debian's source archive, once, into
# $DATA_DIR/tools/criu-4.2.1/criu. Debian bookworm's criu 3.17 fails on kernels from 6.13 on (the vDSO
# is split in three mappings: checkpoint-restore/criu#2532), newer binary packages need a newer glibc;
# the upstream source that Debian packages builds on bookworm in about a minute. 4.2, not trixie's 4.1.1:
# 4.1.1 cannot dump an open TCP or UDP socket on kernels from 6.16 on ("Can't get 1:16 opt: Operation not
# supported", fixed in 4.2), and a sandbox's services and the code interpreter's kernels hold such sockets.
#   bash scripts/build-criu.sh            # prints the path of the built criu
set -euo pipefail

VERSION=4.2.1
# from Debian sid's Sources index (main/source/Sources.xz: criu 4.2.1-1, Checksums-Sha256)
SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
MIRROR=${SANDBOXD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DATA_DIR=${SANDBOXD_DATA_DIR:-/var/lib/sandboxd}
# sandboxd's changes to CRIU (below): a new build number rebuilds every cached criu
BUILD=sbx6
DEST=$DATA_DIR/tools/criu-$VERSION-$BUILD
step() { printf '==> %s\n' "$*" >&2; }

if [ -x "$DEST/criu" ] && "$DEST/criu" --version 2>/dev/null | grep -q "Version: $VERSION"; then
    step "criu $VERSION: built already ($DEST/criu)"
    echo "$DEST/criu"
    exit 0
fi

DEPS=(libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler python3-protobuf libnl-3-dev
      libnl-route-3-dev libnet1-dev libcap-dev pkg-config libbsd-dev libnftables-dev libgnutls28-dev uuid-dev
      libaio-dev build-essential xz-utils curl)
source "$(dirname "$0")/apt-missing.sh"
read -r -a missing <<<"$(apt_missing "${DEPS[@]}")"
if [ ${#missing[@]} -gt 0 ]; then
    step "criu: apt-installing its build dependencies: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/criu-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tarball=criu_$VERSION.orig.tar.xz
step "criu: downloading $tarball from Debian's archive"
curl -fsS --retry 3 -o "$work/$tarball" "$MIRROR/pool/main/c/criu/$tarball"
echo "$SHA256  $work/$tarball" | sha256sum --check --quiet || {
    echo "build-criu.sh: $tarball does not have the sha256 Debian's index gives ($SHA256)" >&2
    exit 1
}
tar -xJf "$work/$tarball" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'criu*' | head -n1)
# patch_criu FILE MARKER PERL-ARGS...: one change to CRIU's source (perl -0pi), checked to have taken
patch_criu() {
    local file=$1 marker=$2
    shift 2
    perl -0pi "$@" "$src/$file"
    grep -q "$marker" "$src/$file" || {
        echo "build-criu.sh: $file is not what the patch expects" >&2
        exit 1
    }
}
# Run --unprivileged (as the sandbox's own uid, so that the restored user namespace is the sandbox's: see
# docs/architecture.md), CRIU's restorer does not set SECURE_NO_SETUID_FIXUP before it gives a task its ids
# back, so a task of a non-root user loses its capabilities at setresuid and cannot set its gids ("Unable to
# set real, effective and saved group ID"). A restored task is root of its own user namespace, with
# CAP_SETPCAP there: it may always set the bit.
step "criu: patching criu/pie/restorer.c (securebits for tasks of non-root users under --unprivileged)"
patch_criu criu/pie/restorer.c "sandboxd: always" -e \
    's/\tif \(!uid\) \{\n(\t\tret = sys_prctl\(PR_SET_SECUREBITS, 1 << SECURE_NO_SETUID_FIXUP)/\t(void)uid; { \/* sandboxd: always (see build-criu.sh) *\/\n$1/'
# Run --unprivileged, CRIU dumps no cgroup sets and leaves the restored tree in its own cgroup namespace (the
# host's): the sandbox would see the host's cgroup paths, and a second checkpoint fails (that namespace is not
# the sandbox user namespace's). A tree restored into a user namespace of its own gets a cgroup namespace of its
# own too (its dump records none, --unprivileged: the cgroup namespace is not in the dumped namespace mask), made
# by the restored root task as root of that user namespace, at the cgroups the caller put it in (the sandbox's).
step "criu: patching criu/cgroup.c (a cgroup namespace for the restored tree under --unprivileged)"
patch_criu criu/cgroup.c "sandboxd: see build-criu.sh" -e \
    's/(int prepare_cgroup_namespace\(struct pstree_item \*root_task\)\n\{\n\tCgSetEntry \*se;\n\n)/$1\t\/* sandboxd: see build-criu.sh *\/\n\tif (opts.unprivileged && (root_ns_mask & CLONE_NEWUSER)) {\n\t\tif (unshare(CLONE_NEWCGROUP) < 0) {\n\t\t\tpr_perror("couldn\x27t unshare cgns");\n\t\t\treturn -1;\n\t\t}\n\t\treturn 0;\n\t}\n\n/'
# A restored task's memory belongs to the user namespace CRIU ran in (the host's: restored tasks are forked, never
# exec'd), so the sandbox's init, not dumpable, cannot be looked at from inside the sandbox's user namespace: the
# dump's check that the sandbox's namespaces belong to its user namespace, made from inside it, failed on a
# restored sandbox ("Can't open PID/ns/ipc: Permission denied"). The check opens them first, then enters.
step "criu: patching criu/namespaces.c (the user namespace check of a restored tree)"
patch_criu criu/namespaces.c "sandboxd: the namespaces are opened" "$(dirname "$0")/criu/check-user-ns.pl"
# A unix socket bound on the sandbox's root (an overlay) looked deleted to the dump (the overlay's device number is
# not the one of the filesystem below it, which the socket reports): the restore took its path away ("ghost"), so
# nothing could connect to it again, and the next dump failed (the code interpreter's kernels listen on such sockets).
step "criu: patching criu/mount.c and criu/sk-unix.c (unix sockets bound on an overlay)"
patch_criu criu/include/mount.h "phys_stat_on_overlay" -e \
    's/(extern bool phys_stat_dev_match\([^\n]*\n)/$1extern bool phys_stat_on_overlay(struct ns_id *, const char *path);\n/'
patch_criu criu/mount.c "sandboxd: on an overlay" "$(dirname "$0")/criu/overlay-path.pl"
patch_criu criu/sk-unix.c "sandboxd: overlay" "$(dirname "$0")/criu/unix-on-overlay.pl"
# Established TCP connections (between the sandbox's own processes: a kernel and its server, an app and its
# database) are dumped and restored with TCP repair, which only a holder of CAP_NET_ADMIN over the sandbox's
# network namespace may turn on or off; that namespace is owned by the host's user namespace (the server makes
# it), and the restored tasks are in the sandbox's: their own tries fail ("Can't turn TCP repair mode ON:
# Operation not permitted"). CRIU's usernsd turns it on for them, CRIU itself off at the end (see the .pl files).
step "criu: patching soccr/soccr.c, criu/sk-tcp.c and criu/cr-restore.c (TCP repair for restored tasks)"
patch_criu soccr/soccr.h "libsoccr_set_repair" -e \
    's/(#include "common\/config.h"\n)/$1\nextern int (*libsoccr_set_repair)(int fd, int on); \/* sandboxd *\/\n/'
patch_criu soccr/soccr.c "sandboxd: TCP repair through" "$(dirname "$0")/criu/soccr-repair.pl"
patch_criu criu/sk-tcp.c "set_repair_through_usernsd" "$(dirname "$0")/criu/tcp-repair.pl"
patch_criu criu/include/sk-inet.h "rst_tcp_repair_off_for_tasks" -e \
    's/(extern void rst_unlock_tcp_connections\(void\);\n)/$1extern void rst_tcp_repair_off_for_tasks(void); \/* sandboxd *\/\n/'
patch_criu criu/cr-restore.c "rst_tcp_repair_off_for_tasks" -e \
    's/(\tnetwork_unlock\(\);\n)/$1\trst_tcp_repair_off_for_tasks(); \/* sandboxd: see build-criu.sh *\/\n/'
step "criu: make criu (about a minute on 2 cores; the log is $work/make.log until it ends)"
if ! make -C "$src" -j"$(nproc)" criu >"$work/make.log" 2>&1; then
    tail -n 40 "$work/make.log" >&2
    echo "build-criu.sh: building criu failed (above: the end of its log)" >&2
    exit 1
fi
mkdir -p "$DEST.new"
install -m 0755 "$src/criu/criu" "$DEST.new/criu"
rm -rf "$DEST"
mv "$DEST.new" "$DEST"  # complete or absent: an interrupted build is redone next time
# earlier builds (other versions or build numbers) are never used again
find "$DATA_DIR/tools" -mindepth 1 -maxdepth 1 -name 'criu-*' ! -name "criu-$VERSION-$BUILD" -exec rm -rf {} +
step "criu: $("$DEST/criu" --version | head -n1) in $DEST"
echo "$DEST/criu"
