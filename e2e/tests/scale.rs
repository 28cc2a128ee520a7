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
//! That worker's pod is kept off every node (a nodeSelector no node matches): kwok would make it
//! ready at a pod IP of `e2e/nodes.yaml` (10.244.x.y), where nothing of this test listens.
//!
//! Served: a ModelWorker with `scaleFromZero: true` at zero replicas is placed on a node of the
//! test's own (`remotemedia_e2e::nodes`, its pod CIDR routed into a network namespace), with that
//! node's sidecar. A request is held; the sidecar scales the ModelWorker to 1, the operator rolls
//! the Deployment, and when kwok runs the pod (not ready) the test runs its worker
//! (`builtin://checksum`) at the pod's IP and makes the pod Ready, as a kubelet would: the held
//! request is answered with the checksum of its bytes. Scaled to zero by hand, once the pod and
//! its process are gone, a new request is held and served the same way (a second ask).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use remotemedia_crds::ModelWorker;
use remotemedia_e2e::chart::{
    helm_ok, install_without_crd, service_account, service_account_kubeconfig,
};
use remotemedia_e2e::{
    Error, Probe, TestNamespace, api, client, install_crd, nodes::TestNode, operator::Component,
    ports, wait_until,
};
use remotemedia_proto::inference::{
    ModelInferRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor,
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

/// A sidecar, its TCP inference port and its socket directory (unless a node's).
struct Sidecar {
    process: Component,
    port: u16,
    _sockets: Option<tempfile::TempDir>,
}

impl Sidecar {
    /// A sidecar of a kwok node, with a socket directory of its own and `--hold-timeout` HOLD.
    fn start(name: &str, node: &str, kubeconfig: &str) -> Result<Self, Error> {
        let sockets = tempfile::tempdir().map_err(|e| Error::Process(e.to_string()))?;
        let mut sidecar = Self::start_in(name, node, kubeconfig, sockets.path(), HOLD)?;
        sidecar._sockets = Some(sockets);
        Ok(sidecar)
    }

    /// A sidecar listening in `socket_dir` (a test node's, where its workers find the broker).
    fn start_in(
        name: &str,
        node: &str,
        kubeconfig: &str,
        socket_dir: &Path,
        hold: Duration,
    ) -> Result<Self, Error> {
        let port = ports::free_port();
        let process = Component::start_sidecar_with_env(
            name,
            &[
                "--socket-dir",
                socket_dir.to_str().expect("temporary paths are UTF-8"),
                "--admin-address",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--discovery",
                "kubernetes",
                "--node-name",
                node,
                "--hold-timeout",
                &format!("{}s", hold.as_secs()),
                "--max-held",
                "3",
            ],
            &[("KUBECONFIG", kubeconfig)],
        )?;
        Ok(Self {
            process,
            port,
            _sockets: None,
        })
    }

    async fn connect(&self) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
        GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("the sidecar's TCP port accepts connections")
    }

    fn metric(&self, name: &str) -> f64 {
        self.process.metric(name).unwrap_or(0.0)
    }

    /// ModelInfer for `model` (no tensors: the request is answered before any worker would read
    /// them), with `timeout` as the client's deadline: the gRPC status and how long it took.
    async fn infer(&self, model: &str, timeout: Option<Duration>) -> (tonic::Status, Duration) {
        let mut client = self.connect().await;
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

    /// ModelInfer for `model` (`builtin://checksum`) with `bytes` inline, without a deadline of
    /// the client's: the checksum the worker answered, or the status.
    async fn checksum(&self, model: &str, bytes: &[u8]) -> Result<u64, tonic::Status> {
        let request = ModelInferRequest {
            model_name: model.to_owned(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".to_owned(),
                datatype: "UINT8".to_owned(),
                shape: vec![i64::try_from(bytes.len()).expect("a test tensor is small")],
                ..InferInputTensor::default()
            }],
            raw_input_contents: vec![bytes.to_vec().into()],
            ..ModelInferRequest::default()
        };
        let response = self
            .connect()
            .await
            .model_infer(request)
            .await?
            .into_inner();
        let [output] = response.raw_output_contents.as_slice() else {
            return Err(tonic::Status::internal(format!(
                "{} outputs answered, not one",
                response.raw_output_contents.len()
            )));
        };
        let sum: [u8; 8] = output[..].try_into().map_err(|_| {
            tonic::Status::internal(format!("a checksum of {} bytes, not 8", output.len()))
        })?;
        Ok(u64::from_le_bytes(sum))
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
    assert_eq!(replicas(workers, "vad-worker").await?, 1);
    assert_eq!(replicas(workers, "asr-worker").await?, 0);

    // Scaled to zero again (by a person): the next request opens a new episode and asks again.
    scale_to_zero(workers, "vad-worker").await?;
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
    assert_eq!(replicas(workers, "vad-worker").await?, 1);

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

/// `spec.replicas` of the ModelWorker `name`.
async fn replicas(workers: &kube::Api<ModelWorker>, name: &str) -> Result<i32, Error> {
    Ok(workers.get(name).await.map_err(api("get"))?.spec.replicas)
}

/// Scales the ModelWorker `name` to zero through its scale subresource, as a person would.
async fn scale_to_zero(workers: &kube::Api<ModelWorker>, name: &str) -> Result<(), Error> {
    workers
        .patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 0 } })),
        )
        .await
        .map_err(api("scale a ModelWorker to 0"))?;
    Ok(())
}

/// The served test's `--hold-timeout`: room for the scale-up, the pod and its worker's start.
const SERVE_HOLD: Duration = Duration::from_secs(40);

/// The running pod of the ModelWorker `name` once kwok gave it an IP, or `None` while it has none.
async fn running_pod(pods: &kube::Api<Pod>, name: &str) -> Result<Option<Pod>, Error> {
    let listed = pods
        .list(&ListParams::default().labels(&format!("remotemedia.io/model-worker={name}")))
        .await
        .map_err(api("list the worker pods"))?;
    Ok(listed.items.into_iter().find(|pod| {
        pod.status
            .as_ref()
            .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
    }))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_held_for_a_model_worker_at_zero_is_served_once_its_pod_runs_and_again_after_scaling_to_zero()
-> Result<(), Error> {
    let client = client().await?;
    install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "served").await?;
    install_without_crd(&ns.name, &[]);
    let kubeconfig = service_account_kubeconfig(&ns.name, &service_account(&ns.name, "sidecar"))?;
    let kubeconfig_path = kubeconfig
        .path()
        .to_str()
        .expect("temporary paths are UTF-8");
    let node = TestNode::create(&client, &format!("{}-n", ns.name), 0).await?;
    let _operator = Component::start(
        &ns.name,
        &["--leader-election=false", "--watch-namespace", &ns.name],
    )?;
    let sidecar = Sidecar::start_in(
        &ns.name,
        &node.name,
        kubeconfig_path,
        node.socket_dir(),
        SERVE_HOLD,
    )?;
    sidecar.wait_ready().await?;
    // The worker joins its node's broker at start.
    let socket = node.socket_dir().join("broker.sock");
    wait_until("the node's broker socket", SETTLE, || async {
        Ok(if socket.exists() {
            Probe::Done(())
        } else {
            Probe::Waiting("absent".to_owned())
        })
    })
    .await?;

    let model = &format!("{}-sum", ns.name);
    let mut spec = json!({
        "modelId": model,
        "model": { "uri": "file:///models/model.pt" },
        "replicas": 0,
        "scaleFromZero": true,
    });
    for (key, value) in node
        .placement()
        .as_object()
        .expect("placement is an object")
    {
        spec[key] = value.clone();
    }
    let worker: ModelWorker = serde_json::from_value(json!({
        "apiVersion": "remotemedia.io/v1alpha1",
        "kind": "ModelWorker",
        "metadata": { "name": "sum-worker" },
        "spec": spec,
    }))
    .expect("a ModelWorker built from literals is valid");
    let workers = &ns.api::<ModelWorker>();
    workers
        .create(&PostParams::default(), &worker)
        .await
        .map_err(api("create the ModelWorker"))?;

    let pods = &ns.api::<Pod>();
    let (sidecar, node) = (&sidecar, &node);
    for episode in 1..=2_u8 {
        // A tensor per episode, of a length (and so a sum) of its own.
        let bytes: Vec<u8> = (0..1000 * usize::from(episode) + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let want: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
        let started = Instant::now();
        // The request is held at zero; meanwhile the scale-up happens and the pod's worker runs.
        let serve = async move {
            wait_until("the request held", SETTLE, || async move {
                let held = sidecar.metric(HELD);
                Ok(if held == 1.0 {
                    Probe::Done(())
                } else {
                    Probe::Waiting(format!("held {held}"))
                })
            })
            .await?;
            let pod = wait_until("a running worker pod", SETTLE, || async move {
                Ok(match running_pod(pods, "sum-worker").await? {
                    Some(pod) => Probe::Done(pod),
                    None => Probe::Waiting("no running pod with an IP".to_owned()),
                })
            })
            .await?;
            // Held still: the pod is not Ready before its worker answers.
            assert_eq!(sidecar.metric(HELD), 1.0);
            node.run_worker(&pod, "builtin://checksum").await
        };
        let (answer, worker) = tokio::join!(sidecar.checksum(model, &bytes), serve);
        let worker = worker?;
        let took = started.elapsed();
        let sum = answer.unwrap_or_else(|status| panic!("episode {episode}: {status:?}"));
        assert_eq!(sum, want, "episode {episode}");
        assert!(took < SERVE_HOLD, "served after {took:?}");
        assert_eq!(sidecar.metric(HELD), 0.0);
        // One ask per episode, and it scaled.
        assert_eq!(sidecar.metric(SCALED), f64::from(episode));
        assert_eq!(sidecar.metric(FAILED), 0.0);
        assert_eq!(replicas(workers, "sum-worker").await?, 1);

        // Scaled to zero (by a person): the pod goes, then its process, and the sidecar's list
        // empties; the next episode starts from nothing.
        scale_to_zero(workers, "sum-worker").await?;
        wait_until("the worker pod gone", SETTLE, || async move {
            let listed = pods
                .list(&ListParams::default().labels("remotemedia.io/model-worker=sum-worker"))
                .await
                .map_err(api("list the worker pods"))?;
            Ok(if listed.items.is_empty() {
                Probe::Done(())
            } else {
                Probe::Waiting(format!("{} pods", listed.items.len()))
            })
        })
        .await?;
        // kwok removed the pod without a kubelet to stop its container: the test does.
        drop(worker);
        let namespace = &ns.name;
        wait_until(
            "the sidecar's list without the model",
            SETTLE,
            || async move {
                Ok(match sidecar.process.get("/debug/endpoints") {
                    Some((200, body)) if !body.contains(&format!("{namespace}/")) => {
                        Probe::Done(())
                    }
                    seen => Probe::Waiting(format!("{seen:?}")),
                })
            },
        )
        .await?;
    }

    let log = std::fs::read_to_string(&sidecar.process.log).unwrap_or_default();
    assert!(
        !log.contains("forbidden"),
        "refused by RBAC: {}",
        sidecar.process.log.display()
    );
    helm_ok(&["uninstall", &ns.name, "-n", &ns.name]);
    ns.delete().await
}
