#!/usr/bin/env bash
# make demo: a full rotation on the local environment, phase by phase.
# Starts the cluster (if needed), installs the CRD, runs the operator, creates
# an ESO-synced Secret consumed by a Deployment, applies a SecretRotation and
# follows it until it ends. Exit 0 on Succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
ns=rekey-demo
./scripts/cluster.sh up >/dev/null
# shellcheck source=/dev/null
. .cluster/env
# shellcheck source=scripts/follow.sh
. scripts/follow.sh

say "cluster up: $(kubectl version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
kubectl apply --server-side --force-conflicts -f crds/secretrotation.yaml >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/secretrotations.rekey.dev >/dev/null
say "CRD secretrotations.rekey.dev installed"

# The operator, in the background (stopped by make cluster-down).
if [[ -f .cluster/rekey.pid ]]; then kill "$(cat .cluster/rekey.pid)" 2>/dev/null || true; fi
cargo build --quiet --locked --bin rekey --bin kubectl-rekey
nohup target/debug/rekey run --metrics-addr=127.0.0.1:9464 --poll=1s > .cluster/rekey.log 2>&1 &
echo $! > .cluster/rekey.pid
say "operator running (pid $(cat .cluster/rekey.pid), log .cluster/rekey.log, metrics http://127.0.0.1:9464/metrics)"

# A fresh demo namespace with the application side.
kubectl delete namespace $ns --ignore-not-found --wait=true >/dev/null
kubectl create namespace $ns >/dev/null
until kubectl -n $ns get serviceaccount default >/dev/null 2>&1; do sleep 0.2; done
initial="$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
kubectl -n $ns create secret generic ai-component-source --from-literal=client_secret="$initial" >/dev/null
kubectl config view --raw -o jsonpath='{.users[0].user.client-certificate-data}' | base64 -d > .cluster/eso.crt
kubectl config view --raw -o jsonpath='{.users[0].user.client-key-data}' | base64 -d > .cluster/eso.key
kubectl -n $ns create secret generic eso-auth --from-file=tls.crt=.cluster/eso.crt --from-file=tls.key=.cluster/eso.key >/dev/null
rm -f .cluster/eso.crt .cluster/eso.key
server="$(kubectl config view --raw -o jsonpath='{.clusters[0].cluster.server}')"
ca="$(kubectl config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
kubectl -n $ns apply -f - >/dev/null <<YAML
apiVersion: external-secrets.io/v1
kind: SecretStore
metadata: {name: cluster-secrets}
spec:
  provider:
    kubernetes:
      remoteNamespace: $ns
      server: {url: "$server", caBundle: "$ca"}
      auth:
        cert:
          clientCert: {name: eso-auth, key: tls.crt}
          clientKey: {name: eso-auth, key: tls.key}
YAML
kubectl -n $ns apply -f examples/demo/app.yaml >/dev/null
kubectl -n $ns wait --for=condition=Ready --timeout=60s externalsecret/app-creds >/dev/null
kubectl -n $ns rollout status deployment/ai-component --timeout=120s >/dev/null
say "namespace $ns: ExternalSecret app-creds synced, Deployment ai-component 3/3 available"

kubectl -n $ns apply -f examples/demo/secretrotation.yaml >/dev/null
say "SecretRotation ai-component-client-secret applied; following it:"
follow $ns ai-component-client-secret
echo
say "timeline (from the Events rekey emitted):"
kubectl -n $ns get events --field-selector involvedObject.name=ai-component-client-secret \
  --sort-by=.eventTime -o jsonpath='{range .items[*]}{.eventTime}{"  "}{.reason}{"  "}{.note}{.message}{"\n"}{end}' | sed 's/^/    /'
echo
kubectl -n $ns get secretrotation
echo
target/debug/kubectl-rekey -n $ns status ai-component-client-secret
echo
synced="$(kubectl -n $ns get secret app-creds -o jsonpath='{.data.client_secret}' | base64 -d)"
if [[ $result == Succeeded && $synced != "$initial" ]]; then
  say "Succeeded: ESO delivered a new value and ai-component rolled out on it (revisions: $(kubectl -n $ns get rs -l app=ai-component --no-headers | wc -l))."
else
  say "the rotation ended ${result:-without a result}; see: kubectl -n $ns describe secretrotation ai-component-client-secret"
fi
cat <<TXT

Look around:
  . .cluster/env
  kubectl -n $ns describe secretrotation ai-component-client-secret   # conditions, Events
  kubectl -n $ns get secretrotation ai-component-client-secret -o yaml # status.history with per-phase times
  export PATH=\$PWD/target/debug:\$PATH                                 # the kubectl plugin
  kubectl rekey -n $ns rotate ai-component-client-secret               # rotate again
  kubectl rekey -n $ns history ai-component-client-secret
  curl -s http://127.0.0.1:9464/metrics | grep ^rekey_
Stop everything:
  make cluster-down
TXT
[[ $result == Succeeded ]]
