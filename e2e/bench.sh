#!/usr/bin/env bash
# The operator-at-scale benchmark (e2e/benches/operator_scale.rs): builds the operator in release
# mode (dev with --quick) beside the benchmark, brings up a control plane of its own (state in .e2e-bench/, so it
# never meets the e2e tier's) with the rates below, runs the benchmark, and tears the control
# plane down whatever happened. Arguments go to the benchmark (`--quick`, `--workers N`).
# With KUBECONFIG set, it runs against that cluster instead and starts nothing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# The quick run (CI) checks that the benchmark works, not how fast a release build is: it uses the
# dev profile, whose dependencies the test command has built already, instead of a cold release
# build of kube and k8s-openapi (over 20 minutes on two cores).
profile=release
for arg in "$@"; do
  [[ $arg == --quick ]] && profile=dev
done
bench=(cargo bench -p remotemedia-e2e --locked --profile "$profile" --bench operator_scale)
cargo build --profile "$profile" -p remotemedia-operator --locked
"${bench[@]}" --no-run
if [[ -n ${KUBECONFIG:-} ]]; then
  exec "${bench[@]}" -- "$@"
fi

# Rates stated in the table's header: the API server's defaults, and client rates for the
# controller manager and scheduler well above their defaults (20/30 and 50/100), so that one
# Deployment, ReplicaSet and pod per ModelWorker do not queue behind them.
export REMOTEMEDIA_E2E_DIR=$root/.e2e-bench
export REMOTEMEDIA_E2E_MAX_REQUESTS_INFLIGHT=${REMOTEMEDIA_E2E_MAX_REQUESTS_INFLIGHT:-400}
export REMOTEMEDIA_E2E_MAX_MUTATING_REQUESTS_INFLIGHT=${REMOTEMEDIA_E2E_MAX_MUTATING_REQUESTS_INFLIGHT:-200}
export REMOTEMEDIA_E2E_KUBE_API_QPS=${REMOTEMEDIA_E2E_KUBE_API_QPS:-200}
export REMOTEMEDIA_E2E_KUBE_API_BURST=${REMOTEMEDIA_E2E_KUBE_API_BURST:-400}
echo "control plane: --max-requests-inflight=$REMOTEMEDIA_E2E_MAX_REQUESTS_INFLIGHT" \
  "--max-mutating-requests-inflight=$REMOTEMEDIA_E2E_MAX_MUTATING_REQUESTS_INFLIGHT;" \
  "controller manager and scheduler --kube-api-qps=$REMOTEMEDIA_E2E_KUBE_API_QPS" \
  "--kube-api-burst=$REMOTEMEDIA_E2E_KUBE_API_BURST"
e2e/cluster.sh up
trap 'e2e/cluster.sh down' EXIT
eval "$(e2e/cluster.sh env)"
status=0
"${bench[@]}" -- "$@" || status=$?
((status == 0)) || e2e/cluster.sh logs
trap - EXIT
e2e/cluster.sh down || status=1
exit "$status"
