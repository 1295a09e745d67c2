#!/usr/bin/env bash
# make demo-multicluster: one value shared by two clusters, proven in both.
# dev (.cluster) runs rekey and holds the "store" (the Secret
# ai-component-source); stage (.cluster-stage) has its own ESO, which reads
# that store across clusters, and its own Deployment. rekey reaches stage
# through a kubeconfig Secret whose identity holds only
# examples/remote-access.yaml, and invalidates nothing until both clusters run
# the new value. Exit 0 on Succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
ns=rekey-demo
# shellcheck source=scripts/follow.sh
. scripts/follow.sh
./scripts/cluster.sh up >/dev/null
REKEY_CLUSTER_DIR=.cluster-stage ./scripts/cluster.sh up >/dev/null
# shellcheck source=/dev/null
. .cluster/env
dev=.cluster/kubeconfig
stage=.cluster-stage/kubeconfig
kdev() { kubectl --kubeconfig "$dev" "$@"; }
kstage() { kubectl --kubeconfig "$stage" "$@"; }
say "clusters up: dev $(cat .cluster/ready), stage $(cat .cluster-stage/ready)"

kdev apply --server-side --force-conflicts -f crds/secretrotation.yaml >/dev/null
kdev wait --for=condition=Established --timeout=60s crd/secretrotations.rekey.dev >/dev/null
if [[ -f .cluster/rekey.pid ]]; then kill "$(cat .cluster/rekey.pid)" 2>/dev/null || true; fi
cargo build --quiet --locked --bin rekey --bin kubectl-rekey
KUBECONFIG=$dev nohup target/debug/rekey run --metrics-addr=127.0.0.1:9464 --poll=1s > .cluster/rekey.log 2>&1 &
echo $! > .cluster/rekey.pid
say "operator running in dev (pid $(cat .cluster/rekey.pid), log .cluster/rekey.log)"

initial="$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
dev_server="$(kdev config view --raw -o jsonpath='{.clusters[0].cluster.server}')"
dev_ca="$(kdev config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
kdev config view --raw -o jsonpath='{.users[0].user.client-certificate-data}' | base64 -d > .cluster/eso.crt
kdev config view --raw -o jsonpath='{.users[0].user.client-key-data}' | base64 -d > .cluster/eso.key
for k in kdev kstage; do
  $k delete namespace $ns --ignore-not-found --wait=true >/dev/null
  $k create namespace $ns >/dev/null
  until $k -n $ns get serviceaccount default >/dev/null 2>&1; do sleep 0.2; done
  # Both ESOs read the one store in dev (a shared Secrets Manager, in small).
  $k -n $ns create secret generic eso-auth --from-file=tls.crt=.cluster/eso.crt --from-file=tls.key=.cluster/eso.key >/dev/null
  $k -n $ns apply -f - >/dev/null <<YAML
apiVersion: external-secrets.io/v1
kind: SecretStore
metadata: {name: cluster-secrets}
spec:
  provider:
    kubernetes:
      remoteNamespace: $ns
      server: {url: "$dev_server", caBundle: "$dev_ca"}
      auth:
        cert:
          clientCert: {name: eso-auth, key: tls.crt}
          clientKey: {name: eso-auth, key: tls.key}
YAML
done
rm -f .cluster/eso.crt .cluster/eso.key
kdev -n $ns create secret generic ai-component-source --from-literal=client_secret="$initial" >/dev/null
for k in kdev kstage; do
  $k -n $ns apply -f examples/demo/app.yaml >/dev/null
  $k -n $ns wait --for=condition=Ready --timeout=60s externalsecret/app-creds >/dev/null
  $k -n $ns rollout status deployment/ai-component --timeout=120s >/dev/null
done
say "dev and stage: ExternalSecret app-creds synced from the one store, Deployment ai-component 3/3 available in each"

# rekey's identity in stage: a ServiceAccount with one Role in one namespace.
kstage -n $ns apply -f examples/remote-access.yaml >/dev/null
token="$(kstage -n $ns create token rekey-remote --duration=1h)"
stage_server="$(kstage config view --raw -o jsonpath='{.clusters[0].cluster.server}')"
stage_ca="$(kstage config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
kdev -n $ns create secret generic stage-kubeconfig --from-file=value=/dev/stdin >/dev/null <<YAML
apiVersion: v1
kind: Config
clusters: [{name: stage, cluster: {server: "$stage_server", certificate-authority-data: "$stage_ca"}}]
users: [{name: rekey, user: {token: "$token"}}]
contexts: [{name: stage, context: {cluster: stage, user: rekey, namespace: $ns}}]
current-context: stage
YAML
say "stage reachable from dev through Secret stage-kubeconfig (ServiceAccount rekey-remote, examples/remote-access.yaml)"

kdev -n $ns apply -f examples/demo/secretrotation-multicluster.yaml >/dev/null
say "SecretRotation ai-component-client-secret applied; following it:"
follow $ns ai-component-client-secret --kubeconfig "$dev"
echo
KUBECONFIG=$dev target/debug/kubectl-rekey -n $ns status ai-component-client-secret
echo
dev_synced="$(kdev -n $ns get secret app-creds -o jsonpath='{.data.client_secret}' | base64 -d)"
stage_synced="$(kstage -n $ns get secret app-creds -o jsonpath='{.data.client_secret}' | base64 -d)"
if [[ $result == Succeeded && $dev_synced != "$initial" && $dev_synced == "$stage_synced" ]]; then
  say "Succeeded: both clusters' ESOs delivered the one new value and both Deployments rolled out on it."
else
  say "the rotation ended ${result:-without a result}; see: kubectl --kubeconfig $dev -n $ns describe secretrotation ai-component-client-secret"
fi
cat <<TXT

Look around:
  kubectl --kubeconfig $dev -n $ns get secretrotation ai-component-client-secret -o yaml   # status.lastRotation.proof per cluster
  kubectl --kubeconfig $stage -n $ns get rs -l app=ai-component                           # stage rolled out once
Stop everything:
  make cluster-down
TXT
[[ $result == Succeeded ]]
