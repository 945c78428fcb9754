#!/usr/bin/env bash
# Install Langchain-Chatchat 0.3.1.3's own WebUI client (ApiRequest in
# chatchat/webui_pages/utils.py) into its own virtualenv, for the WebUI integration test
# (tests/integration/test_chatchat_webui.py).
#
# Only the client: the packages its imports need, pinned in chatchat-client-requirements.txt
# beside this script (httpx 0.27: 0.28 dropped the `proxies=` argument it passes), then the
# langchain-chatchat wheel itself with --no-deps (its full dependency set is the whole server:
# about 1 GB). Nothing of Chatchat is copied into this repository.
#
# Idempotent: when the venv already imports the client this is a one-second no-op. Prints the
# venv path as the last line of stdout.
#
# Environment:
#   CHATFLEET_CHATCHAT_CLIENT_VENV  venv path (default: ~/.cache/chatfleet/chatchat-client-0.3.1.3)
set -euo pipefail

CHATCHAT_VERSION="0.3.1.3"
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${CHATFLEET_CHATCHAT_CLIENT_VENV:-$HOME/.cache/chatfleet/chatchat-client-${CHATCHAT_VERSION}}"
PY="$VENV/bin/python"

log() { echo "install-chatchat-client: $*" >&2; }

# Importing the client writes Chatchat's settings files into CHATCHAT_ROOT: use a scratch one.
venv_ok() {
    [[ -x "$PY" ]] || return 1
    local root
    root="$(mktemp -d)"
    (cd "$root" && CHATCHAT_ROOT="$root" "$PY" -c "from chatchat.webui_pages.utils import ApiRequest" \
        >/dev/null 2>&1)
    local rc=$?
    rm -rf "$root"
    return $rc
}

if venv_ok; then
    log "already installed"
    echo "$VENV"
    exit 0
fi

if [[ ! -x "$PY" ]] || ! "$PY" -m pip --version >/dev/null 2>&1; then
    log "creating venv at $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
fi

log "installing langchain-chatchat==${CHATCHAT_VERSION}'s client (about 1 minute)"
"$PY" -m pip install --quiet --disable-pip-version-check -r "$HERE/chatchat-client-requirements.txt"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "langchain-chatchat==${CHATCHAT_VERSION}"

if ! venv_ok; then
    log "the client still fails to import:"
    root="$(mktemp -d)"
    (cd "$root" && CHATCHAT_ROOT="$root" "$PY" -c "from chatchat.webui_pages.utils import ApiRequest") >&2 || true
    exit 1
fi

log "installed"
echo "$VENV"
