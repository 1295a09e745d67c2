# rekey — see README.md. `make demo` and `make test` are the two entry points.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: help demo demo-multicluster reliability test testenv lint unit integration bench bench-full crds cluster cluster-down chart-install build clean-testenv crash-matrix-full

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

demo: testenv build ## start the local cluster, run the operator and a full rotation
	./scripts/demo.sh

demo-multicluster: testenv build ## two clusters sharing one value: rekey proves the rotation in both
	./scripts/demo-multicluster.sh

test: testenv lint unit integration ## rustfmt, clippy, unit and integration tests (builds the environment first)

testenv: ## build etcd, kube-*, kwok, ESO into ~/.cache/rekey (seconds when cached)
	./testenv/build.sh

build:
	$(CARGO) build --locked --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets --workspace -- -D warnings

unit:
	$(CARGO) test --locked --lib --bins

integration: testenv
	$(CARGO) test --locked --test it -- --test-threads=8 --skip ha::
	@# The leader-handover test measures handover times on a 3 s lease: run alone,
	@# not beside a hundred other tests on two cores (which starve the lease).
	$(CARGO) test --locked --test it ha:: -- --test-threads=1

crash-matrix-full: testenv ## crash the operator at every side effect of every source × store × ending (slow; the default run covers pairs)
	REKEY_CRASH_MATRIX=full $(CARGO) test --locked --test it crash:: -- --nocapture

bench: testenv ## measure rekey's cost (release build): prints a table, writes bench/results/*.json
	$(CARGO) bench --locked --bench rekey

bench-full: testenv ## make bench, plus the scale curve 50…1,000 rotations, three runs each (slow)
	REKEY_BENCH_FULL=1 $(CARGO) bench --locked --bench rekey

reliability: ## render the figures the tests wrote (target/reliability/*.json) into docs/reliability.md
	python3 scripts/reliability.py

crds: ## regenerate crds/ and the chart's CRD template from the Rust types
	$(CARGO) run --quiet --locked --bin rekey -- crd > crds/secretrotation.yaml
	./scripts/chart-crd.sh < crds/secretrotation.yaml > charts/rekey/templates/crd-secretrotation.yaml

cluster: testenv ## start the environment in the background; writes .cluster/kubeconfig and .cluster/env
	./scripts/cluster.sh up

cluster-down: ## stop the background environment(s), leave no process
	./scripts/cluster.sh down
	REKEY_CLUSTER_DIR=.cluster-stage ./scripts/cluster.sh down >/dev/null

chart-install: cluster ## install the Helm chart into the local cluster (acting in namespace rekey-demo)
	@# A CRD applied with kubectl (`make demo`) is handed to the release first (README: Upgrading the CRD).
	. .cluster/env && if kubectl get crd secretrotations.rekey.dev >/dev/null 2>&1; then \
	  kubectl label --overwrite crd secretrotations.rekey.dev app.kubernetes.io/managed-by=Helm && \
	  kubectl annotate --overwrite crd secretrotations.rekey.dev meta.helm.sh/release-name=rekey meta.helm.sh/release-namespace=rekey-system; fi
	. target/testenv.env && . .cluster/env && kubectl create namespace rekey-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null && \
	  "$$REKEY_HELM" upgrade --install rekey charts/rekey --namespace rekey-system --create-namespace \
	    --kubeconfig .cluster/kubeconfig --set 'namespaces={rekey-demo}' --wait --timeout 2m
	@echo "installed; the image cannot be pulled here, kwok runs the pod anyway: kubectl -n rekey-system get deploy,pods"

clean-testenv: ## delete the cached environment binaries
	rm -rf $${REKEY_CACHE_DIR:-$$HOME/.cache/rekey}
