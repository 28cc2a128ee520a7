//! The README's "Install on a cluster" section, run as written against the cluster: its `bash`
//! block (create and label the namespace, `helm install` the chart, apply the example
//! ModelWorker) with a namespace of this test's own, then the operator the chart installed, run
//! as a process with a token of its service account (the chart's image is not built here, so
//! kwok only pretends to run its pod), reconciles the example into its Deployment and Service;
//! the section's app pod passes the API server's validation (`--dry-run=server`).
//!
//! Calling a ModelWorker from an app on a node, and a sidecar routing it, is `flow.rs`.

use std::time::Duration;

use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use kube::Api;
use remotemedia_e2e::{
    Error, Probe, api,
    chart::{current_kubeconfig, kubeconfig_file, service_account_token, token_kubeconfig},
    client, kubectl, kubectl_ok,
    operator::Component,
    repo, run, run_ok, wait_until,
};

/// The release name the README uses.
const RELEASE: &str = "remotemedia";
/// This test's namespaces, in place of the README's `remotemedia`.
const NAMESPACE_PREFIX: &str = "e2e-readme-";

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

/// Uninstalls what a crashed earlier run of this test left: its release and namespace.
fn remove_leftovers() {
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
    }
}

/// A copy of the current kubeconfig whose context defaults to `namespace`, as a user's would
/// after `kubectl config set-context --current --namespace`.
fn kubeconfig_in(namespace: &str) -> tempfile::NamedTempFile {
    let mut config = current_kubeconfig();
    config["contexts"][0]["context"]["namespace"] = namespace.into();
    kubeconfig_file(&config)
}

#[tokio::test]
async fn the_readmes_install_steps_install_the_chart_and_a_model_worker_the_operator_reconciles()
-> Result<(), Error> {
    let client = client().await?;
    remove_leftovers();
    let readme = std::fs::read_to_string(repo("README.md")).expect("the README is committed");
    let [commands] = &blocks(&readme, "Install on a cluster", "bash")[..] else {
        panic!("the install section has not exactly one bash block");
    };
    let [app_pod] = &blocks(&readme, "Install on a cluster", "yaml")[..] else {
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
    let out = std::process::Command::new("bash")
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
    wait_until(
        "the example's Deployment and Service",
        Duration::from_secs(60),
        || async move {
            let deployment = deployments
                .get_opt("silero-vad")
                .await
                .map_err(api("get the Deployment"))?;
            let service = services
                .get_opt("silero-vad")
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
    .await
    .map(|deployment| {
        assert_eq!(deployment.spec.replicas, Some(2));
    })?;
    drop(operator);

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
    Ok(())
}
