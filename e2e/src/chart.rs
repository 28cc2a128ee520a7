//! The Helm chart as tests use it: installed into a test namespace, and its service accounts'
//! tokens, so a test runs a component with exactly the permissions the chart grants it.

use std::time::Duration;

use crate::{Error, Probe, kubectl_ok, repo, run_ok, wait_until};

/// The chart's folder.
pub fn chart() -> String {
    repo("charts/remotemedia")
}

/// Runs helm and returns what it printed, failing the test if helm fails.
pub fn helm_ok(args: &[&str]) -> String {
    run_ok("helm", args)
}

/// Marks a namespace for the `privileged` Pod Security profile, as the README tells users to:
/// the sidecar, worker and app pods mount the node's socket directory by hostPath.
pub fn allow_host_path(namespace: &str) {
    kubectl_ok(&[
        "label",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=privileged",
    ]);
}

/// Installs the chart as release `namespace` in `namespace` (so its cluster-scoped RBAC objects
/// are the test's own), leaving the CRD to the caller, with `--set` values `sets`.
pub fn install_without_crd(namespace: &str, sets: &[&str]) {
    allow_host_path(namespace);
    let chart = chart();
    let mut args = vec![
        "install",
        namespace,
        &chart,
        "-n",
        namespace,
        "--set",
        "crds.enabled=false",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm_ok(&args);
}

/// The chart's service account of `component` (`operator`, `sidecar`) in the release
/// [`install_without_crd`] made.
pub fn service_account(namespace: &str, component: &str) -> String {
    format!("{namespace}-remotemedia-{component}")
}

/// A token of service account `account` in `namespace`, valid for `minutes`.
pub fn service_account_token(namespace: &str, account: &str, minutes: u32) -> String {
    kubectl_ok(&[
        "create",
        "token",
        account,
        "-n",
        namespace,
        &format!("--duration={minutes}m"),
    ])
    .trim()
    .to_owned()
}

/// The current kubeconfig (its current context only, certificates inline), as JSON.
pub fn current_kubeconfig() -> serde_json::Value {
    serde_json::from_str(&kubectl_ok(&[
        "config",
        "view",
        "--minify",
        "--flatten",
        "-o",
        "json",
    ]))
    .expect("kubectl prints its config as JSON")
}

/// `config` in a temporary file, for `--kubeconfig` or `KUBECONFIG`.
pub fn kubeconfig_file(config: &serde_json::Value) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("a temporary file can be made");
    std::fs::write(file.path(), config.to_string()).expect("the kubeconfig is written");
    file
}

/// A kubeconfig for the current cluster that authenticates with `token` alone: the admin's
/// client certificate left in place would authenticate instead.
pub fn token_kubeconfig(token: &str) -> tempfile::NamedTempFile {
    let current = current_kubeconfig();
    kubeconfig_file(&serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "e2e", "cluster": current["clusters"][0]["cluster"] }],
        "users": [{ "name": "token", "user": { "token": token } }],
        "contexts": [{ "name": "e2e", "context": { "cluster": "e2e", "user": "token" } }],
        "current-context": "e2e",
    }))
}

/// `kubectl auth can-i --list` as comparable lines: columns separated by one space, sorted, with
/// the committed file's comments and blank lines dropped.
pub fn permission_lines(table: &str) -> Vec<String> {
    let mut lines: Vec<String> = table
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    lines.sort();
    lines
}

/// Waits until `kubectl auth can-i --list -n namespace` through `kubeconfig` (a token's) equals
/// the committed table `expected_file` (a path from the repository root): RBAC reaches the
/// authorizer's cache shortly after the bindings are created.
pub async fn expect_permissions(
    kubeconfig: &str,
    namespace: &str,
    expected_file: &str,
) -> Result<(), Error> {
    let path = repo(expected_file);
    let expected = permission_lines(
        &std::fs::read_to_string(&path)
            .map_err(|e| Error::Process(format!("failed to read {expected_file}: {e}")))?,
    );
    wait_until(
        &format!("the permissions to equal {expected_file}"),
        Duration::from_secs(30),
        || {
            let expected = &expected;
            async move {
                let table = kubectl_ok(&[
                    "--kubeconfig",
                    kubeconfig,
                    "auth",
                    "can-i",
                    "--list",
                    "-n",
                    namespace,
                ]);
                let actual = permission_lines(&table);
                Ok(if actual == *expected {
                    Probe::Done(())
                } else {
                    Probe::Waiting(format!("\n{}", actual.join("\n")))
                })
            }
        },
    )
    .await
}

/// A kubeconfig holding a ten-minute token of service account `account` in `namespace`, checked
/// to authenticate as that account.
pub fn service_account_kubeconfig(
    namespace: &str,
    account: &str,
) -> Result<tempfile::NamedTempFile, Error> {
    let file = token_kubeconfig(&service_account_token(namespace, account, 10));
    let kubeconfig = file.path().to_str().expect("temporary paths are UTF-8");
    let identity = kubectl_ok(&[
        "--kubeconfig",
        kubeconfig,
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    let expected = format!("system:serviceaccount:{namespace}:{account}");
    if identity != expected {
        return Err(Error::Process(format!(
            "the token authenticates as {identity}, not {expected}"
        )));
    }
    Ok(file)
}
