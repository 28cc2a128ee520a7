# The project's one task runner: README and CI call these recipes.
.DEFAULT_GOAL := help
SHELL := bash

.PHONY: help setup demo test venv fmt bench fuzz-broker

help: ## List the recipes
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

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

bench: ## Run every benchmark and print its table (QUICK=1: one short pass per row, as CI does)
	cargo bench --locked -p remotemedia-runtime-core --bench registry --bench shm -- $(if $(QUICK),--quick)
	cargo bench --locked -p remotemedia-sidecar --bench broker -- $(if $(QUICK),--quick)

FUZZ_SECONDS ?= 60
fuzz-broker: ## Fuzz the broker packet decoder for FUZZ_SECONDS (default 60; needs nightly and cargo-fuzz)
	cd core && cargo +nightly fuzz run broker_packet -- -max_total_time=$(FUZZ_SECONDS)
