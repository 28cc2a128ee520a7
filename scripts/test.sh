#!/usr/bin/env bash
# Runs every check and test tier, prints how many tests each tier ran, and fails if a tier that
# exists ran none. `make test` calls this; `.ci/run` calls `make test`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

venv=$(scripts/venv.sh)
export REMOTEMEDIA_PYTHON="$venv/bin/python"
# The worker is built and tested with its TorchScript backend: one build of the workspace.
source scripts/torch-env.sh
features=(--features remotemedia-model-worker/torch)
logs=$(mktemp -d)
summary=()
total_passed=0
total_failed=0

# run_tier NAME COMMAND...: runs one tier, adding up the counts its test runner printed.
run_tier() {
  local name=$1 log="$logs/$1.log" start status=0 passed=0 failed=0 ignored=0
  shift
  echo "=== tier $name: $*"
  start=$SECONDS
  "$@" 2>&1 | tee "$log" || status=$?
  # cargo: "test result: ok. 3 passed; 0 failed; 1 ignored; ..."; pytest: "== 3 passed, 1 skipped in 0.1s =="
  read -r passed failed ignored < <(awk '
    /^test result:/ { p += $4; f += $6; i += $8 }
    /^=+ .*(passed|failed|error).* in [0-9.]+s/ {
      for (k = 2; k <= NF; k++) {
        if ($k ~ /^passed/) p += $(k-1)
        if ($k ~ /^(failed|errors?)/) f += $(k-1)
        if ($k ~ /^skipped/) i += $(k-1)
      }
    }
    END { print p+0, f+0, i+0 }' "$log")
  summary+=("$(printf '%-12s %5d passed %5d failed %5d ignored %5ds' "$name" "$passed" "$failed" "$ignored" $((SECONDS - start)))")
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
  if ((status != 0)); then
    echo "tier $name failed (exit $status)" >&2
    total_failed=$((total_failed + (failed == 0)))
  elif ((passed == 0)); then
    echo "tier $name exists but ran no test" >&2
    total_failed=$((total_failed + 1))
  fi
}

# The quickstart programs are their own Cargo project (a user's, outside the workspace).
quickstart=(--manifest-path examples/quickstart/Cargo.toml)
echo "=== format check"
cargo fmt --all -- --check
cargo fmt "${quickstart[@]}" -- --check
echo "=== clippy"
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings
cargo clippy "${quickstart[@]}" --all-targets --locked -- -D warnings
# The worker without libtorch, as a plain `cargo build` makes it.
cargo clippy -p remotemedia-model-worker --all-targets --locked -- -D warnings
echo "=== generated files"
make -s crds
git diff --exit-code -- crds/modelworker.yaml charts/remotemedia/files/modelworker.yaml ||
  { echo "failed: crds/modelworker.yaml or the chart's copy differs from crds/src: run \`make crds\` and commit them" >&2; exit 1; }

echo "=== Dockerfiles"
images/lint.sh

run_tier unit cargo test --workspace --locked "${features[@]}" --lib --bins
# The quickstart programs, written against the crates' public API only: their harness
# (examples/quickstart/tests) runs each, the client against a real worker process it starts.
cargo build --locked -p remotemedia-model-worker "${features[@]}"
run_tier examples cargo test "${quickstart[@]}" --locked
# Integration tests are the `tests/*.rs` (or `tests/*/main.rs`) targets of the workspace's
# crates but the e2e crate's: real processes.
if compgen -G "*/tests/*.rs" | grep -qv '^e2e/' || compgen -G "*/tests/*/main.rs" >/dev/null; then
  # Some start the crates' examples or the quickstart programs as the other process; `--test
  # '*'` alone does not build them.
  cargo build --workspace --locked "${features[@]}" --examples
  cargo build "${quickstart[@]}" --locked
  run_tier integration cargo test --workspace --exclude remotemedia-e2e --locked "${features[@]}" --test '*'
fi
# Python clients people already use (tritonclient) against the worker binary built here, and the
# Python SDK (python/) built into a wheel and installed in the venv. pytest exits 5 when it
# collects no test: a failure like any other non-zero exit.
if compgen -G "tests/python/test_*.py" >/dev/null; then
  echo "=== python sdk wheel"
  scripts/python-sdk.sh
  cargo build --locked -p remotemedia-model-worker -p remotemedia-sidecar "${features[@]}"
  target_dir=$(cargo metadata --format-version 1 --no-deps |
    "$REMOTEMEDIA_PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  export REMOTEMEDIA_WORKER_BIN="$target_dir/debug/remotemedia-model-worker"
  export REMOTEMEDIA_SIDECAR_BIN="$target_dir/debug/remotemedia-sidecar"
  run_tier pytest "$REMOTEMEDIA_PYTHON" -m pytest -p no:cacheprovider tests/python
fi
# End-to-end: the e2e crate's tests against a local Kubernetes control plane that e2e/test.sh
# starts and tears down (a cold cache first builds it from the pinned Go modules).
run_tier e2e e2e/test.sh

echo
echo "=== summary"
printf '%s\n' "${summary[@]}"
echo "total: $total_passed passed, $total_failed failed"
((total_failed == 0))
