//! The README's "Install on a cluster" section, run as written against the cluster: its `bash`
//! block (create and label the namespace, `helm install` the chart, apply the example
//! ModelWorker) with a namespace of this test's own; then the operator the chart installed, run
//! as a process with a token of its service account (the chart's image is not built here, so
//! kwok only pretends to run its pod), reconciles the example into its Deployment and Service.
//!
//! Then the section's app, its `python` block, calls the example as an app pod on a node would.
//! The node is a simulated node of this test's own (`remotemedia_e2e::nodes`: its pod CIDR routed
//! into a network namespace); the example is placed there (`nodeSelector`, toleration), so kwok
//! gives its two pods IPs from that CIDR, and a worker process serves each pod's IP with the pod's
//! arguments. The model is `builtin://identity` in place of the VAD the example reads from its
//! `models` claim (no such model is in the repository), and the example's `batching` is dropped,
//! since a built-in model has no batch dim and its worker refuses `--max-batch-size`. The node's
//! sidecar is a process run as the chart runs it (`--discovery kubernetes`, `--node-name` the
//! node, a token of the chart's sidecar service account); the app is the block run by the
//! project's Python with `REMOTEMEDIA_SIDECAR` naming the node's socket directory. It must print
//! the identity's answer (its tone's first samples, shape `[16, 1024]`), the sidecar must count the
//! request `shm_local`, one worker must have served it and map the app's region.
//!
//! Last, the section's app pod passes the API server's validation (`--dry-run=server`).

use std::{process::Command, time::Duration};

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use kube::{Api, Client};
use remotemedia_e2e::{
    Error, Probe, api,
    chart::{current_kubeconfig, kubeconfig_file, service_account_token, token_kubeconfig},
    client,
    examples::{delete_models_volume, models_claim},
    kubectl, kubectl_ok,
    nodes::{TestNode, running_pods},
    operator::Component,
    procfs::mapped_regions,
    repo, run, run_ok, wait_until,
};
use serde_json::json;

/// The release name the README uses.
const RELEASE: &str = "remotemedia";
/// This test's namespaces, in place of the README's `remotemedia`.
const NAMESPACE_PREFIX: &str = "e2e-readme-";
/// The example ModelWorker (`examples/modelworker.yaml`): its name, modelId and replicas.
const EXAMPLE: &str = "silero-vad";
const EXAMPLE_REPLICAS: usize = 2;
/// What the app's tensor holds: a tone of this frequency at this sample rate, in windows.
const TONE_HZ: f64 = 440.0;
const SAMPLE_RATE: f64 = 16000.0;
const WINDOWS: usize = 16;
const WINDOW_SAMPLES: usize = 1024;
const WAIT: Duration = Duration::from_secs(60);

/// The fenced blocks of `language` in the README section under `heading`.
fn blocks(readme: &str, heading: &str, language: &str) -> Vec<String> {
    let start = readme
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("the README has no section {heading:?}"));
    let section = &readme[start + 1..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let fence = format!("```{language}\n");
    section
        .split(&fence)
        .skip(1)
        .filter_map(|rest| {
            rest.split_once("\n```")
                .map(|(block, _)| format!("{block}\n"))
        })
        .collect()
}

/// Uninstalls what a crashed earlier run of this test left: its release, namespace and volume.
async fn remove_leftovers(client: &Client) -> Result<(), Error> {
    let namespaces = kubectl_ok(&["get", "namespaces", "-o", "name"]);
    for namespace in namespaces
        .lines()
        .filter_map(|line| line.strip_prefix("namespace/"))
        .filter(|name| name.starts_with(NAMESPACE_PREFIX))
    {
        eprintln!("deleting {namespace}, left by an earlier run");
        run(
            "helm",
            &["uninstall", RELEASE, "-n", namespace, "--ignore-not-found"],
            None,
        );
        kubectl(&["delete", "namespace", namespace, "--wait=false"], None);
        delete_models_volume(client, namespace).await?;
    }
    Ok(())
}

/// A copy of the current kubeconfig whose context defaults to `namespace`, as a user's would
/// after `kubectl config set-context --current --namespace`.
fn kubeconfig_in(namespace: &str) -> tempfile::NamedTempFile {
    let mut config = current_kubeconfig();
    config["contexts"][0]["context"]["namespace"] = namespace.into();
    kubeconfig_file(&config)
}

/// The line the README's app prints when the model answers with its input (identity): the
/// tone's first four samples, as NumPy computes them (in f64, then rounded to f32).
fn identity_answer() -> String {
    let first: Vec<String> = (0..4)
        .map(|k| {
            let sample =
                (2.0 * std::f64::consts::PI * TONE_HZ * (f64::from(k) / SAMPLE_RATE)).sin();
            format!("{:.4}", sample as f32)
        })
        .collect();
    format!(
        "{EXAMPLE}: float32 [{WINDOWS}, {WINDOW_SAMPLES}] {}",
        first.join(" ")
    )
}

/// The project's Python, which has the SDK: `REMOTEMEDIA_PYTHON` (`scripts/test.sh`,
/// `e2e/test.sh`), else `python3` from PATH (`e2e/cluster.sh env` puts the environment first).
fn python() -> String {
    std::env::var("REMOTEMEDIA_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

#[tokio::test]
async fn the_readmes_install_steps_install_the_chart_and_its_app_gets_the_example_model_workers_answer_in_place()
-> Result<(), Error> {
    let client = client().await?;
    remove_leftovers(&client).await?;
    let readme = std::fs::read_to_string(repo("README.md")).expect("the README is committed");
    let section = "Install on a cluster";
    let [commands] = &blocks(&readme, section, "bash")[..] else {
        panic!("the install section has not exactly one bash block");
    };
    let [app] = &blocks(&readme, section, "python")[..] else {
        panic!("the install section has not exactly one python block");
    };
    let [app_pod] = &blocks(&readme, section, "yaml")[..] else {
        panic!("the install section has not exactly one yaml block");
    };
    let namespace = format!("{NAMESPACE_PREFIX}{}", std::process::id());
    let mut script = commands
        .replace("namespace remotemedia", &format!("namespace {namespace}"))
        .replace("-n remotemedia", &format!("-n {namespace}"))
        .replace("<your registry>", "registry.invalid");
    // Other tests applied the CRD already, as a user might have: the README says to take it
    // over then.
    let install = "helm install remotemedia charts/remotemedia";
    assert!(script.contains(install), "{script}");
    if kubectl(&["get", "crd", "modelworkers.remotemedia.io"], None).success {
        script = script.replace(install, &format!("{install} --take-ownership"));
    }
    let config = kubeconfig_in(&namespace);
    let config = config.path().to_str().expect("UTF-8 temporary path");
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(repo(""))
        .env("KUBECONFIG", config)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "the README's commands failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_str(&run_ok(
        "helm",
        &["status", RELEASE, "-n", &namespace, "-o", "json"],
    ))
    .expect("helm prints the status as JSON");
    assert_eq!(status["info"]["status"], "deployed");

    // What the example expects of its namespace, and a node of this test's own for its pods,
    // whose models this test serves (see the module's comment), before anything reconciles it.
    models_claim(&client, &namespace).await?;
    let node = TestNode::create(&client, &format!("{namespace}-node"), 0).await?;
    let mut patch = json!({ "spec": node.placement() });
    patch["spec"]["batching"] = serde_json::Value::Null;
    kubectl_ok(&[
        "--kubeconfig",
        config,
        "patch",
        "modelworker",
        EXAMPLE,
        "--type",
        "merge",
        "-p",
        &patch.to_string(),
    ]);

    // The operator the chart installed, as the chart runs it: with its service account.
    // A release named after the chart names its objects `<release>-<component>`.
    let token = token_kubeconfig(&service_account_token(
        &namespace,
        &format!("{RELEASE}-operator"),
        10,
    ));
    let token = token.path().to_str().expect("UTF-8 temporary path");
    let operator = Component::start_with_env(
        &namespace,
        &["--leader-election=false"],
        &[("KUBECONFIG", token)],
    )?;
    let deployments = &Api::<Deployment>::namespaced(client.clone(), &namespace);
    let services = &Api::<Service>::namespaced(client.clone(), &namespace);
    let deployment = wait_until(
        "the example's Deployment and Service",
        WAIT,
        || async move {
            let deployment = deployments
                .get_opt(EXAMPLE)
                .await
                .map_err(api("get the Deployment"))?;
            let service = services
                .get_opt(EXAMPLE)
                .await
                .map_err(api("get the Service"))?;
            Ok(match (deployment, service) {
                (Some(deployment), Some(_)) => Probe::Done(deployment),
                seen => Probe::Waiting(format!(
                    "deployment {}, service {}",
                    seen.0.is_some(),
                    seen.1.is_some()
                )),
            })
        },
    )
    .await?;
    assert_eq!(
        deployment.spec.replicas,
        Some(i32::try_from(EXAMPLE_REPLICAS).expect("a small count"))
    );

    // The node's sidecar as the chart runs it, with the chart's sidecar service account.
    let sidecar_token = token_kubeconfig(&service_account_token(
        &namespace,
        &format!("{RELEASE}-sidecar"),
        10,
    ));
    let sidecar_token = sidecar_token.path().to_str().expect("UTF-8 temporary path");
    let sidecar = node.start_sidecar(sidecar_token, &[]).await?;
    let pods = running_pods(&client, &namespace, EXAMPLE, EXAMPLE_REPLICAS).await?;
    let mut workers = Vec::new();
    let mut endpoints = Vec::new();
    for pod in &pods {
        workers.push(node.run_worker(pod, "builtin://identity").await?);
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
        endpoints.push(format!(
            "{namespace}/{EXAMPLE} {}:50051 {} true",
            ip.expect("running_pods waits for IPs"),
            node.name
        ));
    }
    sidecar
        .wait_for_endpoints(&namespace, &endpoints, WAIT)
        .await?;

    // The app, as the app pod runs it on that node.
    let worker_requests = || -> f64 {
        workers
            .iter()
            .map(|worker| worker.metric_sum("remotemedia_worker_requests_total"))
            .sum()
    };
    let before = worker_requests();
    // Its bare model name would match every namespace's `silero-vad` (other tests apply the
    // example too): it asks for this namespace's.
    let bare = format!("model=\"{EXAMPLE}\"");
    assert!(app.contains(&bare), "the app names no model {bare}:\n{app}");
    let app = app.replace(&bare, &format!("model=\"{namespace}/{EXAMPLE}\""));
    let script = tempfile::Builder::new()
        .suffix(".py")
        .tempfile()
        .expect("a temporary file can be made");
    std::fs::write(script.path(), &app).expect("the app is written");
    let out = Command::new(python())
        .arg(script.path())
        .env(
            "REMOTEMEDIA_SIDECAR",
            format!("unix://{}", node.socket_dir().display()),
        )
        .output()
        .expect("the project's Python starts (REMOTEMEDIA_PYTHON)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the README's app failed (is the SDK installed? `make python-sdk`): {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.trim(), identity_answer());
    // The colocated way: a grant of the app's region, read in place by one of the workers.
    assert_eq!(
        sidecar.metric_sum(
            "remotemedia_sidecar_inference_requests_total{path=\"shm_local\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        sidecar.metric_sum("remotemedia_sidecar_inference_requests_total"),
        1.0
    );
    let served = worker_requests() - before;
    assert_eq!(served, 1.0, "the workers served {served} requests, not 1");
    assert!(
        workers
            .iter()
            .any(|worker| mapped_regions(worker.pid()) > 0),
        "no worker maps a brokered region"
    );
    drop((workers, sidecar, operator));

    let out = run(
        "kubectl",
        &[
            "--kubeconfig",
            config,
            "apply",
            "--dry-run=server",
            "-f",
            "-",
        ],
        Some(app_pod),
    );
    assert!(out.success, "the app pod: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "pod/app created (server dry run)");

    kubectl_ok(&[
        "--kubeconfig",
        config,
        "delete",
        "-f",
        &repo("examples/modelworker.yaml"),
    ]);
    run_ok("helm", &["uninstall", RELEASE, "-n", &namespace]);
    kubectl_ok(&["delete", "namespace", &namespace, "--wait=false"]);
    delete_models_volume(&client, &namespace).await
}
