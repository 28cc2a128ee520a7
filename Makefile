# The project's one task runner: README and CI call these recipes.
.DEFAULT_GOAL := help
SHELL := bash

.PHONY: help setup demo test venv fmt cluster-up cluster-down e2e

help: ## List the recipes
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

venv: ## Create (or reuse) the pinned Python environment and print its path
	@scripts/venv.sh

setup: ## Install everything the demo and tests need: Python environment, workspace build
	@scripts/venv.sh >/dev/null
	cargo build --workspace --locked

demo: setup ## Set up, then show what RemoteMedia does today
	@echo "Set up and built. Nothing serves yet: the model worker (issue A1) is the first server."

test: ## Format check, clippy, and every test tier with per-tier counts
	@scripts/test.sh

fmt: ## Format the Rust code
	cargo fmt --all

cluster-up: ## Start the local Kubernetes control plane (see e2e/cluster.sh env for KUBECONFIG)
	@e2e/cluster.sh up

cluster-down: ## Stop the local control plane; fails if a port stays open
	@e2e/cluster.sh down

e2e: ## Run only the end-to-end tier: control plane up, e2e tests, control plane down
	@e2e/test.sh
