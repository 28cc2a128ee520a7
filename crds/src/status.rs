//! `ModelWorker.status`: what the operator observed, written through the status subresource.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the operator last observed of the ModelWorker's pods and Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[schemars(transform = crate::unwrap_docs)]
#[serde(rename_all = "camelCase")]
pub struct ModelWorkerStatus {
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Worker pods that exist, ready or not (the scale subresource's `status.replicas`).
    #[serde(default)]
    pub replicas: i32,

    /// Worker pods that loaded the model, passed a warm-up pass and serve requests.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Label selector of the worker pods in string form (`key=value,...`), for the scale
    /// subresource: `kubectl scale`, HorizontalPodAutoscaler and KEDA read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Where clients reach the model over the network: the Service's DNS name and gRPC port,
    /// `<name>.<namespace>.svc:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// `Ready`, `Progressing` and `Degraded`; a reason such as `InsufficientGPU` or
    /// `ModelLoadFailed` names what blocks the ModelWorker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The `type` of each condition in [`ModelWorkerStatus::conditions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionType {
    /// Every desired replica is ready.
    Ready,
    /// A rollout or scale is under way.
    Progressing,
    /// Something blocks the ModelWorker; the reason names it.
    Degraded,
}

impl ConditionType {
    /// The condition's `type` as written in the status.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Progressing => "Progressing",
            Self::Degraded => "Degraded",
        }
    }
}

/// The `reason` of a condition: what the ModelWorker's state comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionReason {
    /// Every desired replica is ready.
    Available,
    /// Worker pods cannot be scheduled for want of `nvidia.com/gpu`.
    InsufficientGpu,
    /// Worker pods cannot be scheduled for another reason (the message says which).
    Unschedulable,
    /// The worker could not load the model; the message carries its termination message.
    ModelLoadFailed,
    /// Worker containers restart repeatedly.
    CrashLooping,
    /// The namespace's Pod Security level refuses the worker pods (they mount a hostPath).
    PodSecurityRejected,
    /// Another ModelWorker a sidecar routes to uses the same `modelId`.
    DuplicateModelId,
    /// Pods cannot be created for another reason than Pod Security (a quota, a missing
    /// ServiceAccount); the message is the ReplicaSet controller's.
    PodCreationFailed,
    /// The spec cannot be turned into worker pods (a rule the API server did not enforce).
    InvalidSpec,
    /// Worker pods are being created, scheduled, or are loading the model; nothing blocks them.
    Pending,
}

impl ConditionReason {
    /// The condition's `reason` as written in the status.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Available => "Available",
            Self::InsufficientGpu => "InsufficientGPU",
            Self::Unschedulable => "Unschedulable",
            Self::ModelLoadFailed => "ModelLoadFailed",
            Self::CrashLooping => "CrashLooping",
            Self::PodSecurityRejected => "PodSecurityRejected",
            Self::DuplicateModelId => "DuplicateModelId",
            Self::PodCreationFailed => "PodCreationFailed",
            Self::InvalidSpec => "InvalidSpec",
            Self::Pending => "Pending",
        }
    }
}
