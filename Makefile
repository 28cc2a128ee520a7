# The project's one task runner: README and CI call these recipes.
.DEFAULT_GOAL := help
SHELL := bash

.PHONY: help setup demo test venv python-sdk fmt bench fuzz cluster-up cluster-down e2e

help: ## List the recipes
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

venv: ## Create (or reuse) the pinned Python environment and print its path
	@scripts/venv.sh

setup: ## Install everything the demo and tests need: Python environment and SDK, workspace build
	@scripts/venv.sh >/dev/null
	cargo build --workspace --locked
	@scripts/python-sdk.sh

python-sdk: ## Build the Python SDK (python/) into a wheel and install it in the Python environment
	@scripts/python-sdk.sh

demo: setup ## Set up, then start a model worker, curl its health, run one inference, stop it
	@scripts/demo.sh

test: ## Format check, clippy, and every test tier with per-tier counts
	@scripts/test.sh

fmt: ## Format the Rust code
	cargo fmt --all

bench: ## Run every benchmark and print its table (QUICK=1: one short pass per row, as CI does)
	cargo bench --locked -p remotemedia-runtime-core --bench registry --bench shm -- $(if $(QUICK),--quick)
	@scripts/python-sdk.sh
	"$$(scripts/venv.sh)/bin/python" python/benches/sdk.py $(if $(QUICK),--quick)

FUZZ_SECONDS ?= 60
fuzz: ## Fuzz the worker's request decoder for FUZZ_SECONDS (default 60; nightly + cargo-fuzz)
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd worker && cargo +nightly fuzz run decode_request -- -max_total_time=$(FUZZ_SECONDS)

cluster-up: ## Start the local Kubernetes control plane (see e2e/cluster.sh env for KUBECONFIG)
	@e2e/cluster.sh up

cluster-down: ## Stop the local control plane; fails if a port stays open
	@e2e/cluster.sh down

e2e: ## Run only the end-to-end tier: control plane up, e2e tests, control plane down
	@e2e/test.sh
