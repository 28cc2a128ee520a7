//! `ModelWorker.spec`: what to serve, on what hardware, with how many replicas.
//!
//! Validation lives beside each field: bounds and enums in the schema, rules that relate fields
//! or inspect strings in CEL. Every field a rule inspects is read behind `has()` and every string
//! it inspects has a `maxLength`, so the API server's cost estimate stays within its budget.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration},
    apimachinery::pkg::{api::resource::Quantity, util::intstr::IntOrString},
};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::ModelWorkerStatus;

/// What to serve, on what hardware, with how many replicas.
// Clippy reads the repeated `type_ = ...` of separate printer columns as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "remotemedia.io",
    version = "v1alpha1",
    kind = "ModelWorker",
    plural = "modelworkers",
    shortname = "mw",
    category = "remotemedia",
    namespaced,
    status = "ModelWorkerStatus",
    derive = "PartialEq",
    doc = "A model served by RemoteMedia model workers: pods that load it once and answer many clients over gRPC (Triton's GRPCInferenceService), reached in place through the node sidecar or over the network.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.modelId"),
    printcolumn(name = "Device", type_ = "string", json_path = ".spec.device"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        description = "Why the ModelWorker is or is not ready",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    )
)]
#[x_kube(
    validation = Rule::new("!has(self.gpus) || self.gpus == 0 || (has(self.device) && self.device == 'cuda')")
        .message("gpus needs device: cuda")
        .field_path(".gpus")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(self.device) || self.device != 'cuda' || (has(self.gpus) && self.gpus > 0)")
        .message("device: cuda needs gpus: 1")
        .field_path(".gpus")
        .reason(Reason::FieldValueRequired),
)]
#[schemars(transform = crate::unwrap_docs)]
#[serde(rename_all = "camelCase")]
pub struct ModelWorkerSpec {
    /// The name clients give in inference requests (Triton's model name). A DNS label: lowercase
    /// letters, digits and '-', at most 63 characters. The sidecar also accepts
    /// `<namespace>/<modelId>`; a bare modelId must be unique among the ModelWorkers a sidecar
    /// routes to.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("must be a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit"))]
    pub model_id: String,

    /// Where the model is stored.
    pub model: ModelSource,

    /// The worker container image. Unset: the worker image of the operator's own release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// What runs the forward pass: `cpu`, or `cuda` (one GPU per replica, set with `gpus: 1`).
    #[serde(default)]
    pub device: Device,

    /// GPUs per replica (`nvidia.com/gpu`): 1 with `device: cuda`, else 0. In v1alpha1 a replica
    /// runs one model instance on one whole GPU.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    pub gpus: i32,

    /// Number of worker pods. 0 stops every pod but keeps the ModelWorker; `kubectl scale` and a
    /// HorizontalPodAutoscaler set this field through the scale subresource.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,

    /// Lets the node sidecar ask for one replica (through the scale subresource) when a request
    /// arrives while replicas is 0, holding the request until a worker is ready (at most the
    /// sidecar's hold timeout). Without it, such a request is answered UNAVAILABLE at once.
    #[serde(default)]
    pub scale_from_zero: bool,

    /// CPU and memory for the worker container. GPUs come from `gpus`, never from here; the
    /// memory limit must also cover `sharedMemorySize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!has(self.limits) || !('nvidia.com/gpu' in self.limits)")
        .message("set GPUs with spec.gpus, not in resources.limits")
        .field_path(".limits")
        .reason(Reason::FieldValueForbidden))]
    #[x_kube(validation = Rule::new("!has(self.requests) || !('nvidia.com/gpu' in self.requests)")
        .message("set GPUs with spec.gpus, not in resources.requests")
        .field_path(".requests")
        .reason(Reason::FieldValueForbidden))]
    pub resources: Option<ResourceRequirements>,

    /// Dynamic batching: requests whose shapes match are run as one forward pass. Unset fields
    /// take the worker's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<Batching>,

    /// Requests one replica runs at once (the worker's `--max-concurrency`); more wait in its
    /// queue. From 1 to 10000; unset: the worker's default (100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub max_concurrency: Option<i32>,

    /// How replicas are replaced when the pod template changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,

    /// Size of the pod's `/dev/shm`, a memory-backed volume that counts against the container's
    /// memory limit. Unset: the container runtime's default (64Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_memory_size: Option<Quantity>,

    /// Labels a node must carry to run a worker pod. GPUs are placed by the `nvidia.com/gpu`
    /// limit alone: the operator adds no node labels of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Taints the worker pods tolerate, such as those that reserve GPU nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Node and pod affinity of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// PriorityClass of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// RuntimeClass of the worker pods, such as `nvidia` where GPU pods need that runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,

    /// Extra environment variables of the worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
}

fn default_replicas() -> i32 {
    1
}

/// Where the model is stored.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[schemars(transform = crate::unwrap_docs)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Location of the TorchScript model, with its Triton `config.pbtxt` beside it:
    /// `pvc://<claim>/<path>` (a PersistentVolumeClaim in the ModelWorker's namespace, mounted
    /// read-only), `file:///<path>` (inside the worker image) or `hostpath:///<path>` (on the
    /// node). At most 1024 characters.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('pvc://') || self.startsWith('file://') || self.startsWith('hostpath://')")
        .message("must start with pvc://, file:// or hostpath://"))]
    #[x_kube(validation = Rule::new("!self.startsWith('pvc://') || self.matches('^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[^/]')")
        .message("must be pvc://<claim>/<path>, the claim a DNS subdomain"))]
    #[x_kube(validation = Rule::new("!(self.startsWith('file://') || self.startsWith('hostpath://')) || self.matches('^[a-z]+:///[^/]')")
        .message("must be an absolute path with an empty host: file:///<path> or hostpath:///<path>"))]
    #[x_kube(validation = Rule::new("!self.contains('/../') && !self.endsWith('/..')")
        .message("must not contain a '..' path segment"))]
    pub uri: String,
}

/// What runs the forward pass.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU, with libtorch's intra-op threads.
    #[default]
    Cpu,
    /// One NVIDIA GPU per replica.
    Cuda,
}

/// Dynamic batching of the worker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[schemars(transform = crate::unwrap_docs)]
#[serde(rename_all = "camelCase")]
pub struct Batching {
    /// Most requests concatenated into one forward pass, from 1 (no batching) to 1024, at most the
    /// model's `max_batch_size`. Unset: the model's config.pbtxt decides (its `max_batch_size`
    /// when it declares `dynamic_batching`, else no batching). Built-in models never batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: Option<i32>,

    /// How long, in microseconds, the first queued request waits for others to join its batch,
    /// from 0 to 1000000 (one second). Unset: the model's config.pbtxt
    /// (`max_queue_delay_microseconds`), else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub batch_timeout_us: Option<i32>,
}

/// CEL rule for an int-or-string rollout bound: a count, or a string that is a percentage.
/// `string(self) != self` holds only for the integer form; it stands in for `type(self) == int`,
/// which kube's client-side CEL cannot evaluate. The fields it checks carry a `maxLength` (of the
/// string form) so the API server can bound the cost of the regular expression.
const COUNT_OR_PERCENT: &str =
    "string(self).matches('^[0-9]+%?$') && (string(self) != self || self.endsWith('%'))";

/// How replicas are replaced when the pod template changes: a Deployment rolling update.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[schemars(transform = crate::unwrap_docs)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.maxSurge) || !has(self.maxUnavailable) || !(string(self.maxSurge) in ['0', '0%'] && string(self.maxUnavailable) in ['0', '0%'])")
        .message("maxSurge and maxUnavailable must not both be 0: the rollout could never progress")
        .field_path(".maxUnavailable")
)]
pub struct Rollout {
    /// Pods created above `replicas` during a rollout: a count or a percentage. Unset: 0 with
    /// `device: cuda`, so a rollout never needs a spare GPU; 25% otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxLength" = 16))]
    #[x_kube(validation = Rule::new(COUNT_OR_PERCENT)
        .message("must be a count of at least 0 or a percentage such as 25%"))]
    pub max_surge: Option<IntOrString>,

    /// Pods that may be unavailable during a rollout: a count or a percentage. Unset: 1 with
    /// `device: cuda`; 25% otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxLength" = 16))]
    #[x_kube(validation = Rule::new(COUNT_OR_PERCENT)
        .message("must be a count of at least 0 or a percentage such as 25%"))]
    pub max_unavailable: Option<IntOrString>,
}

#[cfg(test)]
mod tests;
