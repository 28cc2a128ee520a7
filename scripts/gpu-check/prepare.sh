#!/usr/bin/env bash
# `make gpu-check`: builds the worker with TorchScript here and prepares a folder (default
# target/gpu-check, or $1) to copy to a machine with an NVIDIA GPU and its own torch 2.11.0 but no
# network or Rust toolchain. There, `./run.sh` makes the test models, serves each with
# `--device cuda:0` and compares the answers with torch's on that GPU.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
source scripts/torch-env.sh
cargo build --locked -p remotemedia-model-worker --features torch --bin remotemedia-model-worker --example check_cases
target_dir=$(cargo metadata --format-version 1 --no-deps |
  python -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
out=${1:-$target_dir/gpu-check}
rm -rf "$out"
mkdir -p "$out"
cp "$target_dir/debug/remotemedia-model-worker" "$target_dir/debug/examples/check_cases" "$out/"
cp scripts/make_models.py scripts/gpu-check/run.sh "$out/"
echo "gpu-check: copy $out to the GPU machine and run ./run.sh there (PYTHON=python with torch 2.11.0)"
