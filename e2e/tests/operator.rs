//! `remotemedia-operator` as a process against the local control plane: the examples become
//! Deployments, Services and PDBs whose pods kwok runs, status tells the truth (Ready, the
//! scheduler's GPU refusal), scaling, rollouts, hand edits and deletion behave as a Kubernetes
//! user expects, and a standby operator does nothing until the leader is gone. Each test has its
//! own namespace and its own operator (`--watch-namespace`), so tests run concurrently.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        coordination::v1::Lease,
        core::v1::{Pod, Service},
        policy::v1::PodDisruptionBudget,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use remotemedia_crds::ModelWorker;
use remotemedia_e2e::{
    Error, Probe, TestNamespace, api, client,
    examples::{delete_models_volume, models_claim},
    install_crd, kubectl_ok,
    operator::Component,
    repo, wait_until,
};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(60);
/// Fine-grained polling for the latency targets (Deployment within 1 s, Ready within 2 s).
const FAST_POLL: Duration = Duration::from_millis(25);
const OPERATOR: &str = "remotemedia-operator";
/// The operator's lease duration (operator/src/leader.rs).
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// A ModelWorker `name` serving a model baked into the image, `patch` merged over its spec.
fn model_worker(name: &str, patch: Value) -> ModelWorker {
    let mut spec = json!({ "modelId": name, "model": { "uri": "file:///models/model.pt" } });
    for (key, value) in patch.as_object().expect("a patch is an object") {
        spec[key] = value.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "remotemedia.io/v1alpha1",
        "kind": "ModelWorker",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a ModelWorker built from literals is valid")
}

/// An operator that watches only `ns`, without leader election.
fn operator_for(ns: &TestNamespace) -> Result<Component, Error> {
    Component::start(
        &ns.name,
        &["--leader-election=false", "--watch-namespace", &ns.name],
    )
}

/// `(status, reason, message)` of the ModelWorker's condition `type_`.
fn condition(worker: &ModelWorker, type_: &str) -> Option<(String, String, String)> {
    let status = worker.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn describe(worker: &ModelWorker) -> String {
    match &worker.status {
        Some(status) => format!(
            "generation {:?}, status {}",
            worker.metadata.generation,
            serde_json::to_string(status).unwrap_or_default()
        ),
        None => "no status".to_owned(),
    }
}

/// Waits until the ModelWorker's status describes its current generation, is `Ready=True` and
/// counts `replicas` ready pods; returns it.
async fn wait_ready(
    workers: &Api<ModelWorker>,
    name: &str,
    replicas: i32,
) -> Result<ModelWorker, Error> {
    wait_until(
        &format!("ModelWorker {name} Ready with {replicas} replicas"),
        SETTLE,
        || async move {
            let worker = workers
                .get(name)
                .await
                .map_err(api("get the ModelWorker"))?;
            let status = worker.status.clone().unwrap_or_default();
            let ready = condition(&worker, "Ready").is_some_and(|(s, _, _)| s == "True");
            Ok(
                if ready
                    && status.observed_generation == worker.metadata.generation
                    && status.ready_replicas == replicas
                    && status.replicas == replicas
                {
                    Probe::Done(worker)
                } else {
                    Probe::Waiting(describe(&worker))
                },
            )
        },
    )
    .await
}

/// Polls `get` every 25 ms until it finds the object; returns it and how long after `start`.
async fn time_until_exists<K>(
    api_: &Api<K>,
    name: &str,
    start: Instant,
    timeout: Duration,
) -> Result<(K, Duration), Error>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    loop {
        if let Some(object) = api_.get_opt(name).await.map_err(api("get an object"))? {
            return Ok((object, start.elapsed()));
        }
        if start.elapsed() > timeout {
            return Err(Error::Timeout {
                what: format!("{name} to exist"),
                timeout,
                last: "absent".to_owned(),
            });
        }
        tokio::time::sleep(FAST_POLL).await;
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn selector(name: &str) -> String {
    format!("app.kubernetes.io/name=remotemedia-model-worker,remotemedia.io/model-worker={name}")
}

/// From the moment all `replicas` pods of `name` are ready (as seen by polling) to the moment
/// the ModelWorker says `Ready=True`.
async fn ready_lag(ns: &TestNamespace, name: &str, replicas: usize) -> Result<Duration, Error> {
    let pods = ns.api::<Pod>();
    let workers = ns.api::<ModelWorker>();
    let params = kube::api::ListParams::default().labels(&selector(name));
    let start = Instant::now();
    let mut pods_ready_at = None;
    loop {
        let listed = pods
            .list(&params)
            .await
            .map_err(api("list the pods"))?
            .items;
        if pods_ready_at.is_none() && listed.iter().filter(|p| is_ready(p)).count() == replicas {
            pods_ready_at = Some(Instant::now());
        }
        let worker = workers
            .get(name)
            .await
            .map_err(api("get the ModelWorker"))?;
        if condition(&worker, "Ready").is_some_and(|(s, _, _)| s == "True") {
            let pods_at = pods_ready_at.unwrap_or_else(Instant::now);
            return Ok(Instant::now().saturating_duration_since(pods_at));
        }
        if start.elapsed() > SETTLE {
            return Err(Error::Timeout {
                what: format!("ModelWorker {name} Ready"),
                timeout: SETTLE,
                last: describe(&worker),
            });
        }
        tokio::time::sleep(FAST_POLL).await;
    }
}

fn container_args(deployment: &Deployment) -> Vec<String> {
    let pod = deployment
        .spec
        .template
        .spec
        .as_ref()
        .expect("a pod template");
    pod.containers[0].args.clone().unwrap_or_default()
}

fn arg_after(args: &[String], flag: &str) -> Option<String> {
    let at = args.iter().position(|a| a == flag)?;
    args.get(at + 1).cloned()
}

#[tokio::test]
async fn examples_become_ready_deployments_with_service_and_disruption_budget() -> Result<(), Error>
{
    install_crd(&client().await?).await?;
    let client = client().await?;
    let ns = TestNamespace::create(&client, "op-examples").await?;
    models_claim(&client, &ns.name).await?;
    let _operator = operator_for(&ns)?;
    // Give the operator a moment to list and watch, so the timing below is the reconcile's.
    wait_until("the operator ready", SETTLE, || async {
        Ok(match _operator.get("/readyz") {
            Some((200, _)) => Probe::Done(()),
            other => Probe::Waiting(format!("{other:?}")),
        })
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let applied = Instant::now();
    for example in ["examples/modelworker.yaml", "examples/modelworker-gpu.yaml"] {
        kubectl_ok(&["apply", "-n", &ns.name, "-f", &repo(example)]);
    }
    let deployments = ns.api::<Deployment>();
    let (cpu, cpu_after) = time_until_exists(&deployments, "silero-vad", applied, SETTLE).await?;
    let (gpu, gpu_after) =
        time_until_exists(&deployments, "whisper-small", applied, SETTLE).await?;
    eprintln!(
        "timing: Deployments after `kubectl apply` started: {cpu_after:?} (silero-vad), {gpu_after:?} (whisper-small)"
    );

    let workers = ns.api::<ModelWorker>();
    let whisper = workers
        .get("whisper-small")
        .await
        .map_err(api("get whisper-small"))?;
    // The GPU example's pod template, field by field.
    let owner = &gpu.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("ModelWorker", Some(true))
    );
    assert_eq!(Some(&owner.uid), whisper.metadata.uid.as_ref());
    assert_eq!(gpu.spec.replicas, Some(1));
    let rolling = gpu
        .spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .expect("rolling update");
    assert_eq!(
        rolling.max_surge,
        Some(IntOrString::Int(0)),
        "cuda rolls out without surge"
    );
    let pod = gpu.spec.template.spec.as_ref().expect("pod spec");
    let container = &pod.containers[0];
    let args = container_args(&gpu);
    assert_eq!(
        arg_after(&args, "--model-id").as_deref(),
        Some("whisper-small")
    );
    assert_eq!(
        arg_after(&args, "--model-path").as_deref(),
        Some("/models/whisper-small/model.pt")
    );
    assert_eq!(arg_after(&args, "--device").as_deref(), Some("cuda:0"));
    assert_eq!(arg_after(&args, "--max-concurrency").as_deref(), Some("64"));
    let limits = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .expect("limits");
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(limits["memory"].0, "12Gi");
    assert_eq!(
        container.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    assert!(
        container.startup_probe.is_some()
            && container.readiness_probe.is_some()
            && container.liveness_probe.is_some()
    );
    let volumes = pod.volumes.as_ref().expect("volumes");
    let claim = volumes
        .iter()
        .find_map(|v| v.persistent_volume_claim.as_ref())
        .expect("the model claim");
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("models", Some(true))
    );
    assert!(volumes.iter().any(|v| {
        v.host_path
            .as_ref()
            .is_some_and(|h| h.path == "/run/remotemedia")
    }));
    let shm = volumes
        .iter()
        .find_map(|v| v.empty_dir.as_ref())
        .expect("/dev/shm");
    assert_eq!(shm.size_limit.as_ref().map(|q| q.0.as_str()), Some("2Gi"));
    assert_eq!(
        pod.node_selector.as_ref().expect("node selector")["nvidia.com/gpu.present"],
        "true"
    );
    assert!(
        pod.tolerations
            .as_ref()
            .is_some_and(|t| t.iter().any(|t| t.key.as_deref() == Some("nvidia.com/gpu")))
    );
    assert!(pod.termination_grace_period_seconds.unwrap_or_default() >= 25);
    assert_eq!(cpu.spec.replicas, Some(2));

    // The Service, labelled for discovery; a PDB only where there are several replicas. The
    // operator applies them after the Deployment, in one reconcile that may still be running.
    let (service, _) =
        time_until_exists(&ns.api::<Service>(), "silero-vad", Instant::now(), SETTLE).await?;
    assert_eq!(
        service.metadata.labels.as_ref().expect("labels")["remotemedia.io/model-id"],
        "silero-vad"
    );
    let grpc = &service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .expect("ports")[0];
    assert_eq!((grpc.name.as_deref(), grpc.port), (Some("grpc"), 50051));
    let pdbs = ns.api::<PodDisruptionBudget>();
    let (pdb, _) = time_until_exists(&pdbs, "silero-vad", Instant::now(), SETTLE).await?;
    assert_eq!(
        pdb.spec.and_then(|s| s.max_unavailable),
        Some(IntOrString::Int(1))
    );

    // kwok runs the pods: Ready follows them.
    let lag = ready_lag(&ns, "silero-vad", 2).await?;
    eprintln!("timing: Ready=True {lag:?} after both silero-vad pods were seen ready");
    for (name, replicas) in [("silero-vad", 2), ("whisper-small", 1)] {
        let worker = wait_ready(&workers, name, replicas).await?;
        let status = worker.status.expect("status");
        assert_eq!(
            status.endpoint,
            Some(format!("{name}.{}.svc:50051", ns.name))
        );
        assert_eq!(status.selector, Some(selector(name)));
        assert_eq!(
            condition(&worker_after(&workers, name).await?, "Degraded")
                .map(|c| c.0)
                .as_deref(),
            Some("False")
        );
    }
    // whisper-small is Ready: a reconcile finished, and it made no PDB for one replica.
    assert!(
        pdbs.get_opt("whisper-small")
            .await
            .map_err(api("get the PDB"))?
            .is_none()
    );
    delete_models_volume(&client, &ns.name).await?;
    ns.delete().await
}

async fn worker_after(workers: &Api<ModelWorker>, name: &str) -> Result<ModelWorker, Error> {
    workers.get(name).await.map_err(api("get the ModelWorker"))
}

/// Polls pods and status every 25 ms: how long after a pod is first seen unschedulable the
/// ModelWorker says `Ready=False` with `reason`; returns that and the condition's message.
async fn blocked_after(
    ns: &TestNamespace,
    name: &str,
    reason: &str,
) -> Result<(Duration, String), Error> {
    let pods = ns.api::<Pod>();
    let workers = ns.api::<ModelWorker>();
    let params = kube::api::ListParams::default().labels(&selector(name));
    let start = Instant::now();
    let mut unschedulable_at = None;
    loop {
        let listed = pods
            .list(&params)
            .await
            .map_err(api("list the pods"))?
            .items;
        let unschedulable = listed.iter().any(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "PodScheduled" && c.status == "False")
                })
        });
        if unschedulable && unschedulable_at.is_none() {
            unschedulable_at = Some(Instant::now());
        }
        let worker = workers
            .get(name)
            .await
            .map_err(api("get the ModelWorker"))?;
        if let Some((status, actual, message)) = condition(&worker, "Ready")
            && status == "False"
            && actual == reason
        {
            let since = unschedulable_at.unwrap_or_else(Instant::now);
            return Ok((Instant::now().saturating_duration_since(since), message));
        }
        if start.elapsed() > SETTLE {
            return Err(Error::Timeout {
                what: format!("ModelWorker {name} Ready=False/{reason}"),
                timeout: SETTLE,
                last: describe(&worker),
            });
        }
        tokio::time::sleep(FAST_POLL).await;
    }
}

#[tokio::test]
async fn pods_that_cannot_get_a_gpu_make_the_model_worker_insufficient_gpu() -> Result<(), Error> {
    install_crd(&client().await?).await?;
    let client = client().await?;
    let ns = TestNamespace::create(&client, "op-gpu").await?;
    let _operator = operator_for(&ns)?;
    let workers = ns.api::<ModelWorker>();
    // A cuda worker pinned to the CPU-only node: no GPU anywhere it may go. (Asking for nine
    // replicas against the eight simulated GPUs would do too, but would starve the other tests.)
    let pinned = model_worker(
        "pinned",
        json!({
            "device": "cuda", "gpus": 1,
            "nodeSelector": { "kubernetes.io/hostname": "kwok-cpu-0" },
        }),
    );
    workers
        .create(&PostParams::default(), &pinned)
        .await
        .map_err(api("create the ModelWorker"))?;
    let (lag, message) = blocked_after(&ns, "pinned", "InsufficientGPU").await?;
    eprintln!("timing: InsufficientGPU {lag:?} after the pod was seen unschedulable");
    assert!(
        lag <= Duration::from_secs(5),
        "InsufficientGPU came {lag:?} after PodScheduled=False"
    );
    assert!(
        message.contains("nvidia.com/gpu"),
        "the scheduler's message: {message}"
    );
    let worker = worker_after(&workers, "pinned").await?;
    assert_eq!(
        condition(&worker, "Degraded").map(|c| (c.0, c.1)),
        Some(("True".into(), "InsufficientGPU".into()))
    );

    // Unschedulable for a reason that is not GPUs.
    let nowhere = model_worker(
        "nowhere",
        json!({ "nodeSelector": { "remotemedia.io/e2e": "no-such-node" } }),
    );
    workers
        .create(&PostParams::default(), &nowhere)
        .await
        .map_err(api("create the ModelWorker"))?;
    let (_, message) = blocked_after(&ns, "nowhere", "Unschedulable").await?;
    assert!(message.contains("node affinity/selector"), "{message}");
    ns.delete().await
}

async fn deployment_matches(
    deployments: &Api<Deployment>,
    name: &str,
    what: &str,
    check: impl Fn(&Deployment) -> bool,
) -> Result<Deployment, Error> {
    let check = &check;
    wait_until(what, SETTLE, || async move {
        let deployment = deployments
            .get(name)
            .await
            .map_err(api("get the Deployment"))?;
        Ok(if check(&deployment) {
            Probe::Done(deployment)
        } else {
            Probe::Waiting(format!(
                "replicas {:?}, image {:?}, args {:?}",
                deployment.spec.replicas,
                deployment
                    .spec
                    .template
                    .spec
                    .as_ref()
                    .and_then(|p| p.containers[0].image.clone()),
                container_args(&deployment)
            ))
        })
    })
    .await
}

async fn scale(ns: &TestNamespace, name: &str, replicas: i32) {
    kubectl_ok(&[
        "scale",
        "-n",
        &ns.name,
        &format!("modelworker/{name}"),
        &format!("--replicas={replicas}"),
    ]);
}

async fn pdb_present(ns: &TestNamespace, name: &str, present: bool) -> Result<(), Error> {
    let pdbs = ns.api::<PodDisruptionBudget>();
    let pdbs = &pdbs;
    wait_until(
        &format!("the PDB present: {present}"),
        SETTLE,
        || async move {
            let found = pdbs
                .get_opt(name)
                .await
                .map_err(api("get the PDB"))?
                .is_some();
            Ok(if found == present {
                Probe::Done(())
            } else {
                Probe::Waiting(format!("present: {found}"))
            })
        },
    )
    .await
}

#[tokio::test]
async fn scaling_rollouts_hand_edits_and_deletion_behave_as_kubernetes_users_expect()
-> Result<(), Error> {
    install_crd(&client().await?).await?;
    let client = client().await?;
    let ns = TestNamespace::create(&client, "op-lifecycle").await?;
    let _operator = operator_for(&ns)?;
    let workers = ns.api::<ModelWorker>();
    let deployments = ns.api::<Deployment>();
    let created = Instant::now();
    workers
        .create(
            &PostParams::default(),
            &model_worker("vad", json!({ "replicas": 1 })),
        )
        .await
        .map_err(api("create the ModelWorker"))?;
    let (_, after) = time_until_exists(&deployments, "vad", created, SETTLE).await?;
    eprintln!(
        "timing: Deployment {after:?} after the ModelWorker's creation (operator already running)"
    );
    wait_ready(&workers, "vad", 1).await?;
    pdb_present(&ns, "vad", false).await?;

    // Scale up, to zero, and back, through the scale subresource as `kubectl scale` does.
    for replicas in [3, 0, 2] {
        scale(&ns, "vad", replicas).await;
        deployment_matches(
            &deployments,
            "vad",
            &format!("Deployment replicas {replicas}"),
            |d| d.spec.replicas == Some(replicas),
        )
        .await?;
        let worker = wait_ready(&workers, "vad", replicas).await?;
        if replicas == 0 {
            let (_, _, message) = condition(&worker, "Ready").expect("Ready");
            assert_eq!(message, "scaled to zero");
        }
        pdb_present(&ns, "vad", replicas > 1).await?;
    }

    // A spec change rolls the Deployment: every pod is replaced by one of the new template.
    let pods = ns.api::<Pod>();
    let params = kube::api::ListParams::default().labels(&selector("vad"));
    let before: Vec<String> = pods
        .list(&params)
        .await
        .map_err(api("list pods"))?
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    workers
        .patch(
            "vad",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "maxConcurrency": 7 } })),
        )
        .await
        .map_err(api("change the spec"))?;
    deployment_matches(&deployments, "vad", "the new template", |d| {
        arg_after(&container_args(d), "--max-concurrency").as_deref() == Some("7")
    })
    .await?;
    let pods_ref = &pods;
    let params_ref = &params;
    let before_ref = &before;
    wait_until("the rollout to replace every pod", SETTLE, || async move {
        let now: Vec<Pod> = pods_ref
            .list(params_ref)
            .await
            .map_err(api("list pods"))?
            .items;
        let fresh = now
            .iter()
            .filter(|p| {
                is_ready(p)
                    && !before_ref.contains(p.metadata.name.as_ref().unwrap_or(&String::new()))
            })
            .count();
        Ok(if fresh == 2 && now.len() == 2 {
            Probe::Done(())
        } else {
            Probe::Waiting(format!("{} pods, {fresh} new and ready", now.len()))
        })
    })
    .await?;
    wait_ready(&workers, "vad", 2).await?;

    // Hand edits of fields the operator owns are put back.
    kubectl_ok(&[
        "set",
        "image",
        "-n",
        &ns.name,
        "deployment/vad",
        "worker=hand/edited:1",
    ]);
    kubectl_ok(&["scale", "-n", &ns.name, "deployment/vad", "--replicas=5"]);
    let restored = deployment_matches(&deployments, "vad", "the hand edit undone", |d| {
        let image = d
            .spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.containers[0].image.clone());
        d.spec.replicas == Some(2)
            && image.is_some_and(|i| i.starts_with("remotemedia/remotemedia-model-worker:"))
    })
    .await?;
    let managers: Vec<String> = restored
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.iter().any(|m| m == OPERATOR), "{managers:?}");

    // Deleting the ModelWorker removes its children (owner references, no finalizer).
    workers
        .delete("vad", &DeleteParams::default())
        .await
        .map_err(api("delete the ModelWorker"))?;
    let (deployments, services, pdbs) = (
        &deployments,
        &ns.api::<Service>(),
        &ns.api::<PodDisruptionBudget>(),
    );
    wait_until("the children gone", SETTLE, || async move {
        let left = [
            deployments
                .get_opt("vad")
                .await
                .map_err(api("get"))?
                .is_some(),
            services.get_opt("vad").await.map_err(api("get"))?.is_some(),
            pdbs.get_opt("vad").await.map_err(api("get"))?.is_some(),
        ];
        Ok(if left == [false; 3] {
            Probe::Done(())
        } else {
            Probe::Waiting(format!("deployment, service, pdb left: {left:?}"))
        })
    })
    .await?;
    ns.delete().await
}

#[tokio::test]
async fn a_standby_operator_writes_nothing_and_takes_over_when_the_leader_dies() -> Result<(), Error>
{
    install_crd(&client().await?).await?;
    let client = client().await?;
    let ns = TestNamespace::create(&client, "op-leader").await?;
    let args = [
        "--watch-namespace",
        &ns.name,
        "--lease-namespace",
        &ns.name,
        "--lease-name",
        "operator",
    ];
    let mut leader = Component::start(&format!("{}-a", ns.name), &args)?;
    let leader_ref = &leader;
    wait_until("the first operator to lead", SETTLE, || async move {
        Ok(match leader_ref.metric("remotemedia_operator_leader") {
            Some(1.0) => Probe::Done(()),
            other => Probe::Waiting(format!("leader metric {other:?}")),
        })
    })
    .await?;
    let standby = Component::start(&format!("{}-b", ns.name), &args)?;
    let standby_ref = &standby;
    wait_until("the standby's admin port", SETTLE, || async move {
        Ok(match standby_ref.get("/readyz") {
            Some((200, _)) => Probe::Done(()),
            other => Probe::Waiting(format!("{other:?}")),
        })
    })
    .await?;
    let lease = ns
        .api::<Lease>()
        .get("operator")
        .await
        .map_err(api("get the Lease"))?;
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert!(
        holder.ends_with(&format!("-{}", leader.pid())),
        "holder {holder}, leader pid {}",
        leader.pid()
    );

    let workers = ns.api::<ModelWorker>();
    workers
        .create(&PostParams::default(), &model_worker("first", json!({})))
        .await
        .map_err(api("create"))?;
    wait_ready(&workers, "first", 1).await?;
    assert_eq!(
        standby.metric("remotemedia_operator_reconciles_total"),
        Some(0.0)
    );
    assert_eq!(standby.metric("remotemedia_operator_leader"), Some(0.0));

    // The leader dies without handing the Lease back. While the Lease is still valid, nothing
    // reconciles a new ModelWorker: the standby runs no controller and writes nothing.
    leader.kill();
    let killed = Instant::now();
    workers
        .create(&PostParams::default(), &model_worker("second", json!({})))
        .await
        .map_err(api("create"))?;
    let deployments = ns.api::<Deployment>();
    while killed.elapsed() < Duration::from_secs(4) {
        assert!(
            deployments
                .get_opt("second")
                .await
                .map_err(api("get"))?
                .is_none(),
            "reconciled while the Lease was held"
        );
        let second = workers.get("second").await.map_err(api("get"))?;
        let managers: Vec<String> = second
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.manager)
            .collect();
        assert!(!managers.iter().any(|m| m == OPERATOR), "{managers:?}");
        assert_eq!(
            standby.metric("remotemedia_operator_reconciles_total"),
            Some(0.0)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Then it takes over within the lease duration (15 s) + 5 s of the kill.
    let (_, took) =
        time_until_exists(&deployments, "second", killed, Duration::from_secs(30)).await?;
    eprintln!(
        "timing: the standby reconciled a new ModelWorker {took:?} after the leader's SIGKILL"
    );
    assert!(took <= Duration::from_secs(20), "failover took {took:?}");
    assert_eq!(standby.metric("remotemedia_operator_leader"), Some(1.0));
    assert!(
        standby
            .metric("remotemedia_operator_reconciles_total")
            .unwrap_or_default()
            > 0.0
    );
    wait_ready(&workers, "second", 1).await?;

    // SIGTERM hands the Lease back: a third operator leads at once, not a lease duration later.
    let third = Component::start(&format!("{}-c", ns.name), &args)?;
    let third_ref = &third;
    wait_until("the third operator's admin port", SETTLE, || async move {
        Ok(match third_ref.get("/readyz") {
            Some((200, _)) => Probe::Done(()),
            other => Probe::Waiting(format!("{other:?}")),
        })
    })
    .await?;
    let mut standby = standby;
    let terminated = Instant::now();
    assert!(standby.terminate(), "SIGTERM ends the leader with status 0");
    wait_until(
        "the third operator to lead",
        Duration::from_secs(10),
        || async move {
            Ok(match third_ref.metric("remotemedia_operator_leader") {
                Some(1.0) => Probe::Done(()),
                other => Probe::Waiting(format!("leader metric {other:?}")),
            })
        },
    )
    .await?;
    let took = terminated.elapsed();
    eprintln!("timing: a standby led {took:?} after the leader's SIGTERM");
    assert!(
        took < LEASE_DURATION,
        "the Lease was not handed back: {took:?}"
    );
    drop(third);
    ns.delete().await
}

#[tokio::test]
async fn two_model_workers_with_one_model_id_are_degraded_until_one_goes() -> Result<(), Error> {
    install_crd(&client().await?).await?;
    let client = client().await?;
    let ns = TestNamespace::create(&client, "op-duplicate").await?;
    let _operator = operator_for(&ns)?;
    let workers = ns.api::<ModelWorker>();
    for name in ["vad-a", "vad-b"] {
        let worker = model_worker(name, json!({ "modelId": "vad" }));
        workers
            .create(&PostParams::default(), &worker)
            .await
            .map_err(api("create"))?;
    }
    let workers = &workers;
    let degraded = |name: &'static str, expected: &'static str| async move {
        wait_until(
            &format!("{name} Degraded={expected}"),
            SETTLE,
            || async move {
                let worker = workers.get(name).await.map_err(api("get"))?;
                Ok(match condition(&worker, "Degraded") {
                    Some((status, reason, message)) if status == expected => {
                        Probe::Done((reason, message))
                    }
                    _ => Probe::Waiting(describe(&worker)),
                })
            },
        )
        .await
    };
    let (reason, message) = degraded("vad-a", "True").await?;
    assert_eq!(reason, "DuplicateModelId");
    assert!(message.contains(&format!("{}/vad-b", ns.name)), "{message}");
    assert_eq!(degraded("vad-b", "True").await?.0, "DuplicateModelId");
    // The duplicate goes: the other is no longer degraded, without a change of its own.
    workers
        .delete("vad-b", &DeleteParams::default())
        .await
        .map_err(api("delete"))?;
    degraded("vad-a", "False").await?;
    ns.delete().await
}

/// The RBAC table of `operator/src/lib.rs` as a Role (`--watch-namespace` needs no more): the
/// operator runs as a service account holding only these rules, through a scale-up, a scale-down
/// (the PDB deleted), a spec change and leader election, and is never refused.
#[tokio::test]
async fn the_documented_rbac_rules_are_all_the_operator_needs() -> Result<(), Error> {
    use k8s_openapi::api::{
        authentication::v1::TokenRequest,
        core::v1::ServiceAccount,
        rbac::v1::{Role, RoleBinding},
    };
    install_crd(&client().await?).await?;
    let client = client().await?;
    let ns = TestNamespace::create(&client, "op-rbac").await?;
    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "remotemedia-operator" },
        "rules": [
            { "apiGroups": ["remotemedia.io"], "resources": ["modelworkers"], "verbs": ["list", "watch"] },
            { "apiGroups": ["remotemedia.io"], "resources": ["modelworkers/status"], "verbs": ["patch"] },
            { "apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["list", "watch", "create", "patch"] },
            { "apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch", "create", "patch"] },
            { "apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["get", "list", "watch", "create", "patch", "delete"] },
            { "apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"] },
            { "apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"] },
            { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"] },
        ],
    }))
    .expect("a literal Role is valid");
    ns.api::<Role>()
        .create(&PostParams::default(), &role)
        .await
        .map_err(api("create the Role"))?;
    let account: ServiceAccount =
        serde_json::from_value(json!({ "metadata": { "name": "operator" } })).expect("valid");
    let accounts = ns.api::<ServiceAccount>();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .map_err(api("create the account"))?;
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "remotemedia-operator" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "remotemedia-operator" },
        "subjects": [{ "kind": "ServiceAccount", "name": "operator", "namespace": ns.name }],
    }))
    .expect("valid");
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .map_err(api("create the binding"))?;
    let request: TokenRequest =
        serde_json::from_value(json!({ "spec": { "audiences": [] } })).expect("valid");
    let token = accounts
        .create_token_request("operator", &PostParams::default(), &request)
        .await
        .map_err(api("request a token"))?
        .status
        .and_then(|s| s.token)
        .unwrap_or_default();
    let kubeconfig = remotemedia_e2e::chart::token_kubeconfig(&token);
    let kubeconfig_path = kubeconfig.path().to_string_lossy().into_owned();
    let operator = Component::start_with_env(
        &ns.name,
        &["--watch-namespace", &ns.name, "--lease-namespace", &ns.name],
        &[("KUBECONFIG", &kubeconfig_path)],
    )?;

    let workers = ns.api::<ModelWorker>();
    workers
        .create(
            &PostParams::default(),
            &model_worker("vad", json!({ "replicas": 2 })),
        )
        .await
        .map_err(api("create"))?;
    wait_ready(&workers, "vad", 2).await?;
    pdb_present(&ns, "vad", true).await?;
    workers
        .patch(
            "vad",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 1, "maxConcurrency": 3 } })),
        )
        .await
        .map_err(api("change the spec"))?;
    pdb_present(&ns, "vad", false).await?;
    wait_ready(&workers, "vad", 1).await?;
    let (_, metrics) = operator.get("/metrics").expect("the admin port answers");
    assert!(!metrics.contains("reconcile_failures_total{"), "{metrics}");
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(
        !log.contains("forbidden"),
        "refused by RBAC: {}",
        operator.log.display()
    );
    let events = kubectl_ok(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &ns.name,
        "--field-selector",
        "reportingController=remotemedia-operator",
        "-o",
        "name",
    ]);
    assert!(!events.trim().is_empty(), "the operator published events");
    drop(operator);
    ns.delete().await
}

#[tokio::test]
async fn a_namespace_enforcing_baseline_pod_security_makes_the_model_worker_pod_security_rejected()
-> Result<(), Error> {
    use k8s_openapi::api::core::v1::Namespace;
    install_crd(&client().await?).await?;
    let client = client().await?;
    let ns = TestNamespace::create(&client, "op-podsecurity").await?;
    let label =
        json!({ "metadata": { "labels": { "pod-security.kubernetes.io/enforce": "baseline" } } });
    Api::<Namespace>::all(client.clone())
        .patch(&ns.name, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .map_err(api("label the namespace"))?;
    let _operator = operator_for(&ns)?;
    let workers = ns.api::<ModelWorker>();
    workers
        .create(&PostParams::default(), &model_worker("vad", json!({})))
        .await
        .map_err(api("create"))?;
    let workers = &workers;
    let message = wait_until("Ready=False/PodSecurityRejected", SETTLE, || async move {
        let worker = workers.get("vad").await.map_err(api("get"))?;
        Ok(match condition(&worker, "Ready") {
            Some((status, reason, message))
                if status == "False" && reason == "PodSecurityRejected" =>
            {
                Probe::Done(message)
            }
            _ => Probe::Waiting(describe(&worker)),
        })
    })
    .await?;
    assert!(message.contains("hostPath"), "{message}");
    ns.delete().await
}
