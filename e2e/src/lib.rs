//! Helpers for the end-to-end tests: clients for the cluster `KUBECONFIG` names (the local control
//! plane of `e2e/cluster.sh`, or any other), a namespace per test, and polling with a deadline.
//!
//! The tests expect the simulated topology of `e2e/nodes.yaml`: two nodes with four
//! `nvidia.com/gpu` each and one CPU-only node.

pub mod chart;
pub mod examples;
pub mod netns;
pub mod nodes;
pub mod operator;
#[path = "../../core/tests/support/ports.rs"]
pub mod ports;
pub mod procfs;

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::core::v1::{Namespace, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, PostParams},
    config::{AuthInfo, InferConfigError},
};

/// A file of the repository, by its path from the root.
pub fn repo(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

/// What one run of a command-line program printed.
pub struct Run {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program` from PATH (`e2e/cluster.sh env` puts kubectl and helm there, against
/// KUBECONFIG's cluster) with `stdin` as its input. A program that cannot start fails the test.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Run {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {program} (is it on PATH?): {e}"));
    let mut input = child.stdin.take().expect("stdin is piped");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap_or_else(|e| panic!("failed to write the input of {program}: {e}"));
    drop(input);
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("failed to wait for {program}: {e}"));
    Run {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// How often [`wait_until`] probes.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Label on every namespace the tests create, so leftovers on a shared cluster can be found.
pub const TEST_LABEL: &str = "remotemedia.io/e2e";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to load the kubeconfig (set KUBECONFIG, or run `e2e/cluster.sh up`)")]
    Config(#[source] InferConfigError),
    #[error("failed to build a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("failed to {action}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Process(String),
    #[error("timed out after {timeout:?} waiting for {what}; last seen: {last}")]
    Timeout {
        what: String,
        timeout: Duration,
        last: String,
    },
}

/// Names what failed, for `map_err` on an API call: `.map_err(api("create the pod"))`.
pub fn api(action: &str) -> impl FnOnce(kube::Error) -> Error + '_ {
    move |source| Error::Api {
        action: action.to_owned(),
        source,
    }
}

/// The HTTP status the API server answered with, when the error is an API refusal.
pub fn status_code(error: &Error) -> Option<u16> {
    match error {
        Error::Api {
            source: kube::Error::Api(status),
            ..
        } => Some(status.code),
        _ => None,
    }
}

/// A client with the kubeconfig's own credentials (cluster admin for the local control plane).
pub async fn client() -> Result<Client, Error> {
    let config = Config::infer().await.map_err(Error::Config)?;
    Client::try_from(config).map_err(Error::Client)
}

/// A client for the same API server that authenticates with `token` alone.
pub async fn client_with_token(token: String) -> Result<Client, Error> {
    let mut config = Config::infer().await.map_err(Error::Config)?;
    // Replace the whole identity: a client certificate left in place would authenticate instead.
    config.auth_info = AuthInfo {
        token: Some(token.into()),
        ..AuthInfo::default()
    };
    Client::try_from(config).map_err(Error::Client)
}

/// What one probe of [`wait_until`] saw.
pub enum Probe<T> {
    Done(T),
    /// Not yet; the text describes the current state for the timeout message.
    Waiting(String),
}

/// Runs `probe` every 200 ms until it returns [`Probe::Done`], an error, or `timeout` passes.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe<T>, Error>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match probe().await? {
            Probe::Done(value) => return Ok(value),
            Probe::Waiting(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits until the API server serves the CRD `name` (its `Established` condition is true).
/// Polled through the API: `kubectl wait --for=condition=Established` fails at once when no
/// condition has been written yet, which happens under load.
pub async fn wait_for_crd_established(client: &Client, name: &str) -> Result<(), Error> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    wait_until(
        &format!("CRD {name} Established"),
        Duration::from_secs(60),
        || async {
            let crd = crds.get(name).await.map_err(api("get the CRD"))?;
            let conditions = crd
                .status
                .and_then(|status| status.conditions)
                .unwrap_or_default();
            let established = conditions
                .iter()
                .any(|condition| condition.type_ == "Established" && condition.status == "True");
            Ok(if established {
                Probe::Done(())
            } else {
                Probe::Waiting(format!("conditions: {conditions:?}"))
            })
        },
    )
    .await
}

/// A namespace of one test. [`TestNamespace::delete`] ends a passing test; a test that fails
/// before it keeps the namespace and prints where the control plane's logs are.
pub struct TestNamespace {
    pub name: String,
    client: Client,
    deleted: bool,
}

impl TestNamespace {
    /// Creates `e2e-<prefix>-<random>` and waits for its default service account, without which
    /// the ServiceAccount admission plugin refuses every pod.
    pub async fn create(client: &Client, prefix: &str) -> Result<Self, Error> {
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {
                "generateName": format!("e2e-{prefix}-"),
                "labels": { TEST_LABEL: "true" },
            }
        }))
        .expect("a namespace built from literals is valid");
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .map_err(api("create a test namespace"))?;
        let name = created
            .metadata
            .name
            .expect("the API server names an object made with generateName");
        let accounts = &Api::<ServiceAccount>::namespaced(client.clone(), &name);
        wait_until(
            &format!("the default service account of {name}"),
            Duration::from_secs(30),
            || async move {
                Ok(
                    match accounts
                        .get_opt("default")
                        .await
                        .map_err(api("get the default service account"))?
                    {
                        Some(_) => Probe::Done(()),
                        None => Probe::Waiting("absent".to_owned()),
                    },
                )
            },
        )
        .await?;
        Ok(Self {
            name,
            client: client.clone(),
            deleted: false,
        })
    }

    /// An API for namespaced objects of this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub async fn delete(mut self) -> Result<(), Error> {
        self.deleted = true;
        Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::background())
            .await
            .map_err(api("delete the test namespace"))?;
        Ok(())
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if !self.deleted {
            let logs = std::env::var("REMOTEMEDIA_E2E_LOGS").unwrap_or_else(|_| {
                "(REMOTEMEDIA_E2E_LOGS unset: not the local control plane)".to_owned()
            });
            eprintln!(
                "test failed: namespace {} kept; control-plane logs: {logs}",
                self.name
            );
        }
    }
}

/// Runs kubectl (from PATH, against KUBECONFIG's cluster) with `stdin` as its input.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Run {
    run("kubectl", args, stdin)
}

/// Runs `program` like [`run`] without input and returns what it printed, failing the test if
/// the program fails.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args, None);
    assert!(out.success, "{program} {args:?} failed: {}", out.stderr);
    out.stdout
}

/// Runs kubectl and returns its output, failing the test if kubectl fails.
pub fn kubectl_ok(args: &[&str]) -> String {
    run_ok("kubectl", args)
}

/// Installs the committed CRD as users do and waits until the API server serves it. Every test
/// calls it: tests run in any order, and a repeated server-side apply changes nothing.
pub async fn install_crd(client: &Client) -> Result<(), Error> {
    kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        &repo("crds/modelworker.yaml"),
    ]);
    wait_for_crd_established(client, "modelworkers.remotemedia.io").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_until_returns_the_value_once_the_probe_is_done() {
        let mut calls = 0;
        let value = wait_until("the third probe", Duration::from_secs(5), || {
            calls += 1;
            let attempt = calls;
            async move {
                Ok(if attempt == 3 {
                    Probe::Done(attempt)
                } else {
                    Probe::Waiting(format!("attempt {attempt}"))
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(value, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_times_out_naming_what_it_saw_last() {
        let error = wait_until("nothing", Duration::from_secs(1), || async {
            Ok::<Probe<()>, Error>(Probe::Waiting("still pending".to_owned()))
        })
        .await
        .unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("timed out after 1s waiting for nothing"),
            "{message}"
        );
        assert!(message.ends_with("last seen: still pending"), "{message}");
    }
}
