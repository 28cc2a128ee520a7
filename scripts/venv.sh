#!/usr/bin/env bash
# Creates (or reuses) the project's Python virtual environment and prints its path.
# The environment lives in the cache folder, keyed by the hash of requirements.txt, so a fresh
# clone on a machine that already built it reuses it, and a change of pins builds a new one.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${REMOTEMEDIA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remotemedia}
key=$(sha256sum "$root/requirements.txt" | cut -c1-12)
venv="$cache/venv-$key"
if [[ ! -f "$venv/.complete" ]]; then
  echo "venv: creating $venv (torch and its CUDA libraries: a few GiB, several minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet -r "$root/requirements.txt" >&2
  touch "$venv/.complete"
fi
echo "$venv"
