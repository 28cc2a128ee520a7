//! `ModelWorker.status` from what was observed: the Deployment as applied, the worker pods, the
//! other ModelWorkers. Pure: every row of the table below has a unit test built from pod-status
//! fixtures.
//!
//! Counts: `replicas` are the worker pods that exist and are not terminating, `readyReplicas`
//! those of them whose `Ready` condition is true (read from the pods, so status follows them
//! without waiting for the ReplicaSet and Deployment controllers to aggregate). Which pods run
//! the current template is read from the pods too, from their label
//! [`crate::names::LABEL_TEMPLATE_HASH`], not from the Deployment's status (`observedGeneration`,
//! `updatedReplicas`): that reaches the Deployment through two controllers, under load seconds
//! after the pods were ready, and a reconcile that saw ready pods with the status of a
//! Deployment it had just created said `Pending`. (A hand edit of the template that keeps the
//! label makes pods that count as current until the operator's revert has rolled them back.)
//!
//! | Trigger (first matching row wins for `Ready`) | `Ready` | `Progressing` | `Degraded` |
//! |---|---|---|---|
//! | the spec fails the operator's own checks ([`crate::desired::validate`]) | False/`InvalidSpec` | False/`InvalidSpec` | True/`InvalidSpec` |
//! | Deployment `ReplicaFailure=True`, reason `FailedCreate`, message says `violates PodSecurity` | False/`PodSecurityRejected` | True/same | True/same |
//! | Deployment `ReplicaFailure=True`, reason `FailedCreate`, any other message | False/`PodCreationFailed` | True/same | True/same |
//! | a not-ready pod's container terminated (now or last time) with exit code ≠ 0 and a termination message | False/`ModelLoadFailed`, the message | True/same | True/same |
//! | a not-ready pod's container waits in `CrashLoopBackOff` | False/`CrashLooping` | True/same | True/same |
//! | a pod has `PodScheduled=False`/`Unschedulable` and the scheduler's message names `nvidia.com/gpu` | False/`InsufficientGPU`, the scheduler's message | True/same | True/same |
//! | a pod has `PodScheduled=False`/`Unschedulable`, other message | False/`Unschedulable`, the scheduler's message | True/same | True/same |
//! | fewer ready pods of the current template than `spec.replicas`, or extra pods (of any template) | False/`Pending` | True/`Pending` | False/`Pending` |
//! | as many ready pods of the current template as `spec.replicas` (0 included), and no others | True/`Available` | False/`Available` | False/`Available` |
//! | another ModelWorker (any watched namespace) has the same `modelId` | unchanged | unchanged | True/`DuplicateModelId`, naming the others |

use k8s_openapi::{
    api::{apps::v1::Deployment, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use remotemedia_crds::{ConditionReason, ConditionType, ModelWorkerStatus};

use crate::names::{GPU_RESOURCE, LABEL_TEMPLATE_HASH};

/// What blocks worker pods, with the message that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Blocker {
    reason: ConditionReason,
    message: String,
}

/// Everything status is computed from.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    pub generation: Option<i64>,
    pub desired_replicas: i32,
    /// The Deployment as the API server returned it from the apply; `None` when not applied.
    pub deployment: Option<&'a Deployment>,
    /// The label [`crate::names::LABEL_TEMPLATE_HASH`] of the applied pod template.
    pub template_hash: Option<&'a str>,
    pub pods: &'a [Pod],
    /// `<namespace>/<name>` of the other ModelWorkers with the same modelId.
    pub duplicates: &'a [String],
    pub model_id: &'a str,
    /// The operator's own validation refused the spec, with this message.
    pub invalid: Option<String>,
    pub selector: String,
    /// `None` while the Service is not applied.
    pub endpoint: Option<String>,
    pub previous: Option<&'a ModelWorkerStatus>,
    pub now: Time,
}

/// Ranked worst first: the worst blocker across all pods is the one reported.
const SEVERITY: [ConditionReason; 6] = [
    ConditionReason::PodSecurityRejected,
    ConditionReason::PodCreationFailed,
    ConditionReason::ModelLoadFailed,
    ConditionReason::CrashLooping,
    ConditionReason::InsufficientGpu,
    ConditionReason::Unschedulable,
];

pub fn status(observed: &Observed<'_>) -> ModelWorkerStatus {
    let active: Vec<&Pod> = observed.pods.iter().filter(|pod| is_active(pod)).collect();
    let replicas = count(active.len());
    let ready_replicas = count(active.iter().filter(|pod| is_ready(pod)).count());
    let current_ready = count(
        active
            .iter()
            .filter(|pod| is_ready(pod) && is_current(pod, observed.template_hash))
            .count(),
    );
    let desired = observed.desired_replicas;

    let (ready, progressing, mut degraded) = if let Some(message) = &observed.invalid {
        let invalid = ConditionReason::InvalidSpec;
        (
            (false, invalid, message.clone()),
            (false, invalid, message.clone()),
            (true, invalid, message.clone()),
        )
    } else if let Some(Blocker { reason, message }) = blocker(observed.deployment, &active) {
        (
            (false, reason, message.clone()),
            (true, reason, message.clone()),
            (true, reason, message),
        )
    } else {
        let counts = if desired == 0 {
            "scaled to zero".to_owned()
        } else {
            format!("{current_ready} of {desired} replicas ready")
        };
        let done = current_ready >= desired && replicas == desired;
        if done {
            let available = ConditionReason::Available;
            (
                (true, available, counts.clone()),
                (false, available, counts.clone()),
                (false, available, counts),
            )
        } else {
            let pending = ConditionReason::Pending;
            (
                (false, pending, counts.clone()),
                (true, pending, counts.clone()),
                (false, pending, counts),
            )
        }
    };
    if observed.invalid.is_none() && !observed.duplicates.is_empty() {
        degraded = (
            true,
            ConditionReason::DuplicateModelId,
            format!(
                "modelId {} is also served by {}: a sidecar cannot route the bare modelId, clients must name <namespace>/{}",
                observed.model_id,
                observed.duplicates.join(", "),
                observed.model_id
            ),
        );
    }

    let conditions = [
        (ConditionType::Ready, ready),
        (ConditionType::Progressing, progressing),
        (ConditionType::Degraded, degraded),
    ]
    .into_iter()
    .map(|(type_, (status, reason, message))| condition(observed, type_, status, reason, message))
    .collect();

    ModelWorkerStatus {
        observed_generation: observed.generation,
        replicas,
        ready_replicas,
        selector: Some(observed.selector.clone()),
        endpoint: observed.endpoint.clone(),
        conditions,
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn condition(
    observed: &Observed<'_>,
    type_: ConditionType,
    status: bool,
    reason: ConditionReason,
    message: String,
) -> Condition {
    let status = if status { "True" } else { "False" };
    // The time moves only when the status flips, as Kubernetes conditions require.
    let last_transition_time = observed
        .previous
        .and_then(|previous| {
            previous
                .conditions
                .iter()
                .find(|c| c.type_ == type_.as_str() && c.status == status)
        })
        .map_or_else(|| observed.now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.as_str().to_owned(),
        status: status.to_owned(),
        reason: reason.as_str().to_owned(),
        // The API server caps condition messages at 32768 bytes.
        message: truncate(message, 4096),
        last_transition_time,
        observed_generation: observed.generation,
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The pod was made from the template whose hash is `hash`.
fn is_current(pod: &Pod, hash: Option<&str>) -> bool {
    let label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(LABEL_TEMPLATE_HASH));
    hash.is_some() && label.map(String::as_str) == hash
}

/// A pod that counts: not being deleted and not finished.
fn is_active(pod: &Pod) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    pod.metadata.deletion_timestamp.is_none() && !finished
}

fn pod_condition<'a>(
    pod: &'a Pod,
    type_: &str,
) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

fn is_ready(pod: &Pod) -> bool {
    pod_condition(pod, "Ready").is_some_and(|c| c.status == "True")
}

/// The worst thing blocking the worker pods, if any.
fn blocker(deployment: Option<&Deployment>, pods: &[&Pod]) -> Option<Blocker> {
    let mut found: Vec<Blocker> = deployment
        .into_iter()
        .filter_map(creation_failure)
        .collect();
    let mut pods: Vec<&&Pod> = pods.iter().filter(|pod| !is_ready(pod)).collect();
    pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    found.extend(pods.into_iter().filter_map(|pod| pod_blocker(pod)));
    found.into_iter().min_by_key(|blocker| {
        SEVERITY
            .iter()
            .position(|reason| *reason == blocker.reason)
            .unwrap_or(SEVERITY.len())
    })
}

/// The ReplicaSet controller could not create pods; the Deployment controller copies its
/// `ReplicaFailure` condition onto the Deployment.
fn creation_failure(deployment: &Deployment) -> Option<Blocker> {
    let failure = deployment
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| {
            c.type_.as_deref() == Some("ReplicaFailure") && c.status.as_deref() == Some("True")
        })?;
    if failure.reason.as_deref() != Some("FailedCreate") {
        return None;
    }
    let message = failure.message.clone().unwrap_or_default();
    let reason = if message.contains("violates PodSecurity") {
        ConditionReason::PodSecurityRejected
    } else {
        ConditionReason::PodCreationFailed
    };
    Some(Blocker { reason, message })
}

fn pod_blocker(pod: &Pod) -> Option<Blocker> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    for container in statuses {
        let terminations = [
            container.state.as_ref().and_then(|s| s.terminated.as_ref()),
            container
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref()),
        ];
        for terminated in terminations.into_iter().flatten() {
            let message = terminated.message.as_deref().unwrap_or_default().trim();
            if terminated.exit_code != 0 && !message.is_empty() {
                return Some(Blocker {
                    reason: ConditionReason::ModelLoadFailed,
                    message: message.to_owned(),
                });
            }
        }
    }
    for container in statuses {
        let waiting = container.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(waiting) = waiting.filter(|w| w.reason.as_deref() == Some("CrashLoopBackOff")) {
            return Some(Blocker {
                reason: ConditionReason::CrashLooping,
                message: format!(
                    "container {} of pod {name} restarted {} times: {}",
                    container.name,
                    container.restart_count,
                    waiting.message.as_deref().unwrap_or("back-off restarting")
                ),
            });
        }
    }
    let scheduled = pod_condition(pod, "PodScheduled")?;
    if scheduled.status != "False" || scheduled.reason.as_deref() != Some("Unschedulable") {
        return None;
    }
    let message = scheduled.message.clone().unwrap_or_default();
    let reason = if message.contains(GPU_RESOURCE) {
        ConditionReason::InsufficientGpu
    } else {
        ConditionReason::Unschedulable
    };
    Some(Blocker { reason, message })
}

#[cfg(test)]
mod tests;
