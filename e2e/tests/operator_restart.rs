//! Reconciliation resumes after the operator is killed and restarted, and after the API server
//! restarts under a running operator. A file of its own: cargo runs test files one after another,
//! so restarting the API server here cannot disturb the tests of other files.

use std::{process::Command, time::Duration};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams, PostParams};
use remotemedia_crds::ModelWorker;
use remotemedia_e2e::{
    Error, Probe, TestNamespace, api, client, install_crd, operator::Component, repo, wait_until,
};
use serde_json::json;

const SETTLE: Duration = Duration::from_secs(60);

/// Sets `spec.replicas`, retrying while the API server is not back yet.
async fn set_replicas(workers: &kube::Api<ModelWorker>, replicas: i32) -> Result<(), Error> {
    let patch = json!({ "spec": { "replicas": replicas } });
    let patch = &patch;
    wait_until("the API server to take the change", SETTLE, || async move {
        Ok(
            match workers
                .patch("vad", &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => Probe::Done(()),
                Err(error) => Probe::Waiting(error.to_string()),
            },
        )
    })
    .await
}

/// Waits until the Deployment asks for `replicas` and the ModelWorker's status describes its
/// current generation; with `ready`, also until the status counts `replicas` ready pods (which
/// needs the controller manager, the scheduler and kwok too).
async fn reconciled(ns: &TestNamespace, replicas: i32, ready: bool) -> Result<(), Error> {
    let deployments = &ns.api::<Deployment>();
    let workers = &ns.api::<ModelWorker>();
    wait_until(
        &format!("{replicas} replicas reconciled and ready"),
        SETTLE,
        || async move {
            let deployment = deployments.get_opt("vad").await;
            let worker = workers.get("vad").await;
            let (Ok(deployment), Ok(worker)) = (deployment, worker) else {
                return Ok(Probe::Waiting("the API server does not answer".to_owned()));
            };
            let wanted = deployment.and_then(|d| d.spec.replicas);
            let status = worker.status.unwrap_or_default();
            let all_ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                && status.ready_replicas == replicas;
            Ok(
                if wanted == Some(replicas)
                    && (all_ready || !ready)
                    && status.observed_generation == worker.metadata.generation
                {
                    Probe::Done(())
                } else {
                    Probe::Waiting(format!(
                        "deployment replicas {wanted:?}, ready {all_ready}, ready replicas {}, observed generation {:?} of {:?}",
                        status.ready_replicas,
                        status.observed_generation,
                        worker.metadata.generation
                    ))
                },
            )
        },
    )
    .await
}

#[tokio::test]
async fn reconciliation_resumes_after_operator_and_api_server_restarts() -> Result<(), Error> {
    install_crd(&client().await?).await?;
    let client = client().await?;
    let ns = TestNamespace::create(&client, "op-restart").await?;
    let args = ["--leader-election=false", "--watch-namespace", &ns.name];
    let mut operator = Component::start(&ns.name, &args)?;
    let workers = ns.api::<ModelWorker>();
    let worker: ModelWorker = serde_json::from_value(json!({
        "apiVersion": "remotemedia.io/v1alpha1",
        "kind": "ModelWorker",
        "metadata": { "name": "vad" },
        "spec": { "modelId": "vad", "model": { "uri": "file:///models/vad.pt" } },
    }))
    .expect("a ModelWorker built from literals is valid");
    workers
        .create(&PostParams::default(), &worker)
        .await
        .map_err(api("create the ModelWorker"))?;
    reconciled(&ns, 1, true).await?;

    // Killed: a change made meanwhile is picked up by the next process.
    operator.kill();
    set_replicas(&workers, 2).await?;
    let operator = Component::start(&ns.name, &args)?;
    reconciled(&ns, 2, true).await?;

    // The API server restarts under the running operator; its watches come back and a change
    // made after the restart reaches the Deployment and the status.
    let restart = Command::new(repo("e2e/cluster.sh"))
        .arg("restart-apiserver")
        .status()
        .expect("e2e/cluster.sh runs");
    assert!(restart.success(), "e2e/cluster.sh restart-apiserver failed");
    let back = std::time::Instant::now();
    set_replicas(&workers, 3).await?;
    // Only the operator's part: the controller manager's own watches may take longer to return.
    reconciled(&ns, 3, false).await?;
    eprintln!(
        "timing: reconciled {:?} after the API server was back",
        back.elapsed()
    );
    // The next test file needs the whole control plane working again: the pods too.
    reconciled(&ns, 3, true).await?;
    assert!(
        operator.get("/healthz").is_some(),
        "the operator survived the API server's restart"
    );
    drop(operator);
    ns.delete().await
}
