# Sourced by the demo scripts: say, and follow a SecretRotation phase by phase.

say() { printf '%(%H:%M:%S)T  %s\n' -1 "$*"; }

# follow NAMESPACE NAME [KUBECTL ARGS...]: prints each new phase with the
# Rotating condition's message until the rotation ends (at most 3 min);
# sets `result` to Succeeded or Failed (empty if it did not end).
follow() {
  local ns=$1 name=$2 last="" phase msg
  shift 2
  result=""
  for _ in $(seq 1 900); do
    IFS=$'\t' read -r phase msg < <(kubectl "$@" -n "$ns" get secretrotation "$name" \
      -o jsonpath='{.status.phase}{"\t"}{.status.conditions[?(@.type=="Rotating")].message}{"\n"}' 2>/dev/null || true)
    if [[ -n ${phase:-} && $phase != "$last" ]]; then
      say "  phase $phase  ($msg)"
      last=$phase
    fi
    case "${phase:-}" in Succeeded|Failed) result=$phase; return ;; esac
    sleep 0.2
  done
}
