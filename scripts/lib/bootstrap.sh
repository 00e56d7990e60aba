# Sourced by scripts/test, scripts/demo, scripts/bench: installs what cowfs needs, idempotently.
#   System (Debian, apt): fuse3 libfuse3-dev pkg-config gcc python3-dev  (+ test peers when asked)
#   Python: a project-local environment in .dev-env with cowfs installed editable (+ test extra).
# Not root and something missing: one line naming the exact command to run, exit 1.
set -euo pipefail

COWFS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEV_ENV="$COWFS_ROOT/.dev-env"
PYTHON_BIN=${PYTHON:-python3}

# Packages needed to build pyfuse3 and to mount.
APT_BASE=(fuse3 libfuse3-dev pkg-config gcc)
# Peers and tools the test suite and benchmarks compare against (shellcheck: the lint test;
# git: the benchmark records the revision it measured, and its smoke test runs it; nginx:
# the static web server the remote tests serve a pushed store with).
APT_TEST=(fuse-overlayfs stress-ng fio attr ntfs-3g btrfs-progs xfsprogs shellcheck git nginx)

_missing_apt() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    echo "${missing[@]:-}"
}

ensure_apt() {
    command -v dpkg-query >/dev/null || { echo "cowfs: not a Debian-like system; install the equivalents of: $*" >&2; return 0; }
    local missing
    missing=$(_missing_apt "$@")
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "cowfs: missing system packages; run: sudo apt-get install -y $missing" >&2
        exit 1
    fi
    echo "cowfs: installing system packages: $missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    apt-get install -y -qq $missing >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null
        # shellcheck disable=SC2086
        apt-get install -y -qq $missing >/dev/null
    }
}

ensure_python_env() {
    local extra=${1:-}
    local want
    want=$(cat "$COWFS_ROOT/pyproject.toml" "$COWFS_ROOT"/cowfs/fuse/_fuse_*.[ch] <(echo "$extra") | sha256sum | cut -c1-16)
    if [ -x "$DEV_ENV/bin/python" ] && [ "$(cat "$DEV_ENV/.stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    echo "cowfs: preparing the Python environment in $DEV_ENV" >&2
    [ -x "$DEV_ENV/bin/python" ] || "$PYTHON_BIN" -m venv "$DEV_ENV"
    local spec="$COWFS_ROOT"
    [ -n "$extra" ] && spec="${COWFS_ROOT}[${extra}]"
    local log="$DEV_ENV/install.log"
    "$DEV_ENV/bin/python" -m pip install -q --upgrade pip >"$log" 2>&1 || true
    if ! "$DEV_ENV/bin/python" -m pip install -q -e "$spec" >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "cowfs: installing the Python dependencies failed (full log: $log)" >&2
        exit 1
    fi
    echo "$want" > "$DEV_ENV/.stamp"
}

ensure_fuse_device() {
    if [ ! -e /dev/fuse ]; then
        echo "cowfs: /dev/fuse is missing; load the module (modprobe fuse) or run the container with --device /dev/fuse" >&2
        exit 1
    fi
}

export PATH="$DEV_ENV/bin:$PATH"
