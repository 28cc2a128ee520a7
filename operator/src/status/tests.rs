use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::*;

const GPU_MESSAGE: &str = "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.";

/// The template hash of the Deployment the fixtures observe.
const CURRENT: &str = "0123456789abcdef";

/// A pod of the current template.
fn pod(name: &str, status: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": { LABEL_TEMPLATE_HASH: CURRENT } },
        "status": status,
    }))
    .unwrap()
}

/// A ready pod of the template before the current one.
fn ready_old_pod(name: &str) -> Pod {
    let mut pod = ready_pod(name);
    pod.metadata.labels = Some(
        [(
            LABEL_TEMPLATE_HASH.to_owned(),
            "fedcba9876543210".to_owned(),
        )]
        .into(),
    );
    pod
}

fn ready_pod(name: &str) -> Pod {
    pod(
        name,
        json!({ "phase": "Running", "conditions": [{ "type": "Ready", "status": "True" }] }),
    )
}

fn unschedulable_pod(name: &str, message: &str) -> Pod {
    pod(
        name,
        json!({ "phase": "Pending", "conditions": [
            { "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message },
        ]}),
    )
}

/// A Deployment whose controller observed generation 1 and counted `updated` pods.
fn deployment(updated: i32, conditions: Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": { "name": "vad", "generation": 1 },
        "spec": { "selector": {}, "template": {} },
        "status": { "observedGeneration": 1, "updatedReplicas": updated, "conditions": conditions },
    }))
    .unwrap()
}

fn time(seconds: i64) -> Time {
    Time(Timestamp::from_second(seconds).unwrap())
}

/// Status of a ModelWorker wanting `desired` replicas, its Deployment rolled out.
fn observe(desired: i32, pods: &[Pod]) -> ModelWorkerStatus {
    observe_with(desired, pods, &deployment(desired, json!([])), &[], None)
}

fn observe_with(
    desired: i32,
    pods: &[Pod],
    deployment: &Deployment,
    duplicates: &[String],
    previous: Option<&ModelWorkerStatus>,
) -> ModelWorkerStatus {
    status(&Observed {
        generation: Some(7),
        desired_replicas: desired,
        deployment: Some(deployment),
        template_hash: Some(CURRENT),
        pods,
        duplicates,
        model_id: "vad",
        invalid: None,
        selector: "remotemedia.io/model-worker=vad".into(),
        endpoint: Some("vad.ml.svc:50051".into()),
        previous,
        now: time(1_000),
    })
}

/// `(status, reason, message)` of condition `type_`.
fn get(status: &ModelWorkerStatus, type_: &str) -> (String, String, String) {
    let c = status.conditions.iter().find(|c| c.type_ == type_).unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn assert_ready(status: &ModelWorkerStatus, expected_status: &str, reason: &str) -> String {
    let (actual_status, actual_reason, message) = get(status, "Ready");
    assert_eq!(
        (actual_status.as_str(), actual_reason.as_str()),
        (expected_status, reason),
        "{message}"
    );
    message
}

#[test]
fn invalid_spec_is_not_ready_and_degraded_with_the_validation_message() {
    let status = status(&Observed {
        generation: Some(2),
        desired_replicas: 1,
        deployment: None,
        template_hash: None,
        pods: &[],
        duplicates: &[],
        model_id: "vad",
        invalid: Some("spec.model.uri 's3://x' must start with pvc://".into()),
        selector: "s".into(),
        endpoint: None,
        previous: None,
        now: time(1),
    });
    let message = assert_ready(&status, "False", "InvalidSpec");
    assert!(message.contains("s3://x"));
    assert_eq!(get(&status, "Degraded").0, "True");
    assert_eq!(status.observed_generation, Some(2));
}

#[test]
fn pod_security_refusal_of_the_replica_set_is_pod_security_rejected() {
    let message = r#"pods "vad-5d8f-x" is forbidden: violates PodSecurity "baseline:latest": hostPath volumes (volume "sockets")"#;
    let deployment = deployment(
        0,
        json!([
            { "type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": message },
        ]),
    );
    let status = observe_with(2, &[], &deployment, &[], None);
    assert_eq!(
        assert_ready(&status, "False", "PodSecurityRejected"),
        message
    );
    assert_eq!(get(&status, "Degraded").0, "True");
}

#[test]
fn other_pod_creation_failures_are_pod_creation_failed() {
    let message = r#"pods "vad-1" is forbidden: exceeded quota: compute, requested: cpu=2, used: cpu=8, limited: cpu=8"#;
    let deployment = deployment(
        0,
        json!([
            { "type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": message },
        ]),
    );
    let status = observe_with(1, &[], &deployment, &[], None);
    assert_eq!(assert_ready(&status, "False", "PodCreationFailed"), message);
}

#[test]
fn a_terminated_containers_message_is_model_load_failed() {
    let crashed = pod(
        "vad-1",
        json!({ "phase": "Running", "containerStatuses": [{
            "name": "worker", "ready": false, "restartCount": 4, "image": "w", "imageID": "",
            "state": { "waiting": { "reason": "CrashLoopBackOff", "message": "back-off 40s" } },
            "lastState": { "terminated": { "exitCode": 1, "reason": "Error",
                "message": "failed to load the model /models/vad.pt: no config.pbtxt beside it\n" } },
        }]}),
    );
    let status = observe(1, &[crashed]);
    let message = assert_ready(&status, "False", "ModelLoadFailed");
    assert_eq!(
        message,
        "failed to load the model /models/vad.pt: no config.pbtxt beside it"
    );
    assert_eq!(get(&status, "Progressing").1, "ModelLoadFailed");
}

#[test]
fn crash_loop_without_a_termination_message_is_crash_looping() {
    let crashed = pod(
        "vad-1",
        json!({ "phase": "Running", "containerStatuses": [{
            "name": "worker", "ready": false, "restartCount": 5, "image": "w", "imageID": "",
            "state": { "waiting": { "reason": "CrashLoopBackOff", "message": "back-off 1m20s" } },
            "lastState": { "terminated": { "exitCode": 137, "reason": "OOMKilled" } },
        }]}),
    );
    let status = observe(1, &[crashed]);
    let message = assert_ready(&status, "False", "CrashLooping");
    assert!(
        message.contains("restarted 5 times") && message.contains("back-off 1m20s"),
        "{message}"
    );
}

#[test]
fn unschedulable_for_gpus_is_insufficient_gpu_with_the_schedulers_message() {
    let status = observe(
        9,
        &[ready_pod("vad-0"), unschedulable_pod("vad-8", GPU_MESSAGE)],
    );
    assert_eq!(
        assert_ready(&status, "False", "InsufficientGPU"),
        GPU_MESSAGE
    );
    assert_eq!(get(&status, "Degraded").1, "InsufficientGPU");
    assert_eq!((status.replicas, status.ready_replicas), (2, 1));
}

#[test]
fn unschedulable_for_another_reason_is_unschedulable() {
    let message = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.";
    let status = observe(1, &[unschedulable_pod("vad-0", message)]);
    assert_eq!(assert_ready(&status, "False", "Unschedulable"), message);
}

#[test]
fn the_worst_blocker_across_pods_wins() {
    let crashed = pod(
        "vad-b",
        json!({ "containerStatuses": [{
            "name": "worker", "ready": false, "restartCount": 1, "image": "w", "imageID": "",
            "state": { "terminated": { "exitCode": 2, "message": "failed to parse config.pbtxt" } },
        }]}),
    );
    let status = observe(2, &[unschedulable_pod("vad-a", GPU_MESSAGE), crashed]);
    assert_ready(&status, "False", "ModelLoadFailed");
}

#[test]
fn pods_still_starting_are_pending_and_progressing() {
    let starting = pod(
        "vad-1",
        json!({ "phase": "Pending", "conditions": [
            { "type": "PodScheduled", "status": "True" },
            { "type": "Ready", "status": "False" },
        ]}),
    );
    let status = observe(2, &[ready_pod("vad-0"), starting]);
    assert_eq!(
        assert_ready(&status, "False", "Pending"),
        "1 of 2 replicas ready"
    );
    assert_eq!(get(&status, "Progressing").0, "True");
    assert_eq!(get(&status, "Degraded").0, "False");
}

#[test]
fn all_replicas_ready_is_available() {
    let status = observe(2, &[ready_pod("vad-0"), ready_pod("vad-1")]);
    assert_eq!(
        assert_ready(&status, "True", "Available"),
        "2 of 2 replicas ready"
    );
    assert_eq!(get(&status, "Progressing").0, "False");
    assert_eq!((status.replicas, status.ready_replicas), (2, 2));
    assert_eq!(status.endpoint.as_deref(), Some("vad.ml.svc:50051"));
    assert_eq!(
        status.selector.as_deref(),
        Some("remotemedia.io/model-worker=vad")
    );
    assert_eq!(status.observed_generation, Some(7));
}

#[test]
fn scaled_to_zero_is_available() {
    let status = observe(0, &[]);
    assert_eq!(assert_ready(&status, "True", "Available"), "scaled to zero");
}

#[test]
fn ready_pods_of_the_current_template_are_available_before_the_deployment_counts_them() {
    // The Deployment as its creation returned it: no status yet.
    let created: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "vad", "generation": 1 },
        "spec": { "selector": {}, "template": {} },
    }))
    .unwrap();
    let status = observe_with(1, &[ready_pod("vad-0")], &created, &[], None);
    assert_ready(&status, "True", "Available");
    // Observed, but the pod not yet counted.
    let status = observe_with(
        1,
        &[ready_pod("vad-0")],
        &deployment(0, json!([])),
        &[],
        None,
    );
    assert_ready(&status, "True", "Available");
}

#[test]
fn ready_pods_of_an_older_template_do_not_count_during_a_rollout() {
    // No surge (cuda): one old pod replaced so far, the other still serving the old template.
    let status = observe(2, &[ready_old_pod("vad-old"), ready_pod("vad-new")]);
    assert_eq!(
        assert_ready(&status, "False", "Pending"),
        "1 of 2 replicas ready"
    );
    assert_eq!(status.ready_replicas, 2);
    let status = observe(1, &[ready_old_pod("vad-old")]);
    assert_ready(&status, "False", "Pending");
}

#[test]
fn extra_pods_during_a_scale_down_are_pending() {
    let status = observe(1, &[ready_pod("vad-0"), ready_pod("vad-1")]);
    assert_ready(&status, "False", "Pending");
}

#[test]
fn terminating_and_finished_pods_do_not_count() {
    let mut terminating = ready_pod("vad-1");
    terminating.metadata.deletion_timestamp = Some(time(5));
    let finished = pod("vad-2", json!({ "phase": "Failed" }));
    let status = observe(1, &[ready_pod("vad-0"), terminating, finished]);
    assert_ready(&status, "True", "Available");
    assert_eq!(status.replicas, 1);
}

#[test]
fn a_second_model_worker_with_the_same_model_id_is_degraded_duplicate_model_id() {
    let duplicates = ["other/vad".to_owned()];
    let status = observe_with(
        1,
        &[ready_pod("vad-0")],
        &deployment(1, json!([])),
        &duplicates,
        None,
    );
    assert_ready(&status, "True", "Available");
    let (degraded, reason, message) = get(&status, "Degraded");
    assert_eq!(
        (degraded.as_str(), reason.as_str()),
        ("True", "DuplicateModelId")
    );
    assert!(message.contains("other/vad"), "{message}");
}

#[test]
fn transition_time_moves_only_when_the_status_flips() {
    let first = observe(1, &[]);
    let mut previous = first.clone();
    for condition in &mut previous.conditions {
        condition.last_transition_time = time(10);
    }
    // Ready stays False (reason may change): its time stays; nothing else flips either.
    let again = observe_with(
        1,
        &[unschedulable_pod("p", GPU_MESSAGE)],
        &deployment(1, json!([])),
        &[],
        Some(&previous),
    );
    let ready = again
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.last_transition_time, time(10));
    // Degraded flips False → True: a new time.
    let degraded = again
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.last_transition_time, time(1_000));
}
