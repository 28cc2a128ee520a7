//! Command-line flags (each with its `REMOTEMEDIA_WORKER_*` environment twin) and their
//! validation. Everything is checked here, before any port is bound.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::Parser;

use crate::{
    backend::{ModelSource, SourceError},
    batcher::BatchPolicy,
    defaults,
};

/// Loads one model and serves it over Triton's gRPC inference protocol.
#[derive(Debug, Clone, Parser)]
#[command(name = "remotemedia-model-worker", version, about)]
pub struct Config {
    /// Name clients address the model by [default: the built-in model's name]
    #[arg(long, env = "REMOTEMEDIA_WORKER_MODEL_ID")]
    pub model_id: Option<String>,

    /// The model: `builtin://identity` or `builtin://checksum` (with `?load_delay_ms=`,
    /// `?infer_delay_ms=`, `?datatype=`, `?shape=`), or a TorchScript file with Triton's
    /// `config.pbtxt` beside it
    #[arg(long, env = "REMOTEMEDIA_WORKER_MODEL_PATH")]
    pub model_path: String,

    /// Device to run the model on: `cpu` or `cuda:N`
    #[arg(long, env = "REMOTEMEDIA_WORKER_DEVICE", default_value_t = defaults::DEVICE)]
    pub device: Device,

    /// Threads libtorch uses within one operator [default: libtorch's, one per core; with
    /// several --instances, the cores shared out among them]
    #[arg(long, env = "REMOTEMEDIA_WORKER_INTRA_OP_THREADS")]
    pub intra_op_threads: Option<usize>,

    /// Address the gRPC and admin ports bind to, e.g. the pod's IP [default: every address]
    #[arg(long, env = "REMOTEMEDIA_WORKER_LISTEN_ADDRESS", default_value_t = defaults::LISTEN_ADDRESS)]
    pub listen_address: IpAddr,

    /// Port for gRPC inference and plain HTTP `GET /health`
    #[arg(long, env = "REMOTEMEDIA_WORKER_PORT", default_value_t = defaults::GRPC_PORT)]
    pub port: u16,

    /// Port for `/healthz`, `/readyz` and `/metrics`
    #[arg(long, env = "REMOTEMEDIA_WORKER_ADMIN_PORT", default_value_t = defaults::ADMIN_PORT)]
    pub admin_port: u16,

    /// Also serve gRPC on this Unix socket path
    #[arg(long, env = "REMOTEMEDIA_WORKER_UDS")]
    pub uds: Option<PathBuf>,

    /// The node sidecar's socket directory (holding `broker.sock`): regions a colocated sidecar
    /// grants are redeemed there and read in place
    #[arg(long, env = "REMOTEMEDIA_WORKER_BROKER")]
    pub broker: Option<PathBuf>,

    /// With --broker: how often (e.g. `1s`) the worker asks the broker which of its cached
    /// regions nobody else holds any more, and unmaps them, while no request comes (each
    /// request's grant does it too); `0s` only at requests
    #[arg(long, env = "REMOTEMEDIA_WORKER_ORPHAN_SWEEP_INTERVAL", default_value_t = defaults::ORPHAN_SWEEP_INTERVAL.into())]
    pub orphan_sweep_interval: humantime::Duration,

    /// Forward-pass executors: threads that each run one pass (of one request or a batch) at a
    /// time, like Triton's instance count. Each pass uses --intra-op-threads threads
    #[arg(long, env = "REMOTEMEDIA_WORKER_INSTANCES", default_value_t = defaults::INSTANCES)]
    pub instances: usize,

    /// Requests in forward passes at once, over all executors and their batches; more wait in
    /// the queue
    #[arg(long, env = "REMOTEMEDIA_WORKER_MAX_CONCURRENCY", default_value_t = defaults::MAX_CONCURRENCY)]
    pub max_concurrency: usize,

    /// Requests that may wait for an executor; more are refused with RESOURCE_EXHAUSTED
    #[arg(long, env = "REMOTEMEDIA_WORKER_MAX_QUEUE", default_value_t = defaults::MAX_QUEUE)]
    pub max_queue: usize,

    /// Dynamic batching: most rows (dim 0) of queued requests concatenated into one forward
    /// pass; 1 turns batching off. This flag wins over config.pbtxt, up to the model's
    /// max_batch_size [default: config.pbtxt's max_batch_size if it sets dynamic_batching,
    /// else 1; built-in models have no batch dim and never batch]
    #[arg(long, env = "REMOTEMEDIA_WORKER_MAX_BATCH_SIZE")]
    pub max_batch_size: Option<usize>,

    /// Dynamic batching: microseconds the oldest queued request waits for others to fill its
    /// batch. This flag wins over config.pbtxt [default: its
    /// dynamic_batching.max_queue_delay_microseconds, else 0]
    #[arg(long, env = "REMOTEMEDIA_WORKER_BATCH_TIMEOUT_US")]
    pub batch_timeout_us: Option<u64>,

    /// Largest gRPC message received or sent, in bytes
    #[arg(long, env = "REMOTEMEDIA_WORKER_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// After SIGTERM, keep serving this long (e.g. `5s`) while endpoints are removed
    #[arg(long, env = "REMOTEMEDIA_WORKER_DRAIN_DELAY", default_value_t = defaults::DRAIN_DELAY.into())]
    pub drain_delay: humantime::Duration,

    /// Then give in-flight requests this long (e.g. `20s`) to finish
    #[arg(long, env = "REMOTEMEDIA_WORKER_DRAIN_TIMEOUT", default_value_t = defaults::DRAIN_TIMEOUT.into())]
    pub drain_timeout: humantime::Duration,

    /// Serve Triton's system shared memory: clients sharing this worker's IPC namespace register
    /// POSIX shared-memory objects by key and pass tensors through them (`false` turns it off)
    #[arg(
        long,
        env = "REMOTEMEDIA_WORKER_ALLOW_NAMED_SHM",
        default_value_t = defaults::ALLOW_NAMED_SHM,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_named_shm: bool,

    /// File a fatal start-up error is written to, for Kubernetes' termination message
    #[arg(long, env = "REMOTEMEDIA_WORKER_TERMINATION_LOG", default_value = defaults::TERMINATION_LOG)]
    pub termination_log: PathBuf,
}

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(u32),
}

impl FromStr for Device {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("unknown device '{text}': expected cpu or cuda:N");
        match text {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|index| index.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(invalid),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

/// Configuration that was checked and is ready to run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model_id: String,
    pub source: ModelSource,
    pub device: Device,
    pub intra_op_threads: Option<usize>,
    pub listen_address: IpAddr,
    pub port: u16,
    pub admin_port: u16,
    pub uds: Option<PathBuf>,
    pub broker: Option<PathBuf>,
    /// `None`: orphaned regions are returned at requests only.
    pub orphan_sweep_interval: Option<Duration>,
    pub instances: usize,
    pub max_concurrency: usize,
    pub max_queue: usize,
    pub batching: BatchPolicy,
    pub max_message_bytes: usize,
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
    pub allow_named_shm: bool,
}

/// Bad configuration: the worker refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid --model-path")]
    ModelPath(#[from] SourceError),
    #[error(
        "invalid --model-id '{0}': use 1 to 253 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    ModelId(String),
    #[error("invalid --device {device}: {reason}")]
    Device { device: Device, reason: String },
    #[error("--port and --admin-port are both {0}: they must differ")]
    SamePorts(u16),
    #[error("invalid --{flag} 0: it must be at least 1")]
    Zero { flag: &'static str },
    #[error("invalid --max-batch-size {given}: {reason}")]
    MaxBatchSize { given: usize, reason: String },
    #[error(
        "invalid batch delay of {0} microseconds (--batch-timeout-us or config.pbtxt's max_queue_delay_microseconds): at most {MAX_BATCH_DELAY_US}"
    )]
    BatchDelay(u128),
    #[error("invalid --uds {path}: {reason}")]
    Uds { path: PathBuf, reason: &'static str },
    #[error("invalid --broker {0}: not an absolute path")]
    RelativeBroker(PathBuf),
}

/// CUDA devices the model could run on: those libtorch sees.
#[cfg(feature = "torch")]
fn cuda_device_count() -> usize {
    crate::backend::cuda_device_count()
}

/// Without libtorch no model runs on CUDA; the GPUs the NVIDIA driver lists still make
/// `cuda:N` beyond them a clearer error than the built-ins' "cpu only".
#[cfg(not(feature = "torch"))]
fn cuda_device_count() -> usize {
    std::fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |entries| entries.count())
}

/// Longest model id: a DNS subdomain, so it can name Kubernetes objects.
const MAX_MODEL_ID_LEN: usize = 253;

impl Config {
    /// Checks every flag and resolves defaults; nothing is bound or loaded yet.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let Config {
            model_id,
            model_path,
            device,
            intra_op_threads,
            listen_address,
            port,
            admin_port,
            uds,
            broker,
            orphan_sweep_interval,
            instances,
            max_concurrency,
            max_queue,
            max_batch_size,
            batch_timeout_us,
            max_message_bytes,
            drain_delay,
            drain_timeout,
            allow_named_shm,
            termination_log: _,
        } = self;
        if let Some(dir) = broker.as_ref().filter(|dir| !dir.is_absolute()) {
            return Err(ConfigError::RelativeBroker(dir.clone()));
        }
        // The device first: a model that cannot run on it is beside the point.
        check_device(device, cuda_device_count())?;
        let source = ModelSource::parse(&model_path)?;
        if matches!(source, ModelSource::Builtin(_)) && device != Device::Cpu {
            return Err(ConfigError::Device {
                device,
                reason: "built-in models run on the cpu".into(),
            });
        }
        let model_id = model_id.unwrap_or_else(|| source.default_model_id().to_owned());
        if !valid_model_id(&model_id) {
            return Err(ConfigError::ModelId(model_id));
        }
        if port == admin_port && port != 0 {
            return Err(ConfigError::SamePorts(port));
        }
        for (flag, value) in [
            ("instances", instances),
            ("max-concurrency", max_concurrency),
            ("max-batch-size", max_batch_size.unwrap_or(1)),
            ("max-message-bytes", max_message_bytes),
            ("intra-op-threads", intra_op_threads.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { flag });
            }
        }
        if let Some(path) = &uds {
            check_uds(path)?;
        }
        let batching = batch_policy(source.batching(), max_batch_size, batch_timeout_us)?;
        // Executors running at once share the cores rather than each taking all of them.
        let intra_op_threads = intra_op_threads.or_else(|| {
            (instances > 1).then(|| {
                std::thread::available_parallelism()
                    .map_or(1, |cores| (cores.get() / instances).max(1))
            })
        });
        Ok(Settings {
            model_id,
            source,
            device,
            intra_op_threads,
            listen_address,
            port,
            admin_port,
            uds,
            broker,
            orphan_sweep_interval: Some(orphan_sweep_interval.into())
                .filter(|interval: &Duration| !interval.is_zero()),
            instances,
            max_concurrency,
            max_queue,
            batching,
            max_message_bytes,
            drain_delay: drain_delay.into(),
            drain_timeout: drain_timeout.into(),
            allow_named_shm,
        })
    }
}

/// Longest batch delay: a request held longer for company is a configuration mistake.
const MAX_BATCH_DELAY_US: u64 = 60_000_000;

/// Dynamic batching from the model's configuration (`max_batch_size`, and `dynamic_batching`'s
/// max queue delay when it is set) and the flags, which win.
fn batch_policy(
    (model_max, dynamic_batching): (u32, Option<Duration>),
    max_batch_size: Option<usize>,
    batch_timeout_us: Option<u64>,
) -> Result<BatchPolicy, ConfigError> {
    let model_max = model_max as usize;
    let max_batch_size = match max_batch_size {
        Some(given) if given > 1 && model_max == 0 => {
            return Err(ConfigError::MaxBatchSize {
                given,
                reason: "the model has no batch dim (max_batch_size 0 in its config.pbtxt; built-in models have none)".into(),
            });
        }
        Some(given) if given > model_max.max(1) => {
            return Err(ConfigError::MaxBatchSize {
                given,
                reason: format!(
                    "the model's config.pbtxt allows at most max_batch_size {model_max}"
                ),
            });
        }
        Some(given) => given,
        None if dynamic_batching.is_some() => model_max.max(1),
        None => 1,
    };
    let max_queue_delay = batch_timeout_us
        .map(Duration::from_micros)
        .or(dynamic_batching)
        .unwrap_or(Duration::ZERO);
    if max_queue_delay.as_micros() > u128::from(MAX_BATCH_DELAY_US) {
        return Err(ConfigError::BatchDelay(max_queue_delay.as_micros()));
    }
    Ok(BatchPolicy {
        max_batch_size,
        max_queue_delay,
    })
}

fn check_device(device: Device, count: usize) -> Result<(), ConfigError> {
    let Device::Cuda(index) = device else {
        return Ok(());
    };
    if index as usize >= count {
        let reason = match count {
            0 => "this machine has no CUDA device".to_owned(),
            n => format!(
                "this machine has {n} CUDA devices (cuda:0 to cuda:{})",
                n - 1
            ),
        };
        return Err(ConfigError::Device { device, reason });
    }
    Ok(())
}

fn valid_model_id(id: &str) -> bool {
    id.len() <= MAX_MODEL_ID_LEN
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_uds(path: &Path) -> Result<(), ConfigError> {
    let invalid = |reason| ConfigError::Uds {
        path: path.to_owned(),
        reason,
    };
    let parent = match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => return Err(invalid("it is not a file path")),
    };
    if !parent.is_dir() {
        return Err(invalid("its directory does not exist"));
    }
    // A socket left by an earlier run is replaced when binding; anything else is not ours.
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if !std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()) => {
            Err(invalid("a file that is not a socket is in the way"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Config {
        let mut argv = vec!["remotemedia-model-worker"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).unwrap()
    }

    #[test]
    fn defaults_follow_the_design() {
        let settings = config(&["--model-path", "builtin://identity"])
            .validate()
            .unwrap();
        assert_eq!(settings.model_id, "identity");
        assert_eq!((settings.port, settings.admin_port), (50051, 9090));
        assert_eq!(settings.listen_address, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(settings.device, Device::Cpu);
        assert_eq!(settings.max_concurrency, 100);
        assert_eq!(settings.instances, 1);
        assert_eq!(settings.batching, BatchPolicy::OFF, "built-ins never batch");
        assert_eq!(settings.drain_delay, Duration::from_secs(5));
        assert!(settings.allow_named_shm);
    }

    #[test]
    fn named_shared_memory_can_be_turned_off() {
        let base = ["--model-path", "builtin://identity", "--allow-named-shm"];
        for (value, expected) in [(Some("false"), false), (Some("true"), true), (None, true)] {
            let mut args = base.to_vec();
            args.extend(value);
            let settings = config(&args).validate().unwrap();
            assert_eq!(settings.allow_named_shm, expected, "{value:?}");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        let settings = config(&[
            "--model-path",
            "builtin://identity",
            "--drain-delay",
            "250ms",
            "--drain-timeout",
            "1m",
        ])
        .validate()
        .unwrap();
        assert_eq!(settings.drain_delay, Duration::from_millis(250));
        assert_eq!(settings.drain_timeout, Duration::from_secs(60));
    }

    #[test]
    fn batching_comes_from_the_config_and_the_flags_win() {
        let dynamic = (8, Some(Duration::from_micros(500)));
        let policy = |model, size, timeout| batch_policy(model, size, timeout).unwrap();
        assert_eq!(
            policy(dynamic, None, None),
            BatchPolicy {
                max_batch_size: 8,
                max_queue_delay: Duration::from_micros(500)
            }
        );
        assert_eq!(
            policy(dynamic, Some(4), Some(50)),
            BatchPolicy {
                max_batch_size: 4,
                max_queue_delay: Duration::from_micros(50)
            }
        );
        assert_eq!(policy(dynamic, Some(1), None).max_batch_size, 1);
        // A batch dim without dynamic_batching: off unless the flag turns it on, as in Triton.
        assert_eq!(policy((8, None), None, None), BatchPolicy::OFF);
        assert_eq!(policy((8, None), Some(8), None).max_batch_size, 8);
        let too_big = batch_policy(dynamic, Some(9), None).unwrap_err();
        assert!(
            too_big.to_string().contains("at most max_batch_size 8"),
            "{too_big}"
        );
        let no_batch_dim = batch_policy((0, None), Some(2), None).unwrap_err();
        assert!(
            no_batch_dim.to_string().contains("no batch dim"),
            "{no_batch_dim}"
        );
        assert_eq!(policy((0, None), Some(1), None), BatchPolicy::OFF);
        for (model, timeout) in [
            (dynamic, Some(u64::MAX)),
            ((8, Some(Duration::from_secs(61))), None),
        ] {
            let error = batch_policy(model, None, timeout).unwrap_err();
            assert!(error.to_string().contains("at most 60000000"), "{error}");
        }
        assert_eq!(
            policy(dynamic, None, Some(60_000_000)).max_queue_delay,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn several_instances_share_the_cores() {
        let settings = config(&["--model-path", "builtin://identity", "--instances", "64"])
            .validate()
            .unwrap();
        assert_eq!(settings.intra_op_threads, Some(1));
        let settings = config(&[
            "--model-path",
            "builtin://identity",
            "--instances",
            "2",
            "--intra-op-threads",
            "3",
        ])
        .validate()
        .unwrap();
        assert_eq!(settings.intra_op_threads, Some(3));
    }

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CPU"] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cuda_device_beyond_the_machines_is_refused() {
        let error = check_device(Device::Cuda(0), 0).unwrap_err();
        assert!(error.to_string().contains("no CUDA device"), "{error}");
        check_device(Device::Cuda(0), 1).unwrap();
        check_device(Device::Cpu, 0).unwrap();
        let error = check_device(Device::Cuda(2), 2).unwrap_err();
        assert!(error.to_string().contains("cuda:0 to cuda:1"), "{error}");
    }

    #[test]
    fn bad_flags_are_refused() {
        let cases: &[&[&str]] = &[
            &["--model-path", "builtin://nope"],
            &["--model-path", "builtin://identity", "--model-id", "a/b"],
            &["--model-path", "builtin://identity", "--model-id", ""],
            &[
                "--model-path",
                "builtin://identity",
                "--port",
                "7000",
                "--admin-port",
                "7000",
            ],
            &[
                "--model-path",
                "builtin://identity",
                "--max-concurrency",
                "0",
            ],
            &[
                "--model-path",
                "builtin://identity",
                "--uds",
                "/nonexistent-dir/w.sock",
            ],
            &[
                "--model-path",
                "builtin://identity",
                "--intra-op-threads",
                "0",
            ],
            &["--model-path", "builtin://identity", "--instances", "0"],
            &[
                "--model-path",
                "builtin://identity",
                "--max-batch-size",
                "0",
            ],
            &[
                "--model-path",
                "builtin://checksum",
                "--max-batch-size",
                "8",
            ],
        ];
        for args in cases {
            assert!(config(args).validate().is_err(), "{args:?}");
        }
    }

    #[test]
    fn every_flag_has_an_env_twin_and_help() {
        let command = <Config as clap::CommandFactory>::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{id} has no env twin"));
            let expected = format!("REMOTEMEDIA_WORKER_{}", id.to_uppercase());
            assert_eq!(env.to_str(), Some(expected.as_str()));
            assert!(arg.get_help().is_some(), "--{id} has no help");
        }
    }
}
