//! The whole flow on the local control plane, with real processes where a cluster has them:
//! the operator reconciles two ModelWorkers, one on simulated node A and one on node B (nodes of
//! this test, `remotemedia_e2e::nodes`, whose pod CIDRs are routed into network namespaces);
//! kwok gives their pods IPs from those CIDRs, and `remotemedia-model-worker` processes serve on
//! them, inside the namespaces, with the pods' own arguments; each pod turns Ready once its
//! process answers its readiness probe. The operator and one sidecar per
//! node run with tokens of the chart's service accounts (the sidecar's permissions are compared
//! with `e2e/expected/sidecar-can-i.txt`); the sidecars find the workers through the
//! EndpointSlice controller's slices. An app process on node A (the demo's client, with
//! `REMOTEMEDIA_SIDECAR`) sends a 16 MiB tensor in a brokered region to each model:
//! - to A's worker in place: the worker maps the region (`/proc/<pid>/maps`) and moves under
//!   1 MiB through system calls (`/proc/<pid>/io`);
//! - to B's worker inline: it maps no region and sends the 16 MiB answer back.
//!
//! Then B's pod is turned not-ready through the status subresource while a request is in
//! flight to it: the request finishes, new ones never reach the worker (held, then UNAVAILABLE),
//! and once the pod is ready again they do.

use std::{
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use remotemedia_crds::ModelWorker;
use remotemedia_e2e::{
    Error, Probe, TestNamespace, api,
    chart::{allow_host_path, expect_permissions, service_account_token, token_kubeconfig},
    client, install_crd,
    nodes::{TestNode, running_pods, set_pod_ready},
    operator::{Component, binary},
    procfs::{io_bytes, mapped_regions},
    run_ok, wait_until,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
/// The demo client's tensor: 4 × 1 Mi FP32 values.
const TENSOR_BYTES: u64 = 16 << 20;
/// How long B's worker holds each request: the not-ready pod must leave the sidecar's list
/// while one is in flight.
const FAR_DELAY_MS: u64 = 6000;

/// The app: the demo's client on node A, asking `model` through A's sidecar.
fn app(sidecar: &Component, node: &TestNode, model: &str, worker: &Component) -> Command {
    let mut command =
        Command::new(binary("examples/demo_client").expect("the demo client is built"));
    command
        .args([
            sidecar.admin_port.to_string(),
            sidecar.pid().to_string(),
            format!("{model}={}", worker.pid()),
        ])
        .env(
            "REMOTEMEDIA_SIDECAR",
            format!("unix://{}", node.socket_dir().display()),
        )
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A running app; killed if the test ends before [`App::finish`].
struct App(Option<Child>);

impl App {
    fn start(mut command: Command) -> Self {
        Self(Some(command.spawn().expect("the app starts")))
    }

    fn finish(mut self) -> Output {
        let child = self.0.take().expect("an app finishes once");
        child.wait_with_output().expect("the app is waited for")
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn model_worker(ns: &str, name: &str, node: &TestNode) -> ModelWorker {
    let mut spec = json!({ "modelId": name, "model": { "uri": "file:///models/identity" } });
    for (key, value) in node
        .placement()
        .as_object()
        .expect("placement is an object")
    {
        spec[key] = value.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "remotemedia.io/v1alpha1",
        "kind": "ModelWorker",
        "metadata": { "name": name, "namespace": ns },
        "spec": spec,
    }))
    .expect("a ModelWorker built from literals is valid")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_routes_in_place_to_its_nodes_worker_inline_to_another_nodes_and_not_to_an_unready_one()
-> Result<(), Error> {
    let client = client().await?;
    install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "flow").await?;
    allow_host_path(&ns.name);
    let node_a = TestNode::create(&client, &format!("{}-a", ns.name), 0).await?;
    let node_b = TestNode::create(&client, &format!("{}-b", ns.name), 1).await?;

    // The chart's service accounts and RBAC; its own operator and sidecar pods are kwok's, not
    // processes, and stay off the tainted test nodes.
    let release = ns.name.clone();
    run_ok(
        "helm",
        &[
            "install",
            &release,
            &remotemedia_e2e::repo("charts/remotemedia"),
            "-n",
            &ns.name,
            "--set",
            "crds.enabled=false",
        ],
    );
    let sidecar_config = token_kubeconfig(&service_account_token(
        &ns.name,
        &format!("{release}-remotemedia-sidecar"),
        30,
    ));
    let sidecar_config = sidecar_config
        .path()
        .to_str()
        .expect("UTF-8 temporary path");
    expect_permissions(sidecar_config, &ns.name, "e2e/expected/sidecar-can-i.txt").await?;
    let operator_config = token_kubeconfig(&service_account_token(
        &ns.name,
        &format!("{release}-remotemedia-operator"),
        30,
    ));
    let operator_config = operator_config
        .path()
        .to_str()
        .expect("UTF-8 temporary path");

    let _operator = Component::start_with_env(
        &ns.name,
        &["--leader-election=false", "--watch-namespace", &ns.name],
        &[("KUBECONFIG", operator_config)],
    )?;
    let sidecar_a = node_a
        .start_sidecar(sidecar_config, &["--hold-timeout", "2s"])
        .await?;
    let _sidecar_b = node_b
        .start_sidecar(sidecar_config, &["--hold-timeout", "2s"])
        .await?;

    let workers = ns.api::<ModelWorker>();
    for (name, node) in [("near", &node_a), ("far", &node_b)] {
        workers
            .create(&PostParams::default(), &model_worker(&ns.name, name, node))
            .await
            .map_err(api("create a ModelWorker"))?;
    }
    let near_pod = running_pods(&client, &ns.name, "near", 1).await?.remove(0);
    let far_pod = running_pods(&client, &ns.name, "far", 1).await?.remove(0);
    for pod in [&near_pod, &far_pod] {
        let conditions = pod.status.as_ref().and_then(|s| s.conditions.clone());
        assert!(
            !conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            "kwok made a test node's pod Ready before its worker ran"
        );
    }
    let near = node_a.run_worker(&near_pod, "builtin://identity").await?;
    let far = node_b
        .run_worker(
            &far_pod,
            &format!("builtin://identity?infer_delay_ms={FAR_DELAY_MS}"),
        )
        .await?;
    let ip = |pod: &Pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .unwrap_or_default()
    };
    let near_line = format!(
        "{}/near {}:50051 {} true",
        ns.name,
        ip(&near_pod),
        node_a.name
    );
    let far_line = format!(
        "{}/far {}:50051 {} false",
        ns.name,
        ip(&far_pod),
        node_b.name
    );
    sidecar_a
        .wait_for_endpoints(&ns.name, &[far_line.clone(), near_line.clone()], WAIT)
        .await?;

    // In place on A: the worker maps the client's region and moves no tensor bytes.
    let near_model = format!("{}/near", ns.name);
    let before = io_bytes(near.pid());
    let out = App::start(app(&sidecar_a, &node_a, &near_model, &near)).finish();
    assert!(out.status.success(), "near: {}", describe(&out));
    let moved = io_bytes(near.pid()) - before;
    eprintln!("near: the worker moved {moved} bytes through system calls");
    assert!(moved < 1 << 20, "near: {moved} bytes through system calls");
    assert!(
        mapped_regions(near.pid()) > 0,
        "near: the worker maps no brokered region"
    );
    assert_eq!(
        sidecar_a.metric_sum(
            "remotemedia_sidecar_inference_requests_total{path=\"shm_local\",outcome=\"ok\"}"
        ),
        1.0
    );

    // Inline to B: no region reaches the worker; the answer's bytes cross its socket.
    let far_model = format!("{}/far", ns.name);
    let before = io_bytes(far.pid());
    let out = App::start(app(&sidecar_a, &node_a, &far_model, &far)).finish();
    assert!(out.status.success(), "far: {}", describe(&out));
    let moved = io_bytes(far.pid()) - before;
    eprintln!("far: the worker moved {moved} bytes through system calls");
    assert!(
        moved >= TENSOR_BYTES,
        "far: only {moved} bytes through system calls"
    );
    assert_eq!(
        mapped_regions(far.pid()),
        0,
        "far: the worker maps a brokered region"
    );
    assert_eq!(
        sidecar_a.metric_sum(
            "remotemedia_sidecar_inference_requests_total{path=\"inline_remote\",outcome=\"ok\"}"
        ),
        1.0
    );

    // B's pod turns not-ready while a request is in flight to it.
    let far_requests = || far.metric_sum("remotemedia_worker_requests_total");
    let served = far_requests();
    let in_flight = App::start(app(&sidecar_a, &node_a, &far_model, &far));
    let far_ref = &far;
    wait_until("a request in flight at B's worker", WAIT, || async move {
        Ok(match far_ref.metric_sum("remotemedia_worker_in_flight") {
            n if n >= 1.0 => Probe::Done(()),
            n => Probe::Waiting(format!("{n} in flight")),
        })
    })
    .await?;
    let far_name = far_pod.metadata.name.clone().expect("pods are named");
    set_pod_ready(&client, &ns.name, &far_name, false).await?;
    sidecar_a
        .wait_for_endpoints(&ns.name, std::slice::from_ref(&near_line), WAIT)
        .await?;
    assert_eq!(
        far.metric_sum("remotemedia_worker_in_flight"),
        1.0,
        "the request finished before its endpoint left the list: raise FAR_DELAY_MS"
    );
    // A new request is held (no ready endpoint), then refused; the worker never sees it.
    let out = App::start(app(&sidecar_a, &node_a, &far_model, &far)).finish();
    assert!(
        !out.status.success(),
        "far while not ready: {}",
        describe(&out)
    );
    let text = describe(&out);
    assert!(text.to_lowercase().contains("unavailable"), "{text}");
    let out = in_flight.finish();
    assert!(
        out.status.success(),
        "the in-flight request: {}",
        describe(&out)
    );
    assert_eq!(
        far_requests(),
        served + 1.0,
        "B's worker got a request while not ready"
    );

    // Ready again: requests reach it again.
    set_pod_ready(&client, &ns.name, &far_name, true).await?;
    sidecar_a
        .wait_for_endpoints(&ns.name, &[far_line, near_line], WAIT)
        .await?;
    let out = App::start(app(&sidecar_a, &node_a, &far_model, &far)).finish();
    assert!(
        out.status.success(),
        "far when ready again: {}",
        describe(&out)
    );
    assert_eq!(far_requests(), served + 2.0);

    drop((near, far));
    run_ok("helm", &["uninstall", &release, "-n", &ns.name]);
    ns.delete().await
}
