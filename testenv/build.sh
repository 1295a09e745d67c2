#!/usr/bin/env bash
# Builds every component of the local test environment from the registries into
# a cache outside the repository, one directory per component keyed by a hash of
# its pinned inputs, and writes target/testenv.env (absolute paths) for the
# Rust harness, `make cluster` and the demo. A second run finds everything
# cached and takes seconds.
#
#   testenv/build.sh
#
# Environment: REKEY_CACHE_DIR (default ~/.cache/rekey).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
# shellcheck source=versions.env
source "$here/versions.env"
cache_root="${REKEY_CACHE_DIR:-$HOME/.cache/rekey}"
# Go 1.26 builds every pinned module. Should a bump need a newer Go, the one
# allowed way is GOTOOLCHAIN=go1.27.3 (fetched through the Go module proxy).
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0

log() { printf '[testenv %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# key FILE... : short hash of the given inputs (files or literal strings).
key() {
  local item
  for item in "$@"; do
    if [[ -f "$item" ]]; then cat "$item"; else printf '%s\n' "$item"; fi
  done | sha256sum | cut -c1-16
}

# component NAME KEY BUILD_FUNCTION : runs BUILD_FUNCTION into a fresh
# directory unless NAME-KEY is cached; prints the directory.
component() {
  local name="$1" k="$2" fn="$3" dir="$cache_root/$1-$2"
  if [[ ! -f "$dir/.complete" ]]; then
    log "building $name (cache $dir)"
    rm -rf "$dir.partial"
    mkdir -p "$dir.partial/bin"
    local start=$SECONDS
    "$fn" "$dir.partial" >&2
    touch "$dir.partial/.complete"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
    log "built $name in $((SECONDS - start))s"
  fi
  echo "$dir"
}

build_kube() {
  local out="$1" minor="${K8S_VERSION#v1.}"
  minor="${minor%%.*}"
  local ldflags="-s -w \
    -X k8s.io/component-base/version.gitVersion=${K8S_VERSION} \
    -X k8s.io/component-base/version.gitMajor=1 \
    -X k8s.io/component-base/version.gitMinor=${minor} \
    -X k8s.io/component-base/version.gitTreeState=clean \
    -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
    -X k8s.io/client-go/pkg/version.gitVersion=${K8S_VERSION} \
    -X k8s.io/client-go/pkg/version.gitMajor=1 \
    -X k8s.io/client-go/pkg/version.gitMinor=${minor}"
  (
    cd "$here/go"
    go build -trimpath -ldflags "$ldflags" -o "$out/bin/kube" ./cmd/kube
    for tool in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
      ln -s kube "$out/bin/$tool"
    done
    go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" \
      -o "$out/bin/etcd" go.etcd.io/etcd/server/v3
    go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION}" \
      -o "$out/bin/kwok" sigs.k8s.io/kwok/cmd/kwok
  )
}

# kwok ships its default behaviours ("stages") as YAML beside its code, not in
# the binary: collect the fast node and pod stages from the module cache.
build_kwok_stages() {
  local out="$1" src
  src="$(cd "$here/go" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"
    cat "$src/$f"
  done > "$out/kwok-stages.yaml"
}

build_eso() {
  local out="$1"
  (
    cd "$here/eso"
    go build -trimpath -ldflags "-s -w" -o "$out/bin/external-secrets" github.com/external-secrets/external-secrets
    local src
    src="$(go list -m -f '{{.Dir}}' github.com/external-secrets/external-secrets)"
    mkdir -p "$out/crds"
    cp "$src/deploy/crds/bundle.yaml" "$out/crds/bundle.yaml"
    chmod 644 "$out/crds/bundle.yaml"
  )
}

# moto's server mode emulates AWS Secrets Manager (PyPI `moto[server]`).
build_moto() {
  local out="$1"
  python3 -m venv "$out/venv"
  "$out/venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==${MOTO_VERSION}"
  # Not the venv's own script: its shebang names the .partial directory.
  printf '#!/bin/sh\nexec "$(dirname "$0")/../venv/bin/python" -m moto.server "$@"\n' > "$out/bin/moto_server"
  chmod +x "$out/bin/moto_server"
}

# Keycloak's server distribution from Maven Central, unpacked. It runs on the
# JDK >= 21 that testenv/java21.sh finds (written to testenv.env).
build_keycloak() {
  local out="$1"
  mvn -q -B dependency:copy "-Dartifact=org.keycloak:keycloak-quarkus-dist:${KEYCLOAK_VERSION}:zip" "-DoutputDirectory=$out"
  (cd "$out" && unzip -q "keycloak-quarkus-dist-${KEYCLOAK_VERSION}.zip" && rm "keycloak-quarkus-dist-${KEYCLOAK_VERSION}.zip" \
    && mv "keycloak-${KEYCLOAK_VERSION}" keycloak)
}

build_helm() {
  local out="$1"
  (cd "$here/helm" && go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
    -o "$out/bin/helm" helm.sh/helm/v3/cmd/helm)
}

# Judges objects as Flux (kstatus) and Argo CD (a health.lua) do; see health/main.go.
build_health() {
  local out="$1"
  (cd "$here/health" && go build -trimpath -ldflags "-s -w" -o "$out/bin/health" .)
}

# promtool checks and unit-tests the chart's alerting rules (tests/it/alerts.rs).
# The Prometheus version is the one in promtool/go.mod.
build_promtool() {
  local out="$1"
  (
    cd "$here/promtool"
    local version
    version="$(go list -m -f '{{.Version}}' github.com/prometheus/prometheus)"
    go build -trimpath -ldflags "-s -w -X github.com/prometheus/common/version.Version=${version}" \
      -o "$out/bin/promtool" github.com/prometheus/prometheus/cmd/promtool
  )
}

want=(kube kwok-stages eso moto keycloak helm health promtool)

mkdir -p "$cache_root" "$repo/target"
envfile="$repo/target/testenv.env"
declare -A dirs=()
for c in "${want[@]}"; do
  case "$c" in
    kube) dirs[kube]="$(component kube "$(key "$K8S_VERSION $ETCD_VERSION $KWOK_VERSION" "$here/go/go.mod" "$here/go/go.sum" "$here/go/cmd/kube/main.go" "$(declare -f build_kube)")" build_kube)" ;;
    kwok-stages) dirs[kwok-stages]="$(component kwok-stages "$(key "$KWOK_VERSION" "$(declare -f build_kwok_stages)")" build_kwok_stages)" ;;
    eso)  dirs[eso]="$(component eso "$(key "$ESO_VERSION" "$here/eso/go.mod" "$here/eso/go.sum" "$(declare -f build_eso)")" build_eso)" ;;
    moto) dirs[moto]="$(component moto "$(key "$MOTO_VERSION" "$(declare -f build_moto)")" build_moto)" ;;
    keycloak) dirs[keycloak]="$(component keycloak "$(key "$KEYCLOAK_VERSION" "$(declare -f build_keycloak)")" build_keycloak)" ;;
    helm) dirs[helm]="$(component helm "$(key "$HELM_VERSION" "$here/helm/go.mod" "$here/helm/go.sum" "$(declare -f build_helm)")" build_helm)" ;;
    health) dirs[health]="$(component health "$(key "$here/health/go.mod" "$here/health/go.sum" "$here/health/main.go" "$(declare -f build_health)")" build_health)" ;;
    promtool) dirs[promtool]="$(component promtool "$(key "$here/promtool/go.mod" "$here/promtool/go.sum" "$(declare -f build_promtool)")" build_promtool)" ;;
    *) echo "unknown component $c" >&2; exit 2 ;;
  esac
done

{
  echo "# Written by testenv/build.sh; absolute paths of the test environment's parts."
  [[ -n "${dirs[kube]:-}" ]] && echo "REKEY_KUBE_BIN=${dirs[kube]}/bin"
  [[ -n "${dirs[kwok-stages]:-}" ]] && echo "REKEY_KWOK_STAGES=${dirs[kwok-stages]}/kwok-stages.yaml"
  [[ -n "${dirs[eso]:-}" ]] && echo "REKEY_ESO_BIN=${dirs[eso]}/bin/external-secrets" && echo "REKEY_ESO_CRDS=${dirs[eso]}/crds/bundle.yaml"
  [[ -n "${dirs[moto]:-}" ]] && echo "REKEY_MOTO_SERVER=${dirs[moto]}/bin/moto_server"
  [[ -n "${dirs[keycloak]:-}" ]] && echo "REKEY_KEYCLOAK_HOME=${dirs[keycloak]}/keycloak" \
    && echo "REKEY_JAVA_HOME=$("$here/java21.sh")"
  [[ -n "${dirs[helm]:-}" ]] && echo "REKEY_HELM=${dirs[helm]}/bin/helm"
  [[ -n "${dirs[health]:-}" ]] && echo "REKEY_HEALTH_BIN=${dirs[health]}/bin/health"
  [[ -n "${dirs[promtool]:-}" ]] && echo "REKEY_PROMTOOL=${dirs[promtool]}/bin/promtool"
  echo "REKEY_K8S_VERSION=${K8S_VERSION}"
} > "$envfile"
log "environment ready: $envfile"
