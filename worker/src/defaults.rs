//! Every default of the worker's configuration, typed, in one place (DESIGN §3 and §6).

use std::time::Duration;

use crate::config::Device;

/// gRPC inference, plus plain HTTP `GET /health` on the same port.
pub const GRPC_PORT: u16 = 50051;
/// `/healthz`, `/readyz` and `/metrics`: what probes and Prometheus use.
pub const ADMIN_PORT: u16 = 9090;
/// Address both TCP listeners bind to: every address, since a pod is reached through its own IP.
pub const LISTEN_ADDRESS: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
/// The device models run on.
pub const DEVICE: Device = Device::Cpu;
/// Forward-pass executor threads, like Triton's default instance count of one.
pub const INSTANCES: usize = 1;
/// Requests in forward passes at once; more wait in the queue.
pub const MAX_CONCURRENCY: usize = 100;
/// Requests waiting for an executor; beyond this they are refused with RESOURCE_EXHAUSTED.
pub const MAX_QUEUE: usize = 1024;
/// Largest gRPC message received or sent.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// With `--broker`: how often an idle worker returns cached regions nobody else holds any more.
pub const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long the worker keeps serving after SIGTERM so endpoint removal can propagate.
pub const DRAIN_DELAY: Duration = Duration::from_secs(5);
/// How long in-flight requests may take to finish once the worker stops accepting.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Where Kubernetes reads a container's termination message from.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The one version of its model a worker serves.
pub const MODEL_VERSION: &str = "1";
/// Name reported by ServerMetadata.
pub const SERVER_NAME: &str = "remotemedia-model-worker";
/// Whether Triton's system shared memory is served: on for the standalone worker; deployments
/// whose shared memory the sidecar brokers turn it off.
pub const ALLOW_NAMED_SHM: bool = true;
