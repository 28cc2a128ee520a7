#!/usr/bin/env bash
# `make demo`: the sidecar with two workers of the built-in identity model — `identity-near` on
# this node (started with `--broker`, so it reads clients' regions in place) and `identity-far`
# declared on another node (it gets the bytes inline) — then the quickstart flow through the
# sidecar to each (`sidecar/examples/demo_client.rs`: results, the path the sidecar took, bytes
# that crossed a socket per process), and the stock `tritonclient` through the sidecar's TCP
# port. Everything it started is stopped on exit, Ctrl-C included. Ports: REMOTEMEDIA_DEMO_PORT
# (50051, the sidecar's gRPC over TCP) and REMOTEMEDIA_DEMO_ADMIN_PORT (9090, its admin port);
# the workers take the next two of each.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

port=${REMOTEMEDIA_DEMO_PORT:-50051}
admin_port=${REMOTEMEDIA_DEMO_ADMIN_PORT:-9090}
python="$(scripts/venv.sh)/bin/python"
source scripts/torch-env.sh
cargo build --locked --quiet --features remotemedia-model-worker/torch \
  -p remotemedia-model-worker -p remotemedia-sidecar --bins --example demo_client
target_dir=$(cargo metadata --format-version 1 --no-deps |
  "$python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/debug"
dir=$(mktemp -d)
pids=()

stop() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    # A process that ignores SIGTERM for 10 s is killed.
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  [[ ${#pids[@]} -gt 0 ]] && echo "=== stopped the sidecar and both workers"
  rm -rf "$dir"
}
trap stop EXIT
trap 'exit 130' INT TERM

wait_ready() { # name pid url
  for _ in $(seq 300); do
    if ! kill -0 "$2" 2>/dev/null; then
      echo "$1 exited during start-up:" >&2
      cat "$dir/$1.log" >&2
      exit 1
    fi
    curl -fsS "$3" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "$1 was not ready after 30 s:" >&2
  cat "$dir/$1.log" >&2
  exit 1
}

cat >"$dir/workers.yaml" <<YAML
- {model: identity-near, address: '127.0.0.1:$((port + 1))', node: demo-node}
- {model: identity-far, address: '127.0.0.1:$((port + 2))', node: other-node}
YAML
echo "=== workers.yaml (static discovery; this node is demo-node)"
cat "$dir/workers.yaml"

echo "=== starting: remotemedia-sidecar --socket-dir $dir --port $port --discovery static --node-name demo-node"
"$bin/remotemedia-sidecar" --socket-dir "$dir" --port "$port" --admin-port "$admin_port" \
  --discovery static --workers "$dir/workers.yaml" --node-name demo-node >"$dir/sidecar.log" 2>&1 &
sidecar=$!
pids+=("$sidecar")
wait_ready sidecar "$sidecar" "http://127.0.0.1:$admin_port/readyz"

start_worker() { # model port admin-port extra-args...
  local model=$1 worker_port=$2 worker_admin=$3
  shift 3
  echo "=== starting: remotemedia-model-worker --model-id $model --model-path builtin://identity --port $worker_port $*"
  "$bin/remotemedia-model-worker" --model-id "$model" --model-path builtin://identity --device cpu \
    --port "$worker_port" --admin-port "$worker_admin" --drain-delay 0s \
    --termination-log "$dir/$model.termination-log" "$@" >"$dir/$model.log" 2>&1 &
  pids+=("$!")
  wait_ready "$model" "$!" "http://127.0.0.1:$worker_port/health"
}
start_worker identity-near $((port + 1)) $((admin_port + 1)) --broker "$dir"
near=${pids[-1]}
start_worker identity-far $((port + 2)) $((admin_port + 2))
far=${pids[-1]}

echo "=== the quickstart flow through the sidecar (unix://$dir/infer.sock), to each worker"
REMOTEMEDIA_SIDECAR="unix://$dir" "$bin/examples/demo_client" "$admin_port" "$sidecar" \
  "identity-near=$near" "identity-far=$far"

echo
echo "=== the stock tritonclient through the sidecar's TCP port (inline bytes)"
"$python" scripts/demo_infer.py "localhost:$port" identity-far
echo "=== curl http://127.0.0.1:$admin_port/debug/sessions"
curl -sS "http://127.0.0.1:$admin_port/debug/sessions"
