//! Smoke tests of the local control plane: the scheduler, the controllers, the simulated nodes,
//! admission and service-account tokens all work, so later end-to-end tests can rely on them.

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::Deployment,
    authentication::v1::{SelfSubjectReview, TokenRequest},
    core::v1::{Node, Pod, ServiceAccount},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use remotemedia_e2e::{
    Error, Probe, TestNamespace, api, client, client_with_token, status_code, wait_until,
};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(60);
const GPU: &str = "nvidia.com/gpu";

/// A pod of one container asking for `gpus` GPUs. kwok never pulls the image: any name will do.
fn gpu_pod(name: &str, gpus: u32) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "containers": [{
                "name": "worker",
                "image": "remotemedia/e2e-placeholder:1",
                "resources": { "limits": { GPU: gpus.to_string() } },
            }],
        },
    }))
    .expect("a pod built from literals is valid")
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

#[tokio::test]
async fn deployment_becomes_ready_on_simulated_nodes() -> Result<(), Error> {
    let client = client().await?;
    let ns = TestNamespace::create(&client, "deployment").await?;
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "smoke" },
        "spec": {
            "replicas": 3,
            "selector": { "matchLabels": { "app": "smoke" } },
            "template": {
                "metadata": { "labels": { "app": "smoke" } },
                "spec": { "containers": [{ "name": "app", "image": "remotemedia/e2e-placeholder:1" }] },
            },
        },
    }))
    .expect("a deployment built from literals is valid");
    let deployments = &ns.api::<Deployment>();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .map_err(api("create the deployment"))?;

    wait_until("3 ready replicas", SETTLE, || async move {
        let d = deployments
            .get("smoke")
            .await
            .map_err(api("get the deployment"))?;
        let status = d.status.unwrap_or_default();
        let current = status.observed_generation >= d.metadata.generation;
        Ok(
            if current && status.ready_replicas == Some(3) && status.updated_replicas == Some(3) {
                Probe::Done(())
            } else {
                Probe::Waiting(format!("{status:?}"))
            },
        )
    })
    .await?;

    // The controllers made the pods, the scheduler bound them, kwok ran them, and admission gave
    // each a projected service-account token.
    let simulated: Vec<String> = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api("list the nodes"))?
        .into_iter()
        .filter(|n| {
            n.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("kwok.x-k8s.io/node"))
                .is_some()
        })
        .filter_map(|n| n.metadata.name)
        .collect();
    let pods = ns
        .api::<Pod>()
        .list(&ListParams::default().labels("app=smoke"))
        .await
        .map_err(api("list the deployment's pods"))?;
    assert_eq!(pods.items.len(), 3, "one pod per replica");
    for pod in &pods.items {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        assert!(
            simulated.contains(&node),
            "pod bound to {node:?}, not one of {simulated:?}"
        );
        assert_eq!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Running")
        );
        assert_eq!(
            condition(pod, "Ready").map(|c| c.status.as_str()),
            Some("True")
        );
        let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
        assert!(
            volumes.is_some_and(|v| v.iter().any(|v| v.name.starts_with("kube-api-access-"))),
            "the ServiceAccount admission plugin adds the token volume: {volumes:?}"
        );
    }
    ns.delete().await
}

#[tokio::test]
async fn pod_asking_for_four_gpus_runs_on_a_gpu_node() -> Result<(), Error> {
    let client = client().await?;
    let ns = TestNamespace::create(&client, "gpu-fits").await?;
    let pods = &ns.api::<Pod>();
    pods.create(&PostParams::default(), &gpu_pod("four", 4))
        .await
        .map_err(api("create the pod"))?;

    let node = wait_until("the pod to run", SETTLE, || async move {
        let pod = pods.get("four").await.map_err(api("get the pod"))?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        Ok(
            match (pod.spec.and_then(|s| s.node_name), phase.as_deref()) {
                (Some(node), Some("Running")) => Probe::Done(node),
                other => Probe::Waiting(format!("{other:?}")),
            },
        )
    })
    .await?;

    let node = Api::<Node>::all(client.clone())
        .get(&node)
        .await
        .map_err(api("get the pod's node"))?;
    let gpus = node
        .status
        .and_then(|s| s.allocatable)
        .and_then(|a| a.get(GPU).cloned());
    assert_eq!(
        gpus.map(|q| q.0),
        Some("4".to_owned()),
        "scheduled on a node with 4 GPUs"
    );
    ns.delete().await
}

#[tokio::test]
async fn pod_asking_for_eight_gpus_stays_pending_with_the_schedulers_reason() -> Result<(), Error> {
    let client = client().await?;
    let ns = TestNamespace::create(&client, "gpu-pending").await?;
    let pods = &ns.api::<Pod>();
    pods.create(&PostParams::default(), &gpu_pod("eight", 8))
        .await
        .map_err(api("create the pod"))?;

    let message = wait_until("the scheduler's verdict", SETTLE, || async move {
        let pod = pods.get("eight").await.map_err(api("get the pod"))?;
        Ok(match condition(&pod, "PodScheduled") {
            Some(c) if c.status == "False" && c.reason.as_deref() == Some("Unschedulable") => {
                Probe::Done(c.message.clone().unwrap_or_default())
            }
            other => Probe::Waiting(format!("{other:?}")),
        })
    })
    .await?;
    assert!(
        message.contains(&format!("Insufficient {GPU}")),
        "the scheduler names the missing resource: {message}"
    );

    // Still unbound a while later: the scheduler's retries do not place it either.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pod = pods.get("eight").await.map_err(api("get the pod"))?;
    assert_eq!(pod.spec.and_then(|s| s.node_name), None);
    assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
    ns.delete().await
}

#[tokio::test]
async fn service_account_token_authenticates_as_its_account() -> Result<(), Error> {
    let client = client().await?;
    let ns = TestNamespace::create(&client, "token").await?;
    let account: ServiceAccount =
        serde_json::from_value(json!({ "metadata": { "name": "smoke" } }))
            .expect("a literal account is valid");
    let accounts = ns.api::<ServiceAccount>();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .map_err(api("create the service account"))?;
    let request: TokenRequest =
        serde_json::from_value(json!({ "spec": { "expirationSeconds": 600 } }))
            .expect("a literal token request is valid");
    let token = accounts
        .create_token_request("smoke", &PostParams::default(), &request)
        .await
        .map_err(api("request a token"))?
        .status
        .and_then(|s| s.token)
        .unwrap_or_default();
    assert!(!token.is_empty(), "the API server signed a token");

    let as_account = client_with_token(token.clone()).await?;
    let review = Api::<SelfSubjectReview>::all(as_account.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(api("review the token's identity"))?;
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:smoke", ns.name).as_str())
    );
    assert!(
        user.groups
            .unwrap_or_default()
            .iter()
            .any(|g| g == "system:serviceaccounts")
    );

    // RBAC is on: the account was granted nothing, so listing nodes is forbidden, not allowed.
    let denied = Api::<Node>::all(as_account)
        .list(&ListParams::default())
        .await
        .map_err(api("list nodes as the service account"));
    assert_eq!(denied.err().as_ref().and_then(status_code), Some(403));

    // A token whose signature does not verify is refused outright.
    let mut forged = token;
    forged.push('x');
    let refused = Api::<SelfSubjectReview>::all(client_with_token(forged).await?)
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(api("review a forged token"));
    assert_eq!(refused.err().as_ref().and_then(status_code), Some(401));
    ns.delete().await
}
