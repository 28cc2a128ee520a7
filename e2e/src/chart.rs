//! The Helm chart as tests use it: installed into a test namespace, and its service accounts'
//! tokens, so a test runs a component with exactly the permissions the chart grants it.

use std::path::Path;

use crate::{Error, kubectl_ok, repo, run_ok};

/// The chart's folder.
pub fn chart() -> String {
    repo("charts/remotemedia")
}

/// Runs helm and returns what it printed, failing the test if helm fails.
pub fn helm_ok(args: &[&str]) -> String {
    run_ok("helm", args)
}

/// Marks a namespace for the `privileged` Pod Security profile, as the README tells users to:
/// the sidecar mounts the node's socket directory by hostPath.
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

/// Writes to `path` a kubeconfig for the cluster `KUBECONFIG` names (its current context's) that
/// authenticates with `token` alone: the admin's client certificate left in place would
/// authenticate instead.
pub fn token_kubeconfig(token: &str, path: &Path) -> Result<(), Error> {
    let admin = kube::config::Kubeconfig::read()
        .map_err(|e| Error::Process(format!("failed to read KUBECONFIG: {e}")))?;
    let cluster_name = admin
        .contexts
        .iter()
        .find(|named| Some(&named.name) == admin.current_context.as_ref())
        .and_then(|named| named.context.as_ref())
        .map(|context| context.cluster.clone());
    let cluster = admin
        .clusters
        .iter()
        .find(|named| Some(&named.name) == cluster_name.as_ref())
        .or(admin.clusters.first())
        .and_then(|named| named.cluster.clone())
        .ok_or_else(|| Error::Process("failed to find a cluster in KUBECONFIG".to_owned()))?;
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "e2e", "cluster": cluster }],
        "users": [{ "name": "token", "user": { "token": token } }],
        "contexts": [{ "name": "e2e", "context": { "cluster": "e2e", "user": "token" } }],
        "current-context": "e2e",
    });
    std::fs::write(path, config.to_string())
        .map_err(|e| Error::Process(format!("failed to write {}: {e}", path.display())))
}

/// Writes to `path` a kubeconfig holding a ten-minute token of service account `account` in
/// `namespace`, and checks that the API server takes it for that account.
pub fn service_account_kubeconfig(
    namespace: &str,
    account: &str,
    path: &Path,
) -> Result<(), Error> {
    let token = kubectl_ok(&[
        "create",
        "token",
        account,
        "-n",
        namespace,
        "--duration=10m",
    ]);
    token_kubeconfig(token.trim(), path)?;
    let kubeconfig = path.to_str().expect("temporary paths are UTF-8");
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
    Ok(())
}
