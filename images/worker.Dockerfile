# syntax=docker/dockerfile:1
# remotemedia-model-worker with TorchScript (libtorch from the pinned torch wheel), in two
# variants: `--target cpu` and `--target cuda`. Built from the repository root by `make images`.
#
# Both carry libtorch_cuda and the nvidia-* libraries: the PyPI torch wheel is a CUDA build, and
# the worker keeps its link to libtorch_cuda (DESIGN §6), so even the CPU variant loads them. The
# GPU driver is not in the image: the NVIDIA container runtime mounts it, as the cuda variant asks.
FROM rust:1.95.0-trixie AS build
# torch-sys finds libtorch through the Python environment's torch (LIBTORCH_USE_PYTORCH). The
# base image pins Debian's release; python3-venv follows it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir "$(grep -E '^torch==' /tmp/requirements.txt)"
ENV PATH=/opt/venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY . .
# The binary's rpath names the venv's torch/lib (worker/build.rs), so the runtime stages keep
# those libraries at the same path; libtorch finds the nvidia-* ones relative to itself.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p remotemedia-model-worker --features torch \
    && install -D target/release/remotemedia-model-worker /out/usr/local/bin/remotemedia-model-worker
WORKDIR /
RUN cp -a --parents opt/venv/lib/python3*/site-packages/torch/lib \
    opt/venv/lib/python3*/site-packages/nvidia /out/

FROM debian:trixie-slim AS cpu
COPY --from=build /out/ /
# Fails the build when a library the worker links is missing.
RUN ["/usr/local/bin/remotemedia-model-worker", "--version"]
USER 65532:65532
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/remotemedia-model-worker"]

FROM cpu AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
