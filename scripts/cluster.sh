#!/usr/bin/env bash
# make cluster / make cluster-down: the test environment for a person.
# REKEY_CLUSTER_DIR names another directory for a second cluster
# (make demo-multicluster starts .cluster-stage beside .cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${REKEY_CLUSTER_DIR:-.cluster}
export REKEY_CLUSTER_DIR=$dir
case "${1:-}" in
  up)
    if [[ -f $dir/pid ]] && kill -0 "$(cat $dir/pid)" 2>/dev/null; then
      echo "cluster already running (pid $(cat $dir/pid)); . $dir/env"
      exit 0
    fi
    mkdir -p $dir
    rm -f $dir/ready
    cargo build --quiet --locked -p rekey-testenv --example testenv
    nohup target/debug/examples/testenv > $dir/cluster.log 2>&1 &
    echo $! > $dir/pid
    for _ in $(seq 1 300); do
      [[ -f $dir/ready ]] && break
      if ! kill -0 "$(cat $dir/pid)" 2>/dev/null; then
        echo "cluster failed to start:"; tail -30 $dir/cluster.log; exit 1
      fi
      sleep 1
    done
    [[ -f $dir/ready ]] || { echo "cluster not ready after 300s"; tail -30 $dir/cluster.log; exit 1; }
    echo "cluster ready at $(cat $dir/ready)"
    echo "  . $dir/env       # sets KUBECONFIG and puts kubectl on PATH"
    echo "  make cluster-down"
    ;;
  down)
    if [[ -f $dir/rekey.pid ]]; then kill "$(cat $dir/rekey.pid)" 2>/dev/null || true; rm -f $dir/rekey.pid; fi
    [[ -f $dir/pid ]] || { echo "no cluster running"; exit 0; }
    pid=$(cat $dir/pid)
    wd=$(cat $dir/state/watchdog.pid 2>/dev/null || true)
    kill "$pid" 2>/dev/null || true
    # The watchdog kills the component group once the harness is gone.
    for _ in $(seq 1 50); do
      if ! kill -0 "$pid" 2>/dev/null && { [[ -z $wd ]] || ! pgrep -g "$wd" >/dev/null; }; then break; fi
      sleep 0.2
    done
    if [[ -n $wd ]] && pgrep -g "$wd" >/dev/null; then kill -KILL -- "-$wd" 2>/dev/null || true; fi
    rm -f $dir/pid $dir/ready
    echo "cluster stopped"
    ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
