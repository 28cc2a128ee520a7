#!/usr/bin/env bash
# Builds the Python SDK (python/: the `remotemedia` package, an abi3 wheel for CPython >= 3.11)
# and installs it in the project's virtual environment. `make setup` and `scripts/test.sh` call it.
# maturin, the build tool, is pinned in python/pyproject.toml and installed in the venv on demand.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(scripts/venv.sh)
maturin_pin=$(grep -o '"maturin==[0-9.]*"' python/pyproject.toml | tr -d '"')
if [[ "$("$venv/bin/maturin" --version 2>/dev/null)" != "maturin ${maturin_pin#maturin==}" ]]; then
  "$venv/bin/pip" install --quiet "$maturin_pin" >&2
fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
"$venv/bin/maturin" build --release --locked --quiet --manifest-path python/Cargo.toml \
  --interpreter "$venv/bin/python" --out "$wheels" >&2
"$venv/bin/pip" install --quiet --force-reinstall --no-deps "$wheels"/remotemedia-*.whl >&2
echo "python sdk: installed $(basename "$wheels"/remotemedia-*.whl) in $venv" >&2
