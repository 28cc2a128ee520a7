# The project's one task runner: README and CI call these recipes.
.DEFAULT_GOAL := help
SHELL := bash

.PHONY: help setup demo test venv python-sdk fmt bench fuzz models gpu-check crds cluster-up cluster-down operator e2e images

help: ## List the recipes
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

venv: ## Create (or reuse) the pinned Python environment and print its path
	@scripts/venv.sh

setup: ## Install everything the demo and tests need: Python environment and SDK, workspace build (worker with TorchScript)
	@scripts/venv.sh >/dev/null
	source scripts/torch-env.sh && cargo build --workspace --locked --features remotemedia-model-worker/torch
	@scripts/python-sdk.sh

python-sdk: ## Build the Python SDK (python/) into a wheel and install it in the Python environment
	@scripts/python-sdk.sh

demo: setup ## Set up, then run the sidecar, a colocated and a "remote" worker, and a client on both paths; stop them all
	@scripts/demo.sh

test: ## Format check, clippy, and every test tier with per-tier counts
	@scripts/test.sh

MODELS_DIR ?= target/models
models: ## Build the TorchScript test models (model.pt, config.pbtxt, torch's outputs) into MODELS_DIR
	"$$(scripts/venv.sh)/bin/python" scripts/make_models.py $(MODELS_DIR)

gpu-check: ## Build the worker and a folder (target/gpu-check) that checks it on a CUDA machine
	@scripts/gpu-check/prepare.sh

fmt: ## Format the Rust code
	cargo fmt --all

crds: ## Regenerate crds/modelworker.yaml from the Rust types in crds/src, and the chart's copy
	cargo run --locked -q -p remotemedia-crds --example crdgen > crds/modelworker.yaml.tmp
	mv crds/modelworker.yaml.tmp crds/modelworker.yaml
	cp crds/modelworker.yaml charts/remotemedia/files/modelworker.yaml

bench: ## Run every benchmark and print its table (QUICK=1: one short pass per row, as CI does)
	cargo bench --locked -p remotemedia-runtime-core --bench registry --bench shm -- $(if $(QUICK),--quick)
	cargo build --release --locked -p remotemedia-model-worker
	cargo bench --locked -p remotemedia-sidecar --bench broker --bench transport -- $(if $(QUICK),--quick)
	"$$(scripts/venv.sh)/bin/python" scripts/make_models.py $(MODELS_DIR)
	source scripts/torch-env.sh && cargo bench --locked -p remotemedia-model-worker --features torch --bench worker -- --models "$(abspath $(MODELS_DIR))" $(if $(QUICK),--quick)
	@scripts/python-sdk.sh
	"$$(scripts/venv.sh)/bin/python" python/benches/sdk.py $(if $(QUICK),--quick)
	cargo build --release --locked -p remotemedia-sidecar -p remotemedia-model-worker
	cargo build --release --locked -p remotemedia-runtime-core --example client_loop
	"$$(scripts/venv.sh)/bin/python" python/benches/client.py $(if $(QUICK),--quick)
	e2e/bench.sh $(if $(QUICK),--quick)

FUZZ_SECONDS ?= 60
fuzz: ## Fuzz the decoders of outside bytes (worker requests, broker packets), FUZZ_SECONDS each (default 60; nightly + cargo-fuzz)
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd worker && cargo +nightly fuzz run decode_request -- -max_total_time=$(FUZZ_SECONDS)
	cd core && cargo +nightly fuzz run broker_packet -- -max_total_time=$(FUZZ_SECONDS)

cluster-up: ## Start the local Kubernetes control plane (see e2e/cluster.sh env for KUBECONFIG)
	@e2e/cluster.sh up

cluster-down: ## Stop the local control plane; fails if a port stays open
	@e2e/cluster.sh down

operator: ## Run the operator out of cluster against KUBECONFIG's cluster, one replica (no leader election)
	cargo run -p remotemedia-operator -- --leader-election=false

e2e: ## Run only the end-to-end tier: control plane up, e2e tests, control plane down
	@e2e/test.sh

IMAGE_BUILDER ?= docker
IMAGE_REGISTRY ?= remotemedia
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/remotemedia/Chart.yaml)
images: ## Build the operator, sidecar and worker (cpu, cuda) images the chart names (IMAGE_BUILDER=docker|podman|buildah)
	$(IMAGE_BUILDER) build -f images/operator.Dockerfile -t $(IMAGE_REGISTRY)/remotemedia-operator:$(IMAGE_TAG) .
	$(IMAGE_BUILDER) build -f images/sidecar.Dockerfile -t $(IMAGE_REGISTRY)/remotemedia-sidecar:$(IMAGE_TAG) .
	$(IMAGE_BUILDER) build -f images/worker.Dockerfile --target cpu -t $(IMAGE_REGISTRY)/remotemedia-model-worker:$(IMAGE_TAG) .
	$(IMAGE_BUILDER) build -f images/worker.Dockerfile --target cuda -t $(IMAGE_REGISTRY)/remotemedia-model-worker-cuda:$(IMAGE_TAG) .
