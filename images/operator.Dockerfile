# syntax=docker/dockerfile:1
# remotemedia-operator: small and non-root. Built from the repository root by `make images`.
FROM rust:1.95.0-trixie AS build
WORKDIR /src
COPY . .
# The cache mounts keep crates and objects between builds; the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p remotemedia-operator \
    && install -D target/release/remotemedia-operator /out/remotemedia-operator

FROM debian:trixie-slim
COPY --from=build /out/remotemedia-operator /usr/local/bin/remotemedia-operator
# A numeric user, so the kubelet can verify runAsNonRoot.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/remotemedia-operator"]
