//! The ModelWorker API against a real API server, which is authoritative for validation: the CRD
//! installs, the examples apply, invalid objects are refused naming the field, `kubectl explain`
//! prints our docs, and `kubectl scale` and a HorizontalPodAutoscaler drive `spec.replicas`
//! through the scale subresource. No operator runs here: only the API is under test.

use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::{Client, CustomResourceExt, api::PostParams};
use remotemedia_crds::{CATEGORY, Device, ModelWorker, SHORT_NAME};
use remotemedia_e2e::{
    Error, Probe, Run, TestNamespace, api, client, repo, run, wait_for_crd_established, wait_until,
};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(60);

/// Runs kubectl (from PATH, against KUBECONFIG's cluster) with `stdin` as its input.
fn kubectl(args: &[&str], stdin: Option<&str>) -> Run {
    run("kubectl", args, stdin)
}

/// Runs kubectl and returns its output, failing the test if kubectl fails.
fn kubectl_ok(args: &[&str]) -> String {
    let run = kubectl(args, None);
    assert!(run.success, "kubectl {args:?} failed: {}", run.stderr);
    run.stdout
}

/// Installs the committed CRD as users do and waits until the API server serves it. Every test
/// calls it: tests run in any order, and a repeated server-side apply changes nothing.
async fn install_crd(client: &Client) -> Result<(), Error> {
    let crd = repo("crds/modelworker.yaml");
    kubectl_ok(&["apply", "--server-side", "-f", &crd]);
    wait_for_crd_established(client, "modelworkers.remotemedia.io").await
}

/// A ModelWorker named `name` with a valid CPU spec, `patch`'s keys replacing the spec's.
fn model_worker(name: &str, patch: Value) -> Value {
    let mut spec =
        json!({ "modelId": "silero-vad", "model": { "uri": "pvc://models/silero-vad/model.pt" } });
    for (key, value) in patch.as_object().expect("a patch is an object") {
        spec[key] = value.clone();
    }
    json!({
        "apiVersion": "remotemedia.io/v1alpha1",
        "kind": "ModelWorker",
        "metadata": { "name": name },
        "spec": spec,
    })
}

#[tokio::test]
async fn crd_installs_with_server_side_apply_and_examples_apply() -> Result<(), Error> {
    let client = client().await?;
    install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "mw-examples").await?;
    for example in ["examples/modelworker.yaml", "examples/modelworker-gpu.yaml"] {
        let path = repo(example);
        kubectl_ok(&["apply", "-n", &ns.name, "-f", &path]);
    }
    let workers = ns.api::<ModelWorker>();
    let cpu = workers
        .get("silero-vad")
        .await
        .map_err(api("get the CPU example"))?;
    assert_eq!(cpu.spec.replicas, 2);
    let gpu = workers
        .get("whisper-small")
        .await
        .map_err(api("get the GPU example"))?;
    assert_eq!((gpu.spec.device, gpu.spec.gpus), (Device::Cuda, 1));

    // Printer columns, through the short name and the category.
    let table = kubectl_ok(&["get", SHORT_NAME, "-n", &ns.name]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME", "MODEL", "DEVICE", "REPLICAS", "READY", "ENDPOINT", "AGE"
        ]
    );
    assert!(
        table.lines().any(|l| l.split_whitespace().take(4).eq([
            "whisper-small",
            "whisper-small",
            "cuda",
            "1"
        ])),
        "{table}"
    );
    let listed = kubectl_ok(&["get", CATEGORY, "-n", &ns.name, "-o", "name"]);
    assert!(
        listed.contains("modelworker.remotemedia.io/silero-vad"),
        "{listed}"
    );
    ns.delete().await
}

#[tokio::test]
async fn invalid_model_workers_are_refused_with_a_message_naming_the_field() -> Result<(), Error> {
    let client = client().await?;
    install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "mw-invalid").await?;
    let long_id = "a".repeat(64);
    let long_uri = format!("file:///{}", "m".repeat(1024));
    // (what is wrong, spec patch, the field, words of the API server's message)
    let cases = [
        (
            "gpus on cpu",
            json!({ "gpus": 1 }),
            "spec.gpus",
            "gpus needs device: cuda",
        ),
        (
            "cuda without a gpu",
            json!({ "device": "cuda" }),
            "spec.gpus",
            "device: cuda needs gpus: 1",
        ),
        (
            "two gpus",
            json!({ "device": "cuda", "gpus": 2 }),
            "spec.gpus",
            "less than or equal to 1",
        ),
        (
            "unknown device",
            json!({ "device": "tpu" }),
            "spec.device",
            "Unsupported value",
        ),
        (
            "negative replicas",
            json!({ "replicas": -1 }),
            "spec.replicas",
            "greater than or equal to 0",
        ),
        (
            "empty batch",
            json!({ "batching": { "maxBatchSize": 0 } }),
            "spec.batching.maxBatchSize",
            "greater than or equal to 1",
        ),
        (
            "huge batch",
            json!({ "batching": { "maxBatchSize": 1025 } }),
            "spec.batching.maxBatchSize",
            "less than or equal to 1024",
        ),
        (
            "long batch wait",
            json!({ "batching": { "batchTimeoutUs": 1_000_001 } }),
            "spec.batching.batchTimeoutUs",
            "less than or equal to 1000000",
        ),
        (
            "no concurrency",
            json!({ "maxConcurrency": 0 }),
            "spec.maxConcurrency",
            "greater than or equal to 1",
        ),
        (
            "model id not a DNS label",
            json!({ "modelId": "Silero_VAD" }),
            "spec.modelId",
            "must be a DNS label",
        ),
        (
            "model id too long",
            json!({ "modelId": long_id }),
            "spec.modelId",
            "Too long",
        ),
        (
            "s3 uri",
            json!({ "model": { "uri": "s3://bucket/model.pt" } }),
            "spec.model.uri",
            "must start with pvc://, file:// or hostpath://",
        ),
        (
            "pvc uri without a path",
            json!({ "model": { "uri": "pvc://models" } }),
            "spec.model.uri",
            "must be pvc://<claim>/<path>",
        ),
        (
            "file uri with a host",
            json!({ "model": { "uri": "file://host/model.pt" } }),
            "spec.model.uri",
            "must be an absolute path",
        ),
        (
            "uri leaving the claim",
            json!({ "model": { "uri": "pvc://models/../x" } }),
            "spec.model.uri",
            "'..' path segment",
        ),
        (
            "uri too long",
            json!({ "model": { "uri": long_uri } }),
            "spec.model.uri",
            "Too long",
        ),
        (
            "gpu in resources",
            json!({ "resources": { "limits": { "nvidia.com/gpu": 1 } } }),
            "spec.resources.limits",
            "set GPUs with spec.gpus",
        ),
        (
            "frozen rollout",
            json!({ "rollout": { "maxSurge": 0, "maxUnavailable": "0%" } }),
            "spec.rollout.maxUnavailable",
            "must not both be 0",
        ),
        (
            "bare number string",
            json!({ "rollout": { "maxSurge": "25" } }),
            "spec.rollout.maxSurge",
            "a percentage such as 25%",
        ),
        (
            "unknown field",
            json!({ "gpuCount": 1 }),
            "spec.gpuCount",
            "unknown field",
        ),
    ];
    let mut wrong = Vec::new();
    for (what, patch, field, words) in cases {
        let object = model_worker("invalid", patch).to_string();
        let run = kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&object));
        if run.success || !run.stderr.contains(field) || !run.stderr.contains(words) {
            wrong.push(format!(
                "{what}: success={} stderr={}",
                run.success,
                run.stderr.trim()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused as expected:\n{}",
        wrong.join("\n")
    );
    assert!(
        ns.api::<ModelWorker>()
            .get_opt("invalid")
            .await
            .map_err(api("get"))?
            .is_none()
    );
    ns.delete().await
}

/// `text` with every run of whitespace made one space: kubectl explain wraps lines.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn kubectl_explain_prints_the_docs_of_the_rust_types() -> Result<(), Error> {
    install_crd(&client().await?).await?;
    let crd = serde_json::to_value(ModelWorker::crd()).expect("a CRD is JSON");
    let batching = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["batching"];
    let expected: Vec<String> = [
        &batching["description"],
        &batching["properties"]["maxBatchSize"]["description"],
        &batching["properties"]["batchTimeoutUs"]["description"],
    ]
    .iter()
    .map(|d| words(d.as_str().expect("documented")))
    .collect();
    // The API server publishes a new CRD's OpenAPI a moment after it is established.
    let explained = wait_until(
        "kubectl explain modelworker.spec.batching",
        SETTLE,
        || async {
            let run = kubectl(&["explain", "modelworker.spec.batching"], None);
            Ok(if run.success {
                Probe::Done(words(&run.stdout))
            } else {
                Probe::Waiting(run.stderr)
            })
        },
    )
    .await?;
    for doc in expected {
        assert!(explained.contains(&doc), "{doc:?} not in {explained:?}");
    }
    Ok(())
}

#[tokio::test]
async fn kubectl_scale_sets_spec_replicas_through_the_scale_subresource() -> Result<(), Error> {
    let client = client().await?;
    install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "mw-scale").await?;
    let worker: ModelWorker = serde_json::from_value(model_worker("x", json!({}))).expect("valid");
    let workers = ns.api::<ModelWorker>();
    workers
        .create(&PostParams::default(), &worker)
        .await
        .map_err(api("create the ModelWorker"))?;

    kubectl_ok(&["scale", "-n", &ns.name, "mw/x", "--replicas=3"]);
    let scaled = workers.get("x").await.map_err(api("get the ModelWorker"))?;
    assert_eq!(scaled.spec.replicas, 3);
    ns.delete().await
}

#[tokio::test]
async fn hpa_targeting_a_model_worker_is_able_to_scale() -> Result<(), Error> {
    let client = client().await?;
    install_crd(&client).await?;
    let ns = TestNamespace::create(&client, "mw-hpa").await?;
    let worker: ModelWorker = serde_json::from_value(model_worker("x", json!({}))).expect("valid");
    ns.api::<ModelWorker>()
        .create(&PostParams::default(), &worker)
        .await
        .map_err(api("create the ModelWorker"))?;
    // What the operator will report: pods and their selector, read through the scale subresource.
    let status =
        json!({ "status": { "replicas": 1, "selector": "remotemedia.io/model-worker=x" } });
    kubectl_ok(&[
        "patch",
        "-n",
        &ns.name,
        "mw/x",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    let path = format!(
        "/apis/remotemedia.io/v1alpha1/namespaces/{}/modelworkers/x/scale",
        ns.name
    );
    let scale: Value = serde_json::from_str(&kubectl_ok(&["get", "--raw", &path])).expect("JSON");
    assert_eq!(scale["spec"]["replicas"], 1);
    assert_eq!(scale["status"]["replicas"], 1);
    assert_eq!(scale["status"]["selector"], "remotemedia.io/model-worker=x");

    let hpa: HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": { "name": "x" },
        "spec": {
            "scaleTargetRef": { "apiVersion": "remotemedia.io/v1alpha1", "kind": "ModelWorker", "name": "x" },
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [{ "type": "Resource", "resource": { "name": "cpu", "target": { "type": "Utilization", "averageUtilization": 50 } } }],
        },
    }))
    .expect("a HorizontalPodAutoscaler built from literals is valid");
    let hpas = ns.api::<HorizontalPodAutoscaler>();
    hpas.create(&PostParams::default(), &hpa)
        .await
        .map_err(api("create the HorizontalPodAutoscaler"))?;
    let hpas = &hpas;
    wait_until(
        "the HorizontalPodAutoscaler to report AbleToScale=True",
        SETTLE,
        || async move {
            let hpa = hpas
                .get("x")
                .await
                .map_err(api("get the HorizontalPodAutoscaler"))?;
            let conditions = hpa.status.and_then(|s| s.conditions).unwrap_or_default();
            Ok(match conditions.iter().find(|c| c.type_ == "AbleToScale") {
                Some(c) if c.status == "True" => Probe::Done(()),
                _ => Probe::Waiting(format!("{conditions:?}")),
            })
        },
    )
    .await?;
    ns.delete().await
}
