//! The sidecar's `--discovery kubernetes` against the API server: a ModelWorker and the
//! EndpointSlice of its Service, made by hand, become the endpoints the sidecar process lists on
//! its admin port (`/debug/endpoints`); endpoints on its `--node-name` are colocated; an endpoint
//! turned not serving or terminating leaves the list; after an API-server restart, deleting the
//! ModelWorker empties it.
//!
//! The slice's addresses are never connected to: the test reads what the sidecar would route to.

use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use remotemedia_crds::ModelWorker;
use remotemedia_e2e::{Error, TestNamespace, api, client, install_crd, operator::Component, repo};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn conditions(ready: bool, serving: bool, terminating: bool) -> serde_json::Value {
    json!({ "ready": ready, "serving": serving, "terminating": terminating })
}

fn slice(ns: &str, b_conditions: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {
            "name": "vad-worker-1",
            "namespace": ns,
            // What the EndpointSlice controller writes for the operator's Service `vad-worker`.
            "labels": {
                "kubernetes.io/service-name": "vad-worker",
                "remotemedia.io/model-id": "vad",
            },
        },
        "addressType": "IPv4",
        "ports": [
            { "name": "grpc", "port": 50051, "protocol": "TCP" },
            { "name": "admin", "port": 9090, "protocol": "TCP" },
        ],
        "endpoints": [
            { "addresses": ["10.251.1.5"], "nodeName": "node-a",
              "conditions": conditions(true, true, false) },
            { "addresses": ["10.251.2.5"], "nodeName": "node-b", "conditions": b_conditions },
        ],
    }))
    .expect("a slice built from literals is valid")
}

#[tokio::test]
async fn the_sidecar_lists_model_worker_endpoints_colocated_on_its_node_and_drops_unready_ones()
-> Result<(), Error> {
    let client = client().await?;
    install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "discovery").await?;
    let socket_dir = tempfile::tempdir().map_err(|e| Error::Process(e.to_string()))?;
    let socket_dir = socket_dir.path().to_str().expect("a UTF-8 temporary path");
    let sidecar = Component::start_sidecar(
        &ns.name,
        &[
            "--socket-dir",
            socket_dir,
            "--admin-address",
            "127.0.0.1",
            "--discovery",
            "kubernetes",
            "--node-name",
            "node-a",
        ],
    )?;
    // The slice comes first: its endpoints join once the ModelWorker naming its Service exists.
    let slices = ns.api::<EndpointSlice>();
    slices
        .create(
            &PostParams::default(),
            &slice(&ns.name, conditions(true, true, false)),
        )
        .await
        .map_err(api("create the EndpointSlice"))?;

    let worker: ModelWorker = serde_json::from_value(json!({
        "apiVersion": "remotemedia.io/v1alpha1",
        "kind": "ModelWorker",
        "metadata": { "name": "vad-worker", "namespace": ns.name },
        "spec": { "modelId": "vad", "model": { "uri": "pvc://models/vad/model.pt" } },
    }))
    .expect("a ModelWorker built from literals is valid");
    let workers = ns.api::<ModelWorker>();
    workers
        .create(&PostParams::default(), &worker)
        .await
        .map_err(api("create the ModelWorker"))?;
    let a = format!("{}/vad 10.251.1.5:50051 node-a true", ns.name);
    let b = format!("{}/vad 10.251.2.5:50051 node-b false", ns.name);
    let both = [a.clone(), b];
    sidecar.wait_for_endpoints(&ns.name, &both, WAIT).await?;

    // Not serving, then serving but terminating: no new requests either way; ready again, back.
    for b_conditions in [
        conditions(false, false, false),
        conditions(false, true, true),
    ] {
        for (b_conditions, want) in [
            (b_conditions, std::slice::from_ref(&a)),
            (conditions(true, true, false), &both[..]),
        ] {
            slices
                .patch(
                    "vad-worker-1",
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "endpoints": slice(&ns.name, b_conditions).endpoints })),
                )
                .await
                .map_err(api("patch the EndpointSlice"))?;
            sidecar.wait_for_endpoints(&ns.name, want, WAIT).await?;
        }
    }

    // The API server restarts under the running sidecar (this file's only test, so no other test
    // sees it): its watches come back and a change made afterwards still reaches the list.
    let restart = std::process::Command::new(repo("e2e/cluster.sh"))
        .arg("restart-apiserver")
        .status()
        .map_err(|e| Error::Process(format!("failed to run e2e/cluster.sh: {e}")))?;
    assert!(restart.success(), "e2e/cluster.sh restart-apiserver failed");
    workers
        .delete("vad-worker", &DeleteParams::default())
        .await
        .map_err(api("delete the ModelWorker"))?;
    sidecar.wait_for_endpoints(&ns.name, &[], WAIT).await?;
    drop(sidecar);
    ns.delete().await
}
