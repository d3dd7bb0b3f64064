# Sourced by setup.sh and build-criu.sh: apt_missing PKG... prints the packages of the list that are
# not installed (one line, space-separated; empty when all are).
apt_missing() {
    local p missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    echo "${missing[*]}"
}
