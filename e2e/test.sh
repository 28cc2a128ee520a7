#!/usr/bin/env bash
# The end-to-end tier: builds the e2e tests, brings the local control plane up (building its
# programs on a cold cache), runs the tests against it, and tears it down whatever happened.
# When a test fails, the components' logs are printed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# Compile first, so the cluster does not idle while cargo works and a build error fails fast. The
# operator, discovery, flow and README tests run the operator, sidecar and worker binaries (and the
# demo's client as the flow's app) as processes: they land beside the test executables.
cargo build -p remotemedia-operator -p remotemedia-sidecar -p remotemedia-model-worker --locked
cargo build -p remotemedia-sidecar --example demo_client --locked
# The README test runs the README's Python app with the project's Python and the SDK's wheel.
export REMOTEMEDIA_PYTHON="${REMOTEMEDIA_PYTHON:-$(scripts/venv.sh)/bin/python}"
scripts/python-sdk.sh
cargo test -p remotemedia-e2e --locked --test '*' --no-run
e2e/cluster.sh up
# Interrupted or failed in between: still tear down.
trap 'e2e/cluster.sh down' EXIT
eval "$(e2e/cluster.sh env)"

status=0
cargo test -p remotemedia-e2e --locked --test '*' || status=$?
((status == 0)) || e2e/cluster.sh logs
trap - EXIT
e2e/cluster.sh down || status=1
exit "$status"
