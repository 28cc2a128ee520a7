#!/usr/bin/env bash
# Sourced by the recipes that build the worker with TorchScript (`--features torch`): torch-sys
# finds libtorch in the project's Python environment (the PyPI torch wheel) through its python.
# Usage: source scripts/torch-env.sh
venv=$("$(dirname "${BASH_SOURCE[0]}")/venv.sh")
export LIBTORCH_USE_PYTORCH=1
export PATH="$venv/bin:$PATH"
