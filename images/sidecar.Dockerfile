# syntax=docker/dockerfile:1
# remotemedia-sidecar: small and non-root. Built from the repository root by `make images`.
# The chart's init container runs `chown` from this image (coreutils) to hand the node's socket
# directory to the sidecar's user.
FROM rust:1.95.0-trixie AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p remotemedia-sidecar \
    && install -D target/release/remotemedia-sidecar /out/remotemedia-sidecar

FROM debian:trixie-slim
COPY --from=build /out/remotemedia-sidecar /usr/local/bin/remotemedia-sidecar
USER 65532:65532
EXPOSE 9091
ENTRYPOINT ["/usr/local/bin/remotemedia-sidecar"]
