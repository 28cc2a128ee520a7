//! Flags (each with its `REMOTEMEDIA_OPERATOR_*` twin), their defaults, and validation into a
//! [`Config`] before anything is bound or any API call is made.

use std::path::{Path, PathBuf};

use clap::Parser;

/// Defaults, as typed constants (DESIGN §3).
pub mod defaults {
    pub const ADMIN_PORT: u16 = 8080;
    pub const LEASE_NAME: &str = "remotemedia-operator";
    /// Where Kubernetes mounts the pod's namespace with its service-account token.
    pub const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
    pub const LEASE_NAMESPACE_FALLBACK: &str = "default";
    pub const SOCKET_DIR: &str = "/run/remotemedia";
    /// The worker images of this operator's own release, named as `make images` and the chart
    /// name them.
    pub const WORKER_IMAGE: &str = concat!(
        "remotemedia/remotemedia-model-worker:",
        env!("CARGO_PKG_VERSION")
    );
    pub const WORKER_CUDA_IMAGE: &str = concat!(
        "remotemedia/remotemedia-model-worker-cuda:",
        env!("CARGO_PKG_VERSION")
    );
}

/// Reconciles ModelWorker resources into worker Deployments, Services and PodDisruptionBudgets.
#[derive(Clone, Debug, Parser)]
#[command(name = "remotemedia-operator", version, about)]
pub struct Args {
    /// Port of `/healthz`, `/readyz` and `/metrics` (0: any free port)
    #[arg(long, env = "REMOTEMEDIA_OPERATOR_ADMIN_PORT", default_value_t = defaults::ADMIN_PORT)]
    pub admin_port: u16,

    /// Run the controller only while holding the Lease, so replicas can stand by (`false` for a
    /// single replica)
    #[arg(
        long,
        env = "REMOTEMEDIA_OPERATOR_LEADER_ELECTION",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub leader_election: bool,

    /// Name of the coordination.k8s.io Lease the replicas elect a leader on
    #[arg(long, env = "REMOTEMEDIA_OPERATOR_LEASE_NAME", default_value = defaults::LEASE_NAME)]
    pub lease_name: String,

    /// Namespace of the Lease [default: the pod's own namespace in a cluster, else `default`]
    #[arg(long, env = "REMOTEMEDIA_OPERATOR_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Worker image of `device: cpu` ModelWorkers that set no `image`
    #[arg(long, env = "REMOTEMEDIA_OPERATOR_WORKER_IMAGE", default_value = defaults::WORKER_IMAGE)]
    pub worker_image: String,

    /// Worker image of `device: cuda` ModelWorkers that set no `image`
    #[arg(long, env = "REMOTEMEDIA_OPERATOR_WORKER_CUDA_IMAGE", default_value = defaults::WORKER_CUDA_IMAGE)]
    pub worker_cuda_image: String,

    /// The node's socket directory (the sidecar's), mounted into worker pods at the same path
    #[arg(long, env = "REMOTEMEDIA_OPERATOR_SOCKET_DIR", default_value = defaults::SOCKET_DIR)]
    pub socket_dir: PathBuf,

    /// Watch ModelWorkers of this namespace only [default: every namespace]
    #[arg(long, env = "REMOTEMEDIA_OPERATOR_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
}

/// What the controller builds worker pods from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerDefaults {
    pub image: String,
    pub cuda_image: String,
    pub socket_dir: String,
}

/// Leader election, when on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
}

/// A validated configuration; `run` takes it apart field by field.
#[derive(Clone, Debug)]
pub struct Config {
    pub admin_port: u16,
    pub lease: Option<LeaseConfig>,
    pub worker: WorkerDefaults,
    pub watch_namespace: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "failed to start: --{flag} '{value}' is not a DNS name (lowercase letters, digits, '-' and '.', at most {max} characters)"
    )]
    NotDnsName {
        flag: &'static str,
        value: String,
        max: usize,
    },
    #[error("failed to start: --{flag} must not be empty")]
    Empty { flag: &'static str },
    #[error("failed to start: --socket-dir {} is not an absolute path", .0.display())]
    RelativeSocketDir(PathBuf),
}

impl Args {
    /// Checks every flag; `namespace_file` is read only when `--lease-namespace` is absent.
    pub fn validate(self, namespace_file: &Path) -> Result<Config, ConfigError> {
        let Self {
            admin_port,
            leader_election,
            lease_name,
            lease_namespace,
            worker_image,
            worker_cuda_image,
            socket_dir,
            watch_namespace,
        } = self;
        check_name("lease-name", &lease_name, NameKind::Subdomain)?;
        let lease_namespace = match lease_namespace {
            Some(namespace) => namespace,
            None => std::fs::read_to_string(namespace_file)
                .map(|text| text.trim().to_owned())
                .ok()
                .filter(|text| !text.is_empty())
                .unwrap_or_else(|| defaults::LEASE_NAMESPACE_FALLBACK.to_owned()),
        };
        check_name("lease-namespace", &lease_namespace, NameKind::Label)?;
        if let Some(namespace) = &watch_namespace {
            check_name("watch-namespace", namespace, NameKind::Label)?;
        }
        for (flag, value) in [
            ("worker-image", &worker_image),
            ("worker-cuda-image", &worker_cuda_image),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::Empty { flag });
            }
        }
        if !socket_dir.is_absolute() {
            return Err(ConfigError::RelativeSocketDir(socket_dir));
        }
        Ok(Config {
            admin_port,
            lease: leader_election.then_some(LeaseConfig {
                name: lease_name,
                namespace: lease_namespace,
            }),
            worker: WorkerDefaults {
                image: worker_image,
                cuda_image: worker_cuda_image,
                socket_dir: socket_dir.to_string_lossy().into_owned(),
            },
            watch_namespace,
        })
    }
}

/// What Kubernetes requires of a name (RFC 1123): namespaces are DNS labels, object names such
/// as a Lease's are DNS subdomains.
#[derive(Clone, Copy)]
enum NameKind {
    Label,
    Subdomain,
}

fn check_name(flag: &'static str, value: &str, kind: NameKind) -> Result<(), ConfigError> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let (ok, max) = match kind {
        NameKind::Label => (label_ok(value), 63),
        NameKind::Subdomain => (value.len() <= 253 && value.split('.').all(label_ok), 253),
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::NotDnsName {
            flag,
            value: value.to_owned(),
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("remotemedia-operator").chain(args.iter().copied()))
            .unwrap()
    }

    fn no_file() -> &'static Path {
        Path::new("/nonexistent/namespace")
    }

    #[test]
    fn defaults_elect_a_leader_in_the_default_namespace_outside_a_cluster() {
        let config = parse(&[]).validate(no_file()).unwrap();
        assert_eq!(config.admin_port, 8080);
        assert_eq!(
            config.lease,
            Some(LeaseConfig {
                name: "remotemedia-operator".into(),
                namespace: "default".into()
            })
        );
        assert_eq!(
            config.worker.image,
            format!(
                "remotemedia/remotemedia-model-worker:{}",
                env!("CARGO_PKG_VERSION")
            )
        );
        assert_eq!(
            config.worker.cuda_image,
            format!(
                "remotemedia/remotemedia-model-worker-cuda:{}",
                env!("CARGO_PKG_VERSION")
            )
        );
        assert_eq!(config.worker.socket_dir, "/run/remotemedia");
        assert_eq!(config.watch_namespace, None);
    }

    #[test]
    fn lease_namespace_defaults_to_the_pods_namespace_file() {
        let dir = std::env::temp_dir().join(format!("rm-operator-ns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("namespace");
        std::fs::write(&file, "remotemedia-system\n").unwrap();
        let config = parse(&[]).validate(&file).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config.lease.unwrap().namespace, "remotemedia-system");
    }

    #[test]
    fn leader_election_false_runs_without_a_lease() {
        let config = parse(&["--leader-election=false"])
            .validate(no_file())
            .unwrap();
        assert_eq!(config.lease, None);
    }

    #[test]
    fn bad_names_and_paths_are_refused_naming_the_flag() {
        let cases: [(&[&str], &str); 5] = [
            (&["--lease-name", "Bad_Name"], "--lease-name 'Bad_Name'"),
            (&["--lease-namespace", "a.b"], "--lease-namespace 'a.b'"),
            (&["--watch-namespace=-x"], "--watch-namespace '-x'"),
            (&["--worker-image", " "], "--worker-image must not be empty"),
            (&["--socket-dir", "run/rm"], "--socket-dir run/rm"),
        ];
        for (args, expected) in cases {
            let error = parse(args).validate(no_file()).unwrap_err().to_string();
            assert!(error.starts_with("failed to start: "), "{error}");
            assert!(error.contains(expected), "{args:?}: {error}");
        }
    }

    #[test]
    fn a_non_boolean_leader_election_value_is_a_parse_error() {
        let result = Args::try_parse_from(["remotemedia-operator", "--leader-election=maybe"]);
        assert!(result.is_err());
    }
}
