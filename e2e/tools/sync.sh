#!/usr/bin/env bash
# Rewrites the go.mod and go.sum of every wrapper module under e2e/tools/ from e2e/versions.env.
# Run it after changing a version there, and commit what it changes; build.sh refuses to build
# wrappers that disagree with versions.env.
set -euo pipefail
tools=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../versions.env
source "$tools/../versions.env"

# write_mod TOOL MODULE VERSION: a go.mod that requires MODULE at VERSION, then tidied.
write_mod() {
  local tool=$1 module=$2 version=$3
  printf 'module github.com/remotemedia/remotemedia/e2e/tools/%s\n\ngo 1.26.0\n\nrequire %s %s\n' \
    "$tool" "$module" "$version" >"$tools/$tool/go.mod"
  rm -f "$tools/$tool/go.sum"
}

tidy() {
  echo "sync: $1" >&2
  (cd "$tools/$1" && go mod tidy)
}

write_mod kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION"
# Upstream's go.mod lists its staging modules as `k8s.io/x => ./staging/src/k8s.io/x`; each needs
# the published twin at the matching version here.
upstream_mod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
  sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')
staging=$(sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#\1#p' "$upstream_mod")
if [[ -z $staging ]]; then
  echo "sync: found no staging modules in $upstream_mod" >&2
  exit 1
fi
{
  echo
  echo 'replace ('
  for module in $staging; do
    printf '\t%s => %s %s\n' "$module" "$module" "$KUBERNETES_STAGING_VERSION"
  done
  echo ')'
} >>"$tools/kubernetes/go.mod"
tidy kubernetes

write_mod etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
tidy etcd
write_mod kwok sigs.k8s.io/kwok "$KWOK_VERSION"
tidy kwok
write_mod helm helm.sh/helm/v4 "$HELM_VERSION"
tidy helm
