{{- define "rekey.name" -}}rekey{{- end -}}
{{- define "rekey.fullname" -}}{{ .Release.Name }}{{- end -}}
{{- define "rekey.labels" -}}
app.kubernetes.io/name: rekey
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "rekey.selector" -}}
app.kubernetes.io/name: rekey
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The rules rekey needs inside a namespace it acts in. Each is there for a
     named step; docs/rbac.md lists what fails without it. */}}
{{- define "rekey.namespacedRules" -}}
# SecretRotations: watched, their finalizer added and removed (patch), and
# their status written (server-side apply).
- apiGroups: [rekey.dev]
  resources: [secretrotations]
  verbs: [get, list, watch, patch]
- apiGroups: [rekey.dev]
  resources: [secretrotations/status]
  verbs: [patch]
# Secrets: read references (sources, API keys, synced Secrets), write
# kubernetesSecret targets and the write-ahead record, delete the record.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch, delete]
# ExternalSecrets: checked in Preflight, annotated to request a refresh,
# listed to find others that pull the same key, watched (metadata) while a
# rotation waits on them.
- apiGroups: [external-secrets.io]
  resources: [externalsecrets]
  verbs: [get, list, watch, patch]
# Workloads: observed for rollout proof, stamped to restart (Trigger mode),
# listed for consumer discovery, watched while a rotation waits on them.
- apiGroups: [apps]
  resources: [deployments, statefulsets, daemonsets]
  verbs: [get, list, watch, patch]
# Consumer discovery and the drain proof: pods (reduced at once to owner
# and Secret names) and their owners, only where a rotation is in progress.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [apps]
  resources: [replicasets]
  verbs: [list, watch]
- apiGroups: [batch]
  resources: [jobs, cronjobs]
  verbs: [list, watch]
# Leases: one claim per store entry, ExternalSecret and workload, so two
# rotations of one thing take turns.
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, list, create, update, delete]
# Events on SecretRotations.
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# ServiceAccount tokens (TokenRequest): a store target that acts as a
# ServiceAccount of the SecretRotation's namespace (awsSecretsManager
# serviceAccountRef, ibmSecretsManager trustedProfile) gets a short-lived
# token of it, exchanged for cloud credentials. Never rekey's own identity.
- apiGroups: [""]
  resources: [serviceaccounts/token]
  verbs: [create]
{{- end -}}
