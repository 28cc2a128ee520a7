//! Flags (each with its `REMOTEMEDIA_SIDECAR_*` twin), their defaults, and validation into a
//! [`Config`] before anything is bound.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::broker::Limits;
use crate::budget::{self, BudgetError, DEFAULT_HEADROOM_BYTES};
use crate::router::RouterConfig;

/// Defaults, as typed constants (DESIGN §3).
pub mod defaults {
    pub const SOCKET_DIR: &str = "/run/remotemedia";
    pub const ADMIN_PORT: u16 = 9091;
    pub const MAX_SHM_BYTES: u64 = 1 << 30;
    pub const SESSION_QUOTA_BYTES: u64 = 512 << 20;
    pub const LABEL_QUOTA_BYTES: u64 = 256 << 20;
    pub const MAX_REGIONS_PER_SESSION: usize = 1024;
    pub const LISTEN_ADDRESS: std::net::IpAddr =
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    pub const HOLD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
    pub const MAX_HELD: usize = 1000;
    /// As the worker's: a tensor a worker accepts inline also fits through the sidecar.
    pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
}

/// Where the router learns the workers of each model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DiscoveryKind {
    /// A YAML file of `{model, address, node}` entries (`--workers`), re-read when it changes.
    Static,
    /// The EndpointSlices of ModelWorker Services and the ModelWorker objects, watched with the
    /// pod's service account (or the kubeconfig outside a cluster).
    Kubernetes,
}

/// The node agent: brokers shared-memory regions for the pods on this node.
#[derive(Clone, Debug, Parser)]
#[command(name = "remotemedia-sidecar", version, about)]
pub struct Args {
    /// Directory holding `broker.sock` (shared with pods by a hostPath mount).
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_SOCKET_DIR", default_value = defaults::SOCKET_DIR)]
    pub socket_dir: PathBuf,
    /// Port of `/healthz`, `/readyz`, `/metrics`, `/debug/sessions` and `/debug/endpoints` (0: any
    /// free port).
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_ADMIN_PORT", default_value_t = defaults::ADMIN_PORT)]
    pub admin_port: u16,
    /// Address the admin port binds to.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_ADMIN_ADDRESS", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub admin_address: IpAddr,
    /// Most bytes of brokered regions alive on the node; must fit under the container memory
    /// limit minus the headroom.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_MAX_SHM_BYTES", default_value_t = defaults::MAX_SHM_BYTES)]
    pub max_shm_bytes: u64,
    /// Most bytes one broker session may allocate.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_SESSION_QUOTA_BYTES", default_value_t = defaults::SESSION_QUOTA_BYTES)]
    pub session_quota_bytes: u64,
    /// Most bytes one allocation label within a session may allocate.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_LABEL_QUOTA_BYTES", default_value_t = defaults::LABEL_QUOTA_BYTES)]
    pub label_quota_bytes: u64,
    /// Most regions one session may hold at once.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_MAX_REGIONS_PER_SESSION", default_value_t = defaults::MAX_REGIONS_PER_SESSION)]
    pub max_regions_per_session: usize,
    /// The container's memory limit in bytes (the chart sets it from the downward API). When
    /// absent, the limit of this process's memory cgroup is used.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_MEMORY_LIMIT_BYTES")]
    pub memory_limit_bytes: Option<u64>,
    /// Memory kept for the sidecar itself on top of `--max-shm-bytes`.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_MEMORY_HEADROOM_BYTES", default_value_t = DEFAULT_HEADROOM_BYTES)]
    pub memory_headroom_bytes: u64,
    /// Also serve inference over TCP on this port (off by default; `infer.sock` is always on).
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_PORT")]
    pub port: Option<u16>,
    /// Address the TCP inference port binds to.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_LISTEN_ADDRESS", default_value_t = defaults::LISTEN_ADDRESS)]
    pub listen_address: IpAddr,
    /// Where workers are found: `static` (needs `--workers`) or `kubernetes`. Without it no model
    /// has a worker.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_DISCOVERY", value_enum)]
    pub discovery: Option<DiscoveryKind>,
    /// The static discovery file: a YAML list of `{model, address, node}`.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_WORKERS")]
    pub workers: Option<PathBuf>,
    /// The node this sidecar serves; workers on it are colocated (shared memory in place).
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_NODE_NAME")]
    pub node_name: Option<String>,
    /// How long an inference waits for a model with no ready worker (e.g. `30s`).
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_HOLD_TIMEOUT", default_value_t = defaults::HOLD_TIMEOUT.into())]
    pub hold_timeout: humantime::Duration,
    /// Most inferences waiting at once; more are refused with UNAVAILABLE.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_MAX_HELD", default_value_t = defaults::MAX_HELD)]
    pub max_held: usize,
    /// Serve Triton's system shared memory through the sidecar: clients register POSIX objects
    /// by key (scoped to their connection) and the sidecar sends the bytes to workers inline.
    /// It trusts every pod sharing the node's `/dev/shm`, so it is off by default.
    #[arg(
        long,
        env = "REMOTEMEDIA_SIDECAR_ALLOW_NAMED_SHM",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_named_shm: bool,
    /// Largest gRPC message received from clients or workers, in bytes.
    #[arg(long, env = "REMOTEMEDIA_SIDECAR_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
}

/// Where the router's endpoints come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoverySource {
    /// No model has a worker.
    None,
    /// `--discovery static --workers FILE`.
    Static(PathBuf),
    /// `--discovery kubernetes`.
    Kubernetes,
}

/// A validated configuration; `run` takes it apart field by field.
#[derive(Clone, Debug)]
pub struct Config {
    pub socket_dir: PathBuf,
    pub admin_address: IpAddr,
    pub admin_port: u16,
    pub limits: Limits,
    /// The TCP inference listener, when enabled.
    pub tcp: Option<std::net::SocketAddr>,
    /// Where workers are found.
    pub discovery: DiscoverySource,
    pub allow_named_shm: bool,
    pub router: RouterConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error("failed to start: {flag} must be greater than zero")]
    Zero { flag: &'static str },
    #[error("failed to start: --socket-dir {} is not an absolute path", .0.display())]
    RelativeSocketDir(PathBuf),
    #[error("failed to start: --discovery static needs --workers FILE")]
    MissingWorkersFile,
    #[error("failed to start: --workers is read only with --discovery static")]
    WorkersWithoutDiscovery,
    #[error("failed to start: --node-name is empty")]
    EmptyNodeName,
}

impl Args {
    /// Checks every flag, and the memory budget against the container limit.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let Self {
            socket_dir,
            admin_port,
            admin_address,
            max_shm_bytes,
            session_quota_bytes,
            label_quota_bytes,
            max_regions_per_session,
            memory_limit_bytes,
            memory_headroom_bytes,
            port,
            listen_address,
            discovery,
            workers,
            node_name,
            hold_timeout,
            max_held,
            allow_named_shm,
            max_message_bytes,
        } = self;
        for (flag, value) in [
            ("--max-shm-bytes", max_shm_bytes),
            ("--session-quota-bytes", session_quota_bytes),
            ("--label-quota-bytes", label_quota_bytes),
            ("--max-regions-per-session", max_regions_per_session as u64),
            ("--max-held", max_held as u64),
            ("--max-message-bytes", max_message_bytes as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { flag });
            }
        }
        if !socket_dir.is_absolute() {
            return Err(ConfigError::RelativeSocketDir(socket_dir));
        }
        let discovery = match (discovery, workers) {
            (Some(DiscoveryKind::Static), Some(path)) => DiscoverySource::Static(path),
            (Some(DiscoveryKind::Static), None) => return Err(ConfigError::MissingWorkersFile),
            (_, Some(_)) => return Err(ConfigError::WorkersWithoutDiscovery),
            (Some(DiscoveryKind::Kubernetes), None) => DiscoverySource::Kubernetes,
            (None, None) => DiscoverySource::None,
        };
        if node_name.as_deref() == Some("") {
            return Err(ConfigError::EmptyNodeName);
        }
        let limit = memory_limit_bytes.or_else(budget::cgroup_limit);
        budget::check(max_shm_bytes, memory_headroom_bytes, limit)?;
        Ok(Config {
            socket_dir,
            admin_address,
            admin_port,
            limits: Limits {
                max_shm_bytes,
                session_quota_bytes,
                label_quota_bytes,
                max_regions_per_session,
            },
            tcp: port.map(|port| std::net::SocketAddr::new(listen_address, port)),
            discovery,
            allow_named_shm,
            router: RouterConfig {
                node_name,
                hold_timeout: Duration::from(hold_timeout),
                max_held,
                max_message_bytes,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let argv = ["remotemedia-sidecar", "--memory-limit-bytes", "4294967296"];
        Args::try_parse_from(argv.iter().chain(args))
            .unwrap()
            .validate()
    }

    #[test]
    fn defaults_follow_the_design_table() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.socket_dir, PathBuf::from("/run/remotemedia"));
        assert_eq!(config.admin_port, 9091);
        assert_eq!(config.limits.max_shm_bytes, 1 << 30);
    }

    #[test]
    fn zero_limits_and_relative_socket_dirs_are_refused() {
        assert!(matches!(
            parse(&["--label-quota-bytes", "0"]),
            Err(ConfigError::Zero {
                flag: "--label-quota-bytes"
            })
        ));
        assert!(matches!(
            parse(&["--socket-dir", "run/rm"]),
            Err(ConfigError::RelativeSocketDir(_))
        ));
    }

    #[test]
    fn the_router_is_unix_only_by_default_and_tcp_binds_to_loopback() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.tcp, None);
        let config = parse(&["--port", "50061"]).unwrap();
        assert_eq!(config.tcp, Some("127.0.0.1:50061".parse().unwrap()));
        assert_eq!(config.router.hold_timeout, Duration::from_secs(30));
    }

    #[test]
    fn static_discovery_needs_its_file_and_kubernetes_discovery_takes_none() {
        assert!(matches!(
            parse(&["--discovery", "static"]),
            Err(ConfigError::MissingWorkersFile)
        ));
        assert!(matches!(
            parse(&["--workers", "/w.yaml"]),
            Err(ConfigError::WorkersWithoutDiscovery)
        ));
        let config = parse(&["--discovery", "static", "--workers", "/w.yaml"]).unwrap();
        assert_eq!(
            config.discovery,
            DiscoverySource::Static(PathBuf::from("/w.yaml"))
        );
        assert!(matches!(
            parse(&["--discovery", "kubernetes", "--workers", "/w.yaml"]),
            Err(ConfigError::WorkersWithoutDiscovery)
        ));
        let config = parse(&["--discovery", "kubernetes"]).unwrap();
        assert_eq!(config.discovery, DiscoverySource::Kubernetes);
        assert!(matches!(
            parse(&["--max-held", "0"]),
            Err(ConfigError::Zero { flag: "--max-held" })
        ));
    }

    #[test]
    fn a_budget_that_does_not_fit_the_given_limit_is_refused() {
        let error = parse(&["--max-shm-bytes", "4026531841"]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("does not fit under the container memory limit of 4294967296 bytes"),
            "{error}"
        );
        assert!(
            parse(&["--max-shm-bytes", "4026531840"]).is_ok(),
            "exactly fits"
        );
    }
}
