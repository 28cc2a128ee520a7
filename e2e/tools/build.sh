#!/usr/bin/env bash
# Builds the control-plane programs pinned in e2e/versions.env (kube-apiserver,
# kube-controller-manager, kube-scheduler, etcd, kwok, helm) from the wrapper modules beside this
# script, and prints the folder that holds them. The folder lives in the cache
# ($REMOTEMEDIA_CACHE/k8s-<key>/bin), keyed by the hash of the pins, the wrappers, this script and
# the Go version, and is reused when present: only a cold cache builds (tens of minutes on 2 cores).
# Beside bin/, share/kwok-stages.yaml holds kwok's default stages from the pinned module.
set -euo pipefail
tools=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../versions.env
source "$tools/../versions.env"
cache=${REMOTEMEDIA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remotemedia}

if ! command -v go >/dev/null; then
  echo "build: failed to find the go command (Go 1.26 or newer is needed to build the control plane)" >&2
  exit 1
fi

# require TOOL MODULE VERSION: the wrapper must pin what versions.env says.
require() {
  if ! awk -v m="$2" -v v="$3" '$1 == m && $2 == v { found = 1 } $1 == "require" && $2 == m && $3 == v { found = 1 } END { exit !found }' \
    "$tools/$1/go.mod"; then
    echo "build: e2e/tools/$1/go.mod does not pin $2 $3 as e2e/versions.env says; run e2e/tools/sync.sh" >&2
    exit 1
  fi
}
require kubernetes k8s.io/kubernetes "$KUBERNETES_VERSION"
require etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
require kwok sigs.k8s.io/kwok "$KWOK_VERSION"
require helm helm.sh/helm/v4 "$HELM_VERSION"

key=$({
  go env GOVERSION GOOS GOARCH
  cd "$tools/.."
  cat versions.env
  find tools -type f \( -name go.mod -o -name go.sum -o -name '*.go' -o -name build.sh \) -print0 |
    sort -z | xargs -0 sha256sum
} | sha256sum | cut -c1-12)
dir="$cache/k8s-$key"
if [[ -f $dir/.complete ]]; then
  echo "$dir/bin"
  exit 0
fi

mkdir -p "$cache"
# Two test runs on a cold cache must not build into the same folder at once.
exec 9>"$dir.lock"
flock 9
if [[ -f $dir/.complete ]]; then
  echo "$dir/bin"
  exit 0
fi
rm -rf "$dir"
mkdir -p "$dir/bin"
echo "build: building the control plane into $dir (cold cache: tens of minutes)" >&2

# build TOOL PACKAGE NAME LDFLAGS: one program, timed; one at a time, niced, to leave the
# machine's two cores usable for whoever else is compiling.
build() {
  local tool=$1 package=$2 name=$3 ldflags=$4 start=$SECONDS
  echo "build: $name" >&2
  (cd "$tools/$tool" &&
    CGO_ENABLED=0 GOFLAGS=-buildvcs=false nice -n 10 \
      go build -trimpath -ldflags "-s -w $ldflags" -o "$dir/bin/$name" "$package")
  printf '%s %ds\n' "$name" $((SECONDS - start)) | tee -a "$dir/build-times.txt" >&2
}

k8s_major=${KUBERNETES_VERSION#v}
k8s_minor=${k8s_major#*.}
k8s_minor=${k8s_minor%%.*}
k8s_major=${k8s_major%%.*}
# Without these the programs report v0.0.0-master, and clients warn about version skew.
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$k8s_major"
  k8s_ldflags+=" -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
done
build kubernetes ./kube-apiserver kube-apiserver "$k8s_ldflags"
build kubernetes ./kube-controller-manager kube-controller-manager "$k8s_ldflags"
build kubernetes ./kube-scheduler kube-scheduler "$k8s_ldflags"
build etcd . etcd ""
build kwok . kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}"
build helm . helm "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"

# kwok's default stages (how simulated nodes and pods progress: initialize, lease heartbeats, pods
# ready, complete, deleted) ship as YAML in its module, not in the binary; kwok's own cluster tool
# feeds the same files in through --config.
kwok_module=$(cd "$tools/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
mkdir -p "$dir/share"
for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
  pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
  echo ---
  cat "$kwok_module/kustomize/stage/$stage.yaml"
done >"$dir/share/kwok-stages.yaml"

touch "$dir/.complete"
echo "$dir/bin"
