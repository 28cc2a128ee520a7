//! The pure half of the reconcile: a ModelWorker is checked ([`validate`]) and turned into the
//! objects it should own ([`Desired::build`]): a Deployment of worker pods, a Service for them
//! and, with more than one replica, a PodDisruptionBudget. No API calls here.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment},
        core::v1::{
            Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction, HostPathVolumeSource,
            PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe,
            ResourceRequirements, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
        },
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use kube::{Resource, ResourceExt};
use remotemedia_crds::{Device, ModelWorker};

use crate::{config::WorkerDefaults, names::*};

/// The worker's drain after SIGTERM, passed as its flags so the pod's grace period below covers
/// it by construction: keep serving while endpoints are removed, then finish in-flight requests.
const DRAIN_DELAY_S: i64 = 5;
const DRAIN_TIMEOUT_S: i64 = 20;
/// Time beyond the drain for the process to exit before the kubelet kills it.
const EXIT_MARGIN_S: i64 = 5;
/// Startup budget: loading a large model onto a GPU may take many minutes, and liveness must not
/// kill a worker that is still loading. 5 s × 360 = 30 minutes.
const STARTUP_PERIOD_S: i32 = 5;
const STARTUP_FAILURES: i32 = 360;

/// Why a ModelWorker cannot be built, beyond what the API server's schema already refuses (an
/// object stored before the CRD had a rule, or written with validation off).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    #[error("spec.model.uri '{0}' must start with pvc://, file:// or hostpath://")]
    Scheme(String),
    #[error("spec.model.uri '{0}' must be pvc://<claim>/<path>, the claim a DNS subdomain")]
    Pvc(String),
    #[error("spec.model.uri '{0}' must be an absolute path with an empty host and a file name")]
    Path(String),
    #[error("spec.model.uri '{0}' must not contain a '..' path segment")]
    DotDot(String),
    #[error("spec.gpus {gpus} does not fit device {device}: cuda needs 1, cpu 0")]
    Gpus { gpus: i32, device: &'static str },
    #[error("spec.replicas {0} is negative")]
    Replicas(i32),
    #[error("the ModelWorker has no namespace")]
    Namespace,
}

/// Where the model file is, as the worker container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// A PersistentVolumeClaim of the namespace, mounted read-only at [`MODEL_MOUNT`].
    Pvc { claim: String, path: String },
    /// A file inside the worker image.
    Image { path: String },
    /// A file on the node: its directory (with `config.pbtxt` beside the model) is mounted.
    HostPath { dir: String, file: String },
}

impl ModelLocation {
    pub fn parse(uri: &str) -> Result<Self, InvalidSpec> {
        let has_dot_dot = uri.split('/').any(|segment| segment == "..");
        if has_dot_dot {
            return Err(InvalidSpec::DotDot(uri.to_owned()));
        }
        if let Some(rest) = uri.strip_prefix("pvc://") {
            let (claim, path) = rest
                .split_once('/')
                .ok_or_else(|| InvalidSpec::Pvc(uri.to_owned()))?;
            if !is_dns_subdomain(claim) || path.is_empty() || path.starts_with('/') {
                return Err(InvalidSpec::Pvc(uri.to_owned()));
            }
            return Ok(Self::Pvc {
                claim: claim.to_owned(),
                path: path.to_owned(),
            });
        }
        let absolute = |rest: &str| {
            (rest.starts_with('/') && !rest.starts_with("//") && !rest.ends_with('/'))
                .then(|| rest.to_owned())
                .ok_or_else(|| InvalidSpec::Path(uri.to_owned()))
        };
        if let Some(rest) = uri.strip_prefix("file://") {
            return Ok(Self::Image {
                path: absolute(rest)?,
            });
        }
        if let Some(rest) = uri.strip_prefix("hostpath://") {
            let path = absolute(rest)?;
            let (dir, file) = path.rsplit_once('/').unwrap_or(("", &path));
            // A model at the node's root would mount the whole root file system.
            if dir.is_empty() {
                return Err(InvalidSpec::Path(uri.to_owned()));
            }
            return Ok(Self::HostPath {
                dir: dir.to_owned(),
                file: file.to_owned(),
            });
        }
        Err(InvalidSpec::Scheme(uri.to_owned()))
    }

    /// The worker's `--model-path`.
    fn model_path(&self) -> String {
        match self {
            Self::Pvc { path, .. } => format!("{MODEL_MOUNT}/{path}"),
            Self::Image { path } => path.clone(),
            Self::HostPath { file, .. } => format!("{MODEL_MOUNT}/{file}"),
        }
    }

    fn volume(&self) -> Option<Volume> {
        match self {
            Self::Pvc { claim, .. } => Some(Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            }),
            Self::Image { .. } => None,
            Self::HostPath { dir, .. } => Some(Volume {
                name: "model".into(),
                host_path: Some(HostPathVolumeSource {
                    path: dir.clone(),
                    type_: Some("Directory".into()),
                }),
                ..Volume::default()
            }),
        }
    }
}

fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A ModelWorker that passed [`validate`]: what building needs, without `Option`s left to check.
#[derive(Debug, Clone)]
pub struct Valid<'a> {
    pub worker: &'a ModelWorker,
    pub namespace: String,
    pub location: ModelLocation,
}

/// Checks what the schema cannot or may not have checked.
pub fn validate(worker: &ModelWorker) -> Result<Valid<'_>, InvalidSpec> {
    let spec = &worker.spec;
    let namespace = worker.namespace().ok_or(InvalidSpec::Namespace)?;
    let location = ModelLocation::parse(&spec.model.uri)?;
    match (spec.device, spec.gpus) {
        (Device::Cpu, 0) | (Device::Cuda, 1) => {}
        (device, gpus) => {
            return Err(InvalidSpec::Gpus {
                gpus,
                device: device_name(device),
            });
        }
    }
    if spec.replicas < 0 {
        return Err(InvalidSpec::Replicas(spec.replicas));
    }
    Ok(Valid {
        worker,
        namespace,
        location,
    })
}

fn device_name(device: Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Cuda => "cuda",
    }
}

/// The labels that select a ModelWorker's pods (immutable: the Deployment selector).
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_APP_NAME.to_owned(), APP_NAME.to_owned()),
        (LABEL_MODEL_WORKER.to_owned(), name.to_owned()),
    ])
}

/// [`selector_labels`] in the string form of `status.selector` and list calls.
pub fn selector_string(name: &str) -> String {
    selector_labels(name)
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The Service's address for clients, `<name>.<namespace>.svc:<grpc port>`.
pub fn endpoint(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc:{GRPC_PORT}")
}

/// A hash of a pod template (FNV-1a, 64 bits, of its JSON), carried by the template as the label
/// [`LABEL_TEMPLATE_HASH`]: a pod with the current hash runs the current template. Status counts
/// ready pods by it instead of waiting for the ReplicaSet and Deployment controllers to count
/// them (`status.updatedReplicas`), which under load lagged the pods by seconds. The template
/// holds only what [`Desired::build`] puts there, so the hash changes exactly when the template
/// does (and with it, once, when an operator of another version first applies a Deployment).
pub fn template_hash(template: &PodTemplateSpec) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    // Serializing plain data into memory cannot fail: it has no maps with non-string keys.
    let json = serde_json::to_vec(template).unwrap_or_default();
    let hash = json.iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    });
    format!("{hash:016x}")
}

/// Every object one ModelWorker should own.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub deployment: Deployment,
    /// The label [`LABEL_TEMPLATE_HASH`] of the Deployment's pod template.
    pub template_hash: String,
    pub service: Service,
    /// `None`: the ModelWorker must have no PodDisruptionBudget (one replica or none).
    pub pdb: Option<PodDisruptionBudget>,
}

impl Desired {
    pub fn build(valid: &Valid<'_>, defaults: &WorkerDefaults) -> Self {
        let worker = valid.worker;
        let name = worker.name_any();
        let spec = &worker.spec;
        let labels = {
            let mut labels = selector_labels(&name);
            labels.insert(LABEL_INSTANCE.into(), name.clone());
            labels.insert(LABEL_MANAGED_BY.into(), FIELD_MANAGER.into());
            labels.insert(LABEL_MODEL_ID.into(), spec.model_id.clone());
            labels
        };
        let meta = ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(valid.namespace.clone()),
            labels: Some(labels.clone()),
            owner_references: worker.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..ObjectMeta::default()
        };
        let selector = LabelSelector {
            match_labels: Some(selector_labels(&name)),
            ..LabelSelector::default()
        };
        let mut template = PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some(labels),
                ..ObjectMeta::default()
            }),
            spec: Some(pod_spec(valid, defaults)),
        };
        let hash = template_hash(&template);
        template
            .metadata
            .get_or_insert_default()
            .labels
            .get_or_insert_default()
            .insert(LABEL_TEMPLATE_HASH.into(), hash.clone());
        let deployment = Deployment {
            metadata: meta.clone(),
            spec: DeploymentSpec {
                replicas: Some(spec.replicas),
                selector: selector.clone(),
                strategy: Some(strategy(worker)),
                template,
                ..DeploymentSpec::default()
            },
            status: None,
        };
        let service = Service {
            metadata: meta.clone(),
            spec: Some(ServiceSpec {
                selector: Some(selector_labels(&name)),
                ports: Some(vec![
                    service_port(GRPC_PORT_NAME, GRPC_PORT),
                    service_port(ADMIN_PORT_NAME, ADMIN_PORT),
                ]),
                ..ServiceSpec::default()
            }),
            status: None,
        };
        // One replica with a PDB of maxUnavailable 1 protects nothing; with minAvailable 1 it
        // would block every node drain. Only several replicas get one.
        let pdb = (spec.replicas > 1).then(|| PodDisruptionBudget {
            metadata: meta,
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(selector),
                ..PodDisruptionBudgetSpec::default()
            }),
            status: None,
        });
        Self {
            deployment,
            template_hash: hash,
            service,
            pdb,
        }
    }
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

/// A rolling update; `cuda` defaults to no surge, so a rollout never needs a spare GPU.
fn strategy(worker: &ModelWorker) -> DeploymentStrategy {
    let rollout = worker.spec.rollout.clone().unwrap_or_default();
    let (surge, unavailable) = match worker.spec.device {
        Device::Cuda => (IntOrString::Int(0), IntOrString::Int(1)),
        Device::Cpu => (
            IntOrString::String("25%".into()),
            IntOrString::String("25%".into()),
        ),
    };
    DeploymentStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(rollout.max_surge.unwrap_or(surge)),
            max_unavailable: Some(rollout.max_unavailable.unwrap_or(unavailable)),
        }),
    }
}

fn pod_spec(valid: &Valid<'_>, defaults: &WorkerDefaults) -> PodSpec {
    let spec = &valid.worker.spec;
    let mut volumes = vec![Volume {
        name: "sockets".into(),
        host_path: Some(HostPathVolumeSource {
            path: defaults.socket_dir.clone(),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "sockets".into(),
        mount_path: defaults.socket_dir.clone(),
        ..VolumeMount::default()
    }];
    if let Some(volume) = valid.location.volume() {
        volumes.push(volume);
        mounts.push(VolumeMount {
            name: "model".into(),
            mount_path: MODEL_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    if let Some(size) = &spec.shared_memory_size {
        volumes.push(Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(size.clone()),
                mode: None,
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..VolumeMount::default()
        });
    }
    let image = spec.image.clone().unwrap_or_else(|| match spec.device {
        Device::Cpu => defaults.image.clone(),
        Device::Cuda => defaults.cuda_image.clone(),
    });
    PodSpec {
        containers: vec![Container {
            name: CONTAINER.into(),
            image: Some(image),
            args: Some(worker_args(valid, &defaults.socket_dir)),
            ports: Some(vec![
                container_port(GRPC_PORT_NAME, GRPC_PORT),
                container_port(ADMIN_PORT_NAME, ADMIN_PORT),
            ]),
            env: spec.env.clone(),
            resources: Some(resources(valid)),
            volume_mounts: Some(mounts),
            startup_probe: Some(Probe {
                period_seconds: Some(STARTUP_PERIOD_S),
                failure_threshold: Some(STARTUP_FAILURES),
                ..http_probe("/readyz")
            }),
            readiness_probe: Some(Probe {
                period_seconds: Some(5),
                failure_threshold: Some(1),
                ..http_probe("/readyz")
            }),
            liveness_probe: Some(Probe {
                period_seconds: Some(10),
                failure_threshold: Some(3),
                ..http_probe("/healthz")
            }),
            // The worker writes a fatal start-up error there; a crash without one still reports
            // the end of its log, which status turns into ModelLoadFailed's message.
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Container::default()
        }],
        volumes: Some(volumes),
        termination_grace_period_seconds: Some(DRAIN_DELAY_S + DRAIN_TIMEOUT_S + EXIT_MARGIN_S),
        // Service environment variables for every Service of the namespace are noise to a worker.
        enable_service_links: Some(false),
        node_selector: spec.node_selector.clone(),
        tolerations: spec.tolerations.clone(),
        affinity: spec.affinity.clone(),
        priority_class_name: spec.priority_class_name.clone(),
        runtime_class_name: spec.runtime_class_name.clone(),
        ..PodSpec::default()
    }
}

/// The worker's flags (worker/src/config.rs): only flags the worker has. `--broker` is the
/// mounted node socket directory, so the node sidecar's grants are redeemed and read in place.
fn worker_args(valid: &Valid<'_>, socket_dir: &str) -> Vec<String> {
    let spec = &valid.worker.spec;
    let mut args = vec![
        "--model-id".to_owned(),
        spec.model_id.clone(),
        "--model-path".to_owned(),
        valid.location.model_path(),
        "--device".to_owned(),
        // The device plugin exposes the pod's one GPU as the container's device 0.
        match spec.device {
            Device::Cpu => "cpu".to_owned(),
            Device::Cuda => "cuda:0".to_owned(),
        },
        "--port".to_owned(),
        GRPC_PORT.to_string(),
        "--admin-port".to_owned(),
        ADMIN_PORT.to_string(),
        "--drain-delay".to_owned(),
        format!("{DRAIN_DELAY_S}s"),
        "--drain-timeout".to_owned(),
        format!("{DRAIN_TIMEOUT_S}s"),
        "--broker".to_owned(),
        socket_dir.to_owned(),
    ];
    if let Some(max) = spec.max_concurrency {
        args.extend(["--max-concurrency".to_owned(), max.to_string()]);
    }
    if let Some(batching) = &spec.batching {
        if let Some(size) = batching.max_batch_size {
            args.extend(["--max-batch-size".to_owned(), size.to_string()]);
        }
        if let Some(timeout) = batching.batch_timeout_us {
            args.extend(["--batch-timeout-us".to_owned(), timeout.to_string()]);
        }
    }
    args
}

/// The user's CPU and memory, plus the GPUs of `spec.gpus` as a limit (the device plugin's
/// extended resource: its request equals its limit).
fn resources(valid: &Valid<'_>) -> ResourceRequirements {
    let spec = &valid.worker.spec;
    let mut resources = spec.resources.clone().unwrap_or_default();
    if spec.gpus > 0 {
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), Quantity(spec.gpus.to_string()));
    }
    resources
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn http_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            ..HTTPGetAction::default()
        }),
        ..Probe::default()
    }
}

#[cfg(test)]
mod tests;
