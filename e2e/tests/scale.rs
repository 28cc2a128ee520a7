//! Scale from zero on the local control plane. Two sidecar processes (`--discovery kubernetes`),
//! each run with a token of the chart's sidecar service account, receive inference requests for
//! ModelWorkers at zero replicas while the operator (a process of its own) reconciles them:
//!
//! - `asr` (no `scaleFromZero`) is answered UNAVAILABLE at once and stays at zero;
//! - `vad` (`scaleFromZero: true`): the requests are held (within `--max-held`), the ModelWorker's
//!   replicas become 1 through its scale subresource (patched by the sidecar's field manager,
//!   exactly one ask succeeding however many requests and sidecars ask), the operator rolls the
//!   Deployment to one pod, and the held requests end UNAVAILABLE naming the model at the hold
//!   timeout, because nothing serves;
//! - scaled to zero again, the next request asks again (a new hold episode).
//!
//! The worker pod is kept off every node (a nodeSelector no node matches): kwok would make it
//! ready at a pod IP of `e2e/nodes.yaml` (10.244.x.y), where nothing of this test listens, and
//! the sidecar would then connect to an address the test did not create. Serving a held request
//! needs real workers at the pods' addresses (worker processes in network namespaces).

use std::time::{Duration, Instant};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use remotemedia_crds::ModelWorker;
use remotemedia_e2e::chart::{
    helm_ok, install_without_crd, service_account, service_account_kubeconfig,
};
use remotemedia_e2e::{
    Error, Probe, TestNamespace, api, client, install_crd, operator::Component, ports, wait_until,
};
use remotemedia_proto::inference::{
    ModelInferRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use serde_json::json;
use tonic::Code;

/// The sidecars' `--hold-timeout`: long enough to watch the scale-up happen while requests wait.
const HOLD: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_secs(60);
const SCALED: &str = "remotemedia_sidecar_scale_ups_total{outcome=\"scaled\"}";
const ALREADY_SCALED: &str = "remotemedia_sidecar_scale_ups_total{outcome=\"already_scaled\"}";
const FAILED: &str = "remotemedia_sidecar_scale_ups_total{outcome=\"failed\"}";
const HELD: &str = "remotemedia_sidecar_held_requests";

/// A ModelWorker at zero replicas whose pods no node accepts.
fn at_zero(name: &str, model_id: &str, scale_from_zero: bool) -> ModelWorker {
    serde_json::from_value(json!({
        "apiVersion": "remotemedia.io/v1alpha1",
        "kind": "ModelWorker",
        "metadata": { "name": name },
        "spec": {
            "modelId": model_id,
            "model": { "uri": "file:///models/model.pt" },
            "replicas": 0,
            "scaleFromZero": scale_from_zero,
            "nodeSelector": { "remotemedia.io/e2e-no-such-node": "true" },
        },
    }))
    .expect("a ModelWorker built from literals is valid")
}

/// A sidecar, its TCP inference port and its socket directory.
struct Sidecar {
    process: Component,
    port: u16,
    _sockets: tempfile::TempDir,
}

impl Sidecar {
    fn start(name: &str, node: &str, kubeconfig: &str) -> Result<Self, Error> {
        let port = ports::free_port();
        let sockets = tempfile::tempdir().map_err(|e| Error::Process(e.to_string()))?;
        let process = Component::start_sidecar_with_env(
            name,
            &[
                "--socket-dir",
                sockets.path().to_str().expect("temporary paths are UTF-8"),
                "--admin-address",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--discovery",
                "kubernetes",
                "--node-name",
                node,
                "--hold-timeout",
                &format!("{}s", HOLD.as_secs()),
                "--max-held",
                "3",
            ],
            &[("KUBECONFIG", kubeconfig)],
        )?;
        Ok(Self {
            process,
            port,
            _sockets: sockets,
        })
    }

    fn metric(&self, name: &str) -> f64 {
        self.process.metric(name).unwrap_or(0.0)
    }

    /// ModelInfer for `model` (no tensors: the request is answered before any worker would read
    /// them), with `timeout` as the client's deadline: the gRPC status and how long it took.
    async fn infer(&self, model: &str, timeout: Option<Duration>) -> (tonic::Status, Duration) {
        let mut client =
            GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{}", self.port))
                .await
                .expect("the sidecar's TCP port accepts connections");
        let mut request = tonic::Request::new(ModelInferRequest {
            model_name: model.to_owned(),
            ..ModelInferRequest::default()
        });
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        let started = Instant::now();
        let status = client
            .model_infer(request)
            .await
            .expect_err("no worker can serve this test's models");
        (status, started.elapsed())
    }

    async fn wait_ready(&self) -> Result<(), Error> {
        wait_until("the sidecar's /readyz", SETTLE, || async {
            Ok(match self.process.get("/readyz") {
                Some((200, _)) => Probe::Done(()),
                other => Probe::Waiting(format!("{other:?}")),
            })
        })
        .await
    }
}

#[tokio::test]
async fn a_request_for_a_model_worker_at_zero_asks_for_one_replica_through_scale_and_waits_for_it()
-> Result<(), Error> {
    let client = client().await?;
    install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "scale").await?;
    install_without_crd(&ns.name, &[]);
    let kubeconfig = service_account_kubeconfig(&ns.name, &service_account(&ns.name, "sidecar"))?;
    let kubeconfig_path = kubeconfig
        .path()
        .to_str()
        .expect("temporary paths are UTF-8");
    let _operator = Component::start(
        &ns.name,
        &["--leader-election=false", "--watch-namespace", &ns.name],
    )?;
    let near = Sidecar::start(&format!("{}-a", ns.name), "kwok-gpu-0", kubeconfig_path)?;
    let far = Sidecar::start(&format!("{}-b", ns.name), "kwok-gpu-1", kubeconfig_path)?;
    near.wait_ready().await?;
    far.wait_ready().await?;

    // Model ids of this test alone: the sidecars watch every namespace, and ModelWorkers of other
    // tests (whose pods kwok made ready at addresses nothing listens on) may still be there.
    let (vad, asr) = (&format!("{}-vad", ns.name), &format!("{}-asr", ns.name));
    let workers = ns.api::<ModelWorker>();
    for worker in [
        at_zero("asr-worker", asr, false),
        at_zero("vad-worker", vad, true),
    ] {
        workers
            .create(&PostParams::default(), &worker)
            .await
            .map_err(api("create the ModelWorker"))?;
    }

    // Without scaleFromZero: UNAVAILABLE at once, naming the model (once the sidecar's watch has
    // listed the ModelWorker; until then the request is held to its 2 s deadline).
    let (near, far) = (&near, &far);
    let (status, took) = wait_until("the sidecar to refuse asr at once", SETTLE, || async move {
        let (status, took) = near.infer(asr, Some(Duration::from_secs(2))).await;
        Ok(if status.message().contains("scale from zero") {
            Probe::Done((status, took))
        } else {
            Probe::Waiting(format!("{status:?}"))
        })
    })
    .await?;
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains(&format!("'{asr}'")), "{status:?}");
    assert!(took < Duration::from_secs(1), "answered after {took:?}");

    // scaleFromZero: three requests held on one sidecar (its --max-held), one on the other.
    let namespaced = format!("{}/{vad}", ns.name);
    let requests = futures::future::join_all([
        near.infer(vad, None),
        near.infer(&namespaced, None),
        near.infer(vad, None),
        far.infer(vad, None),
    ]);
    let workers = &workers;
    let deployments = &ns.api::<Deployment>();
    let pods = &ns.api::<Pod>();
    let observe = async move {
        wait_until("3 + 1 held requests", SETTLE, || async move {
            let held = (near.metric(HELD), far.metric(HELD));
            Ok(if held == (3.0, 1.0) {
                Probe::Done(())
            } else {
                Probe::Waiting(format!("held {held:?}"))
            })
        })
        .await?;
        let (status, _) = near.infer(vad, None).await;
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("too many requests held"),
            "{status:?}"
        );

        // The sidecars' ask reaches the ModelWorker through its scale subresource...
        let worker = wait_until("vad-worker at 1 replica", SETTLE, || async move {
            let worker = workers.get("vad-worker").await.map_err(api("get"))?;
            Ok(if worker.spec.replicas == 1 {
                Probe::Done(worker)
            } else {
                Probe::Waiting(format!("replicas {}", worker.spec.replicas))
            })
        })
        .await?;
        let scaled_by: Vec<_> = worker
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter(|entry| entry.manager.as_deref() == Some("remotemedia-sidecar"))
            .map(|entry| entry.subresource.clone().unwrap_or_default())
            .collect();
        assert_eq!(scaled_by, ["scale"]);
        // ...and the operator rolls the Deployment to one pod, which no node takes.
        wait_until("the Deployment at 1 replica", SETTLE, || async move {
            let deployment = deployments.get("vad-worker").await.map_err(api("get"))?;
            let replicas = deployment.spec.replicas;
            Ok(if replicas == Some(1) {
                Probe::Done(())
            } else {
                Probe::Waiting(format!("replicas {replicas:?}"))
            })
        })
        .await?;
        let selector = wait_until("the ModelWorker's selector", SETTLE, || async move {
            let worker = workers.get("vad-worker").await.map_err(api("get"))?;
            Ok(match worker.status.and_then(|status| status.selector) {
                Some(selector) => Probe::Done(selector),
                None => Probe::Waiting("no selector".to_owned()),
            })
        })
        .await?;
        let selector = &selector;
        wait_until("one Pending worker pod", SETTLE, || async move {
            let listed = pods
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(api("list the worker pods"))?;
            let phases: Vec<_> = listed
                .items
                .iter()
                .map(|pod| pod.status.as_ref().and_then(|s| s.phase.clone()))
                .collect();
            Ok(if phases == [Some("Pending".to_owned())] {
                Probe::Done(())
            } else {
                Probe::Waiting(format!("phases {phases:?}"))
            })
        })
        .await
    };
    let (answers, observed) = tokio::join!(requests, observe);
    observed?;
    // Nothing serves: every held request ends at the hold timeout, naming its model.
    for ((status, took), model) in answers.iter().zip([vad, &namespaced, vad, vad]) {
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(
            status.message(),
            format!("no ready worker for model '{model}'")
        );
        assert!(*took >= HOLD - Duration::from_millis(500), "{took:?}");
    }
    // At most one ask per sidecar (one hold episode each), and of all asks exactly one scaled:
    // a sidecar that asked after the other's patch landed found it scaled already; one that saw
    // the new replica count first did not ask.
    let asks = |sidecar: &Sidecar| sidecar.metric(SCALED) + sidecar.metric(ALREADY_SCALED);
    assert!(asks(near) <= 1.0 && asks(far) <= 1.0);
    assert_eq!(near.metric(SCALED) + far.metric(SCALED), 1.0);
    assert_eq!(near.metric(FAILED) + far.metric(FAILED), 0.0);
    assert_eq!(
        workers
            .get("vad-worker")
            .await
            .map_err(api("get"))?
            .spec
            .replicas,
        1
    );
    assert_eq!(
        workers
            .get("asr-worker")
            .await
            .map_err(api("get"))?
            .spec
            .replicas,
        0
    );

    // Scaled to zero again (by a person): the next request opens a new episode and asks again.
    workers
        .patch_scale(
            "vad-worker",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 0 } })),
        )
        .await
        .map_err(api("scale vad-worker to 0"))?;
    let (scaled_before, asks_before) = (near.metric(SCALED), asks(near));
    // Each request waits at most 1 s (its deadline), so each is an episode of its own.
    wait_until("a second ask", SETTLE, || async move {
        near.infer(vad, Some(Duration::from_secs(1))).await;
        Ok(if asks(near) > asks_before {
            Probe::Done(())
        } else {
            Probe::Waiting(format!("{} asks", asks(near)))
        })
    })
    .await?;
    assert_eq!(near.metric(SCALED), scaled_before + 1.0);
    assert_eq!(
        workers
            .get("vad-worker")
            .await
            .map_err(api("get"))?
            .spec
            .replicas,
        1
    );

    for sidecar in [near, far] {
        let log = std::fs::read_to_string(&sidecar.process.log).unwrap_or_default();
        assert!(
            !log.contains("forbidden"),
            "refused by RBAC: {}",
            sidecar.process.log.display()
        );
    }
    helm_ok(&["uninstall", &ns.name, "-n", &ns.name]);
    ns.delete().await
}
