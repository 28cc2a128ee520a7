#!/usr/bin/env bash
# `make demo`: starts a model worker serving the built-in identity model with the quickstart
# command line, checks its health over plain HTTP, runs one inference through the stock Triton
# Python client, and stops the worker (also on Ctrl-C). Ports: REMOTEMEDIA_DEMO_PORT (50051) and
# REMOTEMEDIA_DEMO_ADMIN_PORT (9090).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

port=${REMOTEMEDIA_DEMO_PORT:-50051}
admin_port=${REMOTEMEDIA_DEMO_ADMIN_PORT:-9090}
python="$(scripts/venv.sh)/bin/python"
source scripts/torch-env.sh
cargo build --locked --quiet -p remotemedia-model-worker --features torch
target_dir=$(cargo metadata --format-version 1 --no-deps |
  "$python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
worker="$target_dir/debug/remotemedia-model-worker"
logs=$(mktemp -d)

echo "=== starting: remotemedia-model-worker --model-id identity --model-path builtin://identity --device cpu --port $port"
"$worker" --model-id identity --model-path builtin://identity --device cpu \
  --port "$port" --admin-port "$admin_port" --drain-delay 0s \
  --termination-log "$logs/termination-log" 2>"$logs/worker.log" &
pid=$!

stop() {
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    local status=0
    wait "$pid" || status=$?
    echo "=== worker stopped on SIGTERM (exit code $status)"
  fi
}
trap stop EXIT
trap 'exit 130' INT TERM

for _ in $(seq 200); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "the worker exited during start-up:" >&2
    cat "$logs/worker.log" >&2
    exit 1
  fi
  curl -fsS "http://localhost:$port/health" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "=== curl http://localhost:$port/health"
curl -sS "http://localhost:$port/health"
echo "=== one inference with tritonclient (gRPC)"
"$python" scripts/demo_infer.py "localhost:$port"
