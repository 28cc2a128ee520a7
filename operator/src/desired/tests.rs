use serde_json::{Value, json};

use super::*;

fn defaults() -> WorkerDefaults {
    WorkerDefaults {
        image: "registry.example/worker:1".into(),
        cuda_image: "registry.example/worker:1-cuda".into(),
        socket_dir: "/run/remotemedia".into(),
    }
}

/// A ModelWorker in namespace `ml`, `spec` merged over a valid CPU spec.
fn worker(spec: Value) -> ModelWorker {
    let mut base = json!({ "modelId": "vad", "model": { "uri": "pvc://models/vad/model.pt" } });
    for (key, value) in spec.as_object().unwrap() {
        base[key] = value.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "remotemedia.io/v1alpha1",
        "kind": "ModelWorker",
        "metadata": { "name": "vad", "namespace": "ml", "uid": "1234", "generation": 3 },
        "spec": base,
    }))
    .unwrap()
}

fn build(spec: Value) -> Desired {
    let worker = worker(spec);
    Desired::build(&validate(&worker).unwrap(), &defaults())
}

fn container(desired: &Desired) -> &Container {
    &pod(desired).containers[0]
}

fn pod(desired: &Desired) -> &PodSpec {
    desired.deployment.spec.template.spec.as_ref().unwrap()
}

fn arg_after<'a>(container: &'a Container, flag: &str) -> Option<&'a str> {
    let args = container.args.as_ref().unwrap();
    let at = args.iter().position(|arg| arg == flag)?;
    args.get(at + 1).map(String::as_str)
}

#[test]
fn model_uris_become_volumes_and_model_paths() {
    let cases = [
        (
            "pvc://models/vad/model.pt",
            "/models/vad/model.pt",
            Some("claim models"),
        ),
        ("file:///opt/models/vad.pt", "/opt/models/vad.pt", None),
        (
            "hostpath:///srv/models/vad.pt",
            "/models/vad.pt",
            Some("host /srv/models"),
        ),
    ];
    for (uri, path, volume) in cases {
        let desired = build(json!({ "model": { "uri": uri } }));
        assert_eq!(
            arg_after(container(&desired), "--model-path"),
            Some(path),
            "{uri}"
        );
        let model_volume = pod(&desired)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "model");
        let described = model_volume.map(|v| match (&v.persistent_volume_claim, &v.host_path) {
            (Some(pvc), None) => {
                assert_eq!(pvc.read_only, Some(true));
                format!("claim {}", pvc.claim_name)
            }
            (None, Some(host)) => format!("host {}", host.path),
            other => panic!("unexpected model volume {other:?}"),
        });
        assert_eq!(described.as_deref(), volume, "{uri}");
        let mounted_read_only = container(&desired)
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == "model" && m.mount_path == "/models" && m.read_only == Some(true));
        assert_eq!(mounted_read_only, volume.is_some(), "{uri}");
    }
}

#[test]
fn bad_model_uris_are_refused_naming_the_rule() {
    for (uri, expected) in [
        ("s3://bucket/model.pt", "must start with"),
        ("pvc://Models/x.pt", "pvc://<claim>/<path>"),
        ("pvc://models", "pvc://<claim>/<path>"),
        ("pvc://models/", "pvc://<claim>/<path>"),
        ("file://host/x.pt", "absolute path"),
        ("file:///models/", "absolute path"),
        ("hostpath:///model.pt", "absolute path"),
        ("hostpath:///srv/../etc/model.pt", "'..'"),
    ] {
        let error = ModelLocation::parse(uri).unwrap_err().to_string();
        assert!(error.contains(expected), "{uri}: {error}");
    }
}

#[test]
fn gpus_that_do_not_fit_the_device_are_refused() {
    for spec in [json!({ "device": "cuda", "gpus": 0 }), json!({ "gpus": 1 })] {
        let worker = worker(spec.clone());
        assert!(
            matches!(validate(&worker), Err(InvalidSpec::Gpus { .. })),
            "{spec}"
        );
    }
}

#[test]
fn cuda_workers_get_a_gpu_limit_the_cuda_image_and_no_surge() {
    let desired = build(json!({
        "device": "cuda", "gpus": 1,
        "resources": { "limits": { "memory": "12Gi" }, "requests": { "cpu": "4" } },
    }));
    let container = container(&desired);
    let limits = container
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
    assert_eq!(limits["memory"], Quantity("12Gi".into()));
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/worker:1-cuda")
    );
    assert_eq!(arg_after(container, "--device"), Some("cuda:0"));
    let rolling = desired.deployment.spec.strategy.as_ref().unwrap();
    let rolling = rolling.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
}

#[test]
fn cpu_workers_get_no_gpu_and_the_rollout_the_spec_asks_for() {
    let desired = build(json!({ "rollout": { "maxSurge": 2 } }));
    let container = container(&desired);
    let limits = container
        .resources
        .as_ref()
        .unwrap()
        .limits
        .clone()
        .unwrap_or_default();
    assert!(!limits.contains_key("nvidia.com/gpu"));
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/worker:1")
    );
    assert_eq!(arg_after(container, "--device"), Some("cpu"));
    let rolling = desired.deployment.spec.strategy.as_ref().unwrap();
    let rolling = rolling.rolling_update.as_ref().unwrap();
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(2)));
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::String("25%".into()))
    );
}

#[test]
fn the_pod_template_runs_the_worker_with_probes_mounts_and_drain() {
    let desired = build(json!({
        "image": "my/worker:2",
        "maxConcurrency": 64,
        "batching": { "maxBatchSize": 16, "batchTimeoutUs": 500 },
        "sharedMemorySize": "2Gi",
        "nodeSelector": { "pool": "inference" },
        "priorityClassName": "high",
        "env": [{ "name": "RUST_LOG", "value": "debug" }],
    }));
    let pod = pod(&desired);
    let container = container(&desired);
    assert_eq!(container.image.as_deref(), Some("my/worker:2"));
    assert_eq!(arg_after(container, "--model-id"), Some("vad"));
    assert_eq!(arg_after(container, "--max-concurrency"), Some("64"));
    assert_eq!(arg_after(container, "--max-batch-size"), Some("16"));
    assert_eq!(arg_after(container, "--batch-timeout-us"), Some("500"));
    assert_eq!(arg_after(container, "--port"), Some("50051"));
    assert_eq!(arg_after(container, "--admin-port"), Some("9090"));
    // The grace period covers the worker's drain delay and timeout.
    assert_eq!(arg_after(container, "--drain-delay"), Some("5s"));
    assert_eq!(arg_after(container, "--drain-timeout"), Some("20s"));
    assert!(pod.termination_grace_period_seconds.unwrap() > 5 + 20);
    assert_eq!(
        container.termination_message_policy.as_deref(),
        Some("FallbackToLogsOnError")
    );
    let startup = container.startup_probe.as_ref().unwrap();
    let budget = startup.period_seconds.unwrap() * startup.failure_threshold.unwrap();
    assert!(budget >= 20 * 60, "startup budget {budget}s");
    for probe in [
        &container.startup_probe,
        &container.readiness_probe,
        &container.liveness_probe,
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.port, IntOrString::String("admin".into()));
    }
    let volumes = pod.volumes.as_ref().unwrap();
    let sockets = volumes.iter().find(|v| v.name == "sockets").unwrap();
    assert_eq!(sockets.host_path.as_ref().unwrap().path, "/run/remotemedia");
    // The worker joins the node broker through the socket directory it mounts.
    assert_eq!(arg_after(container, "--broker"), Some("/run/remotemedia"));
    let dshm = volumes.iter().find(|v| v.name == "dshm").unwrap();
    let empty_dir = dshm.empty_dir.as_ref().unwrap();
    assert_eq!(empty_dir.medium.as_deref(), Some("Memory"));
    assert_eq!(empty_dir.size_limit, Some(Quantity("2Gi".into())));
    let mounts: Vec<&str> = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains(&"/dev/shm") && mounts.contains(&"/run/remotemedia"),
        "{mounts:?}"
    );
    assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "inference");
    assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
    assert_eq!(container.env.as_ref().unwrap()[0].name, "RUST_LOG");
}

#[test]
fn no_shared_memory_size_leaves_dev_shm_to_the_runtime() {
    let desired = build(json!({}));
    assert!(
        pod(&desired)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .all(|v| v.name != "dshm")
    );
}

#[test]
fn children_are_owned_by_the_model_worker_and_labelled_for_discovery() {
    let desired = build(json!({ "replicas": 3 }));
    let pdb = desired.pdb.as_ref().expect("3 replicas get a PDB");
    for meta in [
        &desired.deployment.metadata,
        &desired.service.metadata,
        &pdb.metadata,
    ] {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("ModelWorker", "vad", "1234")
        );
        assert_eq!(owner.controller, Some(true));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_MODEL_ID], "vad");
        assert_eq!(labels[LABEL_MANAGED_BY], FIELD_MANAGER);
        assert_eq!(meta.namespace.as_deref(), Some("ml"));
    }
    let service = desired.service.spec.as_ref().unwrap();
    assert_eq!(service.selector, Some(selector_labels("vad")));
    let grpc = &service.ports.as_ref().unwrap()[0];
    assert_eq!((grpc.name.as_deref(), grpc.port), (Some("grpc"), 50051));
    assert_eq!(
        pdb.spec.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(1))
    );
    assert_eq!(desired.deployment.spec.replicas, Some(3));
    assert_eq!(
        selector_string("vad"),
        "app.kubernetes.io/name=remotemedia-model-worker,remotemedia.io/model-worker=vad"
    );
    assert_eq!(endpoint("vad", "ml"), "vad.ml.svc:50051");
}

#[test]
fn one_replica_or_none_gets_no_disruption_budget() {
    for replicas in [0, 1] {
        assert!(
            build(json!({ "replicas": replicas })).pdb.is_none(),
            "{replicas}"
        );
    }
    assert!(build(json!({ "replicas": 2 })).pdb.is_some());
}

#[test]
fn the_template_hash_label_changes_exactly_when_the_pod_template_does() {
    let hash = |spec: Value| {
        let desired = build(spec);
        let mut template = desired.deployment.spec.template.clone();
        let labels = template.metadata.as_mut().unwrap().labels.as_mut().unwrap();
        let label = labels.remove(LABEL_TEMPLATE_HASH).expect("the hash label");
        // The label is the hash of the rest of the template, as status compares it.
        assert_eq!(label, template_hash(&template));
        assert_eq!(label, desired.template_hash);
        label
    };
    let base = hash(json!({ "replicas": 1 }));
    assert_eq!(base.len(), 16);
    assert_eq!(base, hash(json!({ "replicas": 1 })));
    // Replicas and the disruption budget are not in the template: no rollout.
    assert_eq!(base, hash(json!({ "replicas": 4 })));
    assert_ne!(base, hash(json!({ "replicas": 1, "maxConcurrency": 7 })));
    assert_ne!(
        base,
        hash(json!({ "replicas": 1, "model": { "uri": "file:///opt/other.pt" } }))
    );
    // Selectors never carry it: they are immutable, and every template's pods are the worker's.
    let desired = build(json!({}));
    let selector = desired.deployment.spec.selector.match_labels.unwrap();
    assert!(!selector.contains_key(LABEL_TEMPLATE_HASH));
}
