#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU and torch 2.11.0, from the folder `make gpu-check` made:
# builds the test models with that torch, serves each with the copied worker on --device
# (default cuda:0) and checks every case against torch's outputs on the same device.
# The worker's rpath names the build machine's libtorch; LD_LIBRARY_PATH points it at this
# machine's instead.
#
# Usage: ./run.sh [--device cuda:0|cpu]    PYTHON (default python3): a python with torch
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
device=cuda:0
if [[ ${1:-} == --device ]]; then device=$2; fi
python=${PYTHON:-python3}
# cuBLAS and cuDNN may pick other kernels than torch did for the same product: a looser bound
# than the CPU tests' 1e-6.
rtol=1e-5
[[ $device == cpu ]] && rtol=1e-6

start=$SECONDS
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
"$python" -c 'import torch; print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())'
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" "$here/make_models.py" "$work/models" --device "${device%%:*}"

# A free port: bound to port 0, read, released.
free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

failed=0
for model in mlp two_io tokens inplace heavy dtypes; do
  port=$(free_port)
  admin_port=$(free_port)
  "$here/remotemedia-model-worker" --model-path "$work/models/$model/model.pt" --device "$device" \
    --port "$port" --admin-port "$admin_port" --drain-delay 0s \
    --termination-log "$work/$model.termination-log" 2>"$work/$model.log" &
  pid=$!
  ready=0
  for _ in $(seq 600); do
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    if "$python" -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$admin_port/readyz', timeout=1)" 2>/dev/null; then
      ready=1
      break
    fi
    sleep 0.1
  done
  # Evidence from outside the worker that it really drives the GPU: the CUDA driver is mapped.
  if ((ready)) && [[ $device != cpu ]] && ! grep -q 'libcuda\.so' "/proc/$pid/maps"; then
    echo "the worker for $model did not load the CUDA driver" >&2
    ready=0
  fi
  if ((ready)) && "$here/check_cases" "http://127.0.0.1:$port" "$model" "$work/models/$model" "$rtol"; then
    :
  else
    echo "FAIL $model on $device; worker log:" >&2
    cat "$work/$model.log" >&2
    failed=1
  fi
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || true
done
echo "gpu-check on $device: $([[ $failed == 0 ]] && echo PASSED || echo FAILED) in $((SECONDS - start)) s"
exit "$failed"
