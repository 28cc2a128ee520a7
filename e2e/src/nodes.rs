//! Simulated nodes of a test's own whose pods are real: a kwok node per [`TestNode`], its
//! `spec.podCIDR` a CIDR routed into a network namespace ([`crate::netns`]), so the pod IPs kwok
//! assigns (from that CIDR, `.1` upwards) can be served. [`TestNode::run_worker`] runs a worker
//! pod's container as a `remotemedia-model-worker` process in the node's namespace, bound to the
//! pod's IP, with the pod's own arguments, and then makes the pod Ready: kwok starts these pods
//! unready (`e2e/kwok-test-nodes.yaml`), so no endpoint serves before its process does.
//!
//! The nodes carry a taint, so only pods that [`TestNode::placement`] puts there land on them
//! (not another test's DaemonSet), and a socket directory of their own: the node's
//! `/run/remotemedia`, where its sidecar listens and its workers find the broker.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::{
    Error, Probe, api, kubectl,
    netns::{PodNetwork, cluster_key},
    operator::{Component, binary},
    wait_until,
};

/// Label naming a node's network namespace: set-up deletes nodes whose namespace is gone.
const NETNS_LABEL: &str = "remotemedia.io/e2e-netns";
/// Taint key of the test nodes; its value is the node's name.
const TAINT: &str = "remotemedia.io/e2e-node";
/// The container the operator puts the worker in (operator/src/names.rs).
const WORKER_CONTAINER: &str = "worker";

/// A simulated node with a pod network; deleted with its network when dropped.
pub struct TestNode {
    pub name: String,
    client: Client,
    network: PodNetwork,
    socket_dir: tempfile::TempDir,
}

impl TestNode {
    /// Registers node `<prefix>-<suffix>` with kwok, its pod CIDR routed into a new network
    /// namespace, and waits until it is Ready. Nodes and namespaces that crashed earlier runs
    /// left behind are deleted first. `slot` tells apart the nodes of one test process.
    pub async fn create(client: &Client, name: &str, slot: usize) -> Result<Self, Error> {
        let network = PodNetwork::create(&cluster_key(), slot)?;
        remove_leftover_nodes()?;
        let socket_dir = tempfile::Builder::new()
            .prefix("rme2e-node-")
            .tempdir()
            .map_err(|e| Error::Process(format!("failed to make a socket directory: {e}")))?;
        let node = Self {
            name: name.to_owned(),
            client: client.clone(),
            network,
            socket_dir,
        };
        let cidr = node.network.cidr();
        let object: Node = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                // kwok manages nodes with this annotation (e2e/cluster.sh).
                "annotations": { "kwok.x-k8s.io/node": "fake" },
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    NETNS_LABEL: node.network.namespace(),
                },
            },
            "spec": {
                "podCIDR": cidr,
                "podCIDRs": [cidr],
                "taints": [{ "key": TAINT, "value": name, "effect": "NoSchedule" }],
            },
            "status": {
                "capacity": { "cpu": "8", "memory": "32Gi", "pods": "110" },
                "allocatable": { "cpu": "8", "memory": "32Gi", "pods": "110" },
            },
        }))
        .expect("a node built from literals is valid");
        let nodes = Api::<Node>::all(client.clone());
        nodes
            .create(&PostParams::default(), &object)
            .await
            .map_err(api("register a test node"))?;
        wait_until(
            &format!("node {name} Ready"),
            Duration::from_secs(60),
            || async {
                let node = nodes.get(name).await.map_err(api("get the test node"))?;
                let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
                Ok(
                    if conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                    {
                        Probe::Done(())
                    } else {
                        Probe::Waiting(format!("conditions {conditions:?}"))
                    },
                )
            },
        )
        .await?;
        Ok(node)
    }

    /// The node's pod CIDR (`spec.podCIDR`).
    pub fn cidr(&self) -> String {
        self.network.cidr()
    }

    /// The node's socket directory: its `/run/remotemedia`.
    pub fn socket_dir(&self) -> &Path {
        self.socket_dir.path()
    }

    /// Spec fields (`nodeSelector`, `tolerations`) that put a ModelWorker's pods on this node
    /// and no other: merge them into its `spec`.
    pub fn placement(&self) -> Value {
        json!({
            "nodeSelector": { "kubernetes.io/hostname": self.name },
            "tolerations": [{
                "key": TAINT, "operator": "Equal", "value": self.name, "effect": "NoSchedule",
            }],
        })
    }

    /// Starts this node's sidecar as the chart runs it: `--discovery kubernetes`, `--node-name`
    /// this node, listening in its socket directory, with `KUBECONFIG` `kubeconfig` (a token of
    /// the chart's sidecar service account) and `args` besides; returns once its broker socket
    /// exists, since workers join the broker as they start.
    pub async fn start_sidecar(&self, kubeconfig: &str, args: &[&str]) -> Result<Component, Error> {
        let socket_dir = self
            .socket_dir()
            .to_str()
            .ok_or_else(|| Error::Process("failed to use a socket directory: not UTF-8".into()))?;
        let mut all = vec![
            "--socket-dir",
            socket_dir,
            "--admin-address",
            "127.0.0.1",
            "--discovery",
            "kubernetes",
            "--node-name",
            &self.name,
        ];
        all.extend(args);
        let sidecar =
            Component::start_sidecar_with_env(&self.name, &all, &[("KUBECONFIG", kubeconfig)])?;
        let socket = self.socket_dir().join("broker.sock");
        wait_until(
            &format!("{}", socket.display()),
            Duration::from_secs(60),
            || async {
                Ok(if socket.exists() {
                    Probe::Done(())
                } else {
                    Probe::Waiting(format!("absent; log {}", sidecar.log.display()))
                })
            },
        )
        .await?;
        Ok(sidecar)
    }

    /// Runs the worker container of `pod` (scheduled here, given its IP by kwok) as a
    /// `remotemedia-model-worker` process in this node's network, with the pod's arguments but
    /// for three: `--model-path` is `model` (what the pod's volume or image would hold),
    /// `--broker` is this node's socket directory, and `--listen-address` the pod's IP, so
    /// several pods of a node share the namespace. Once it answers `/readyz`, the pod is set
    /// Ready, as the kubelet's readiness probe would.
    pub async fn run_worker(&self, pod: &Pod, model: &str) -> Result<Component, Error> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        if on != Some(self.name.as_str()) {
            return Err(Error::Process(format!(
                "failed to run pod {name}: it is on node {on:?}, not {}",
                self.name
            )));
        }
        let ip: Ipv4Addr = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .ok_or_else(|| Error::Process(format!("failed to run pod {name}: it has no IP yet")))?
            .parse()
            .map_err(|e| Error::Process(format!("failed to run pod {name}: its IP: {e}")))?;
        self.network.add_address(ip)?;
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == WORKER_CONTAINER))
            .ok_or_else(|| {
                Error::Process(format!("failed to run pod {name}: no `worker` container"))
            })?;
        let args = worker_args(
            container.args.as_deref().unwrap_or_default(),
            model,
            self.socket_dir(),
        )?;
        let admin_port = flag_value(&args, "--admin-port")
            .and_then(|port| port.parse().ok())
            .ok_or_else(|| {
                Error::Process(format!(
                    "failed to run pod {name}: no --admin-port in its args"
                ))
            })?;
        let termination_log = self.socket_dir().join(format!("{name}.termination-log"));
        let mut command = self.network.command(binary("remotemedia-model-worker")?);
        command
            .args(&args)
            .args(["--listen-address", &ip.to_string()])
            .arg("--termination-log")
            .arg(&termination_log);
        let worker = Component::spawn_command(command, "worker", name, (ip, admin_port).into())?;
        wait_until(
            &format!("worker {name} ready at {ip}:{admin_port}"),
            Duration::from_secs(60),
            || async {
                Ok(match worker.get("/readyz") {
                    Some((200, _)) => Probe::Done(()),
                    seen => Probe::Waiting(format!("{seen:?}; log {}", worker.log.display())),
                })
            },
        )
        .await?;
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        set_pod_ready(&self.client, namespace, name, true).await?;
        Ok(worker)
    }
}

/// The `count` running pods of ModelWorker `name` in `namespace`, once kwok gave each an IP.
pub async fn running_pods(
    client: &Client,
    namespace: &str,
    name: &str,
    count: usize,
) -> Result<Vec<Pod>, Error> {
    let pods = &Api::<Pod>::namespaced(client.clone(), namespace);
    let selector = &format!("remotemedia.io/model-worker={name}");
    wait_until(
        &format!("{count} running pods of {name}"),
        Duration::from_secs(60),
        || async move {
            let list = pods
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(api("list the worker pods"))?;
            let running: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|pod| {
                    pod.status.as_ref().is_some_and(|s| {
                        s.phase.as_deref() == Some("Running") && s.pod_ip.is_some()
                    })
                })
                .collect();
            Ok(if running.len() == count {
                Probe::Done(running)
            } else {
                Probe::Waiting(format!("{} running with an IP", running.len()))
            })
        },
    )
    .await
}

/// Sets a pod's Ready condition through the status subresource, as a kubelet whose readiness
/// probe passed (or failed) would.
pub async fn set_pod_ready(
    client: &Client,
    namespace: &str,
    pod: &str,
    ready: bool,
) -> Result<(), Error> {
    let status = if ready { "True" } else { "False" };
    Api::<Pod>::namespaced(client.clone(), namespace)
        .patch_status(
            pod,
            &PatchParams::default(),
            &Patch::Strategic(json!({
                "status": { "conditions": [
                    { "type": "Ready", "status": status },
                    { "type": "ContainersReady", "status": status },
                ] }
            })),
        )
        .await
        .map_err(api("set the pod's Ready condition"))?;
    Ok(())
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // The network goes after this, with any process still in it.
        let out = kubectl(
            &[
                "delete",
                "node",
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ],
            None,
        );
        if !out.success {
            eprintln!("failed to delete node {}: {}", self.name, out.stderr);
        }
    }
}

/// The pod's worker arguments with `--model-path` and `--broker` replaced.
fn worker_args(args: &[String], model: &str, socket_dir: &Path) -> Result<Vec<String>, Error> {
    let socket_dir = socket_dir
        .to_str()
        .ok_or_else(|| Error::Process("failed to use a socket directory: not UTF-8".to_owned()))?;
    let mut out = args.to_vec();
    for (flag, value) in [("--model-path", model), ("--broker", socket_dir)] {
        let at = out
            .iter()
            .position(|arg| arg == flag)
            .filter(|at| at + 1 < out.len())
            .ok_or_else(|| Error::Process(format!("failed to find {flag} in the pod's args")))?;
        out[at + 1] = value.to_owned();
    }
    Ok(out)
}

fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|arg| arg == flag)?;
    args.get(at + 1).map(String::as_str)
}

/// Deletes test nodes whose network namespace no longer exists: a crashed run's.
fn remove_leftover_nodes() -> Result<(), Error> {
    let out = kubectl(
        &[
            "get",
            "nodes",
            "-l",
            NETNS_LABEL,
            "-o",
            &format!(
                "jsonpath={{range .items[*]}}{{.metadata.name}} {{.metadata.labels.{}}}{{\"\\n\"}}{{end}}",
                NETNS_LABEL.replace('.', "\\.")
            ),
        ],
        None,
    );
    if !out.success {
        return Err(Error::Process(format!(
            "failed to list test nodes: {}",
            out.stderr
        )));
    }
    for line in out.stdout.lines() {
        let Some((node, namespace)) = line.split_once(' ') else {
            continue;
        };
        if !Path::new("/run/netns").join(namespace).exists() {
            eprintln!("deleting node {node}, left by an earlier run");
            kubectl(
                &["delete", "node", node, "--ignore-not-found", "--wait=false"],
                None,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_args_keep_the_pods_flags_and_replace_model_and_broker() {
        let args: Vec<String> = [
            "--model-id",
            "near",
            "--model-path",
            "/models/m.pt",
            "--port",
            "50051",
            "--broker",
            "/run/remotemedia",
        ]
        .map(String::from)
        .to_vec();
        let out = worker_args(&args, "builtin://identity", Path::new("/tmp/n")).unwrap();
        assert_eq!(
            out,
            [
                "--model-id",
                "near",
                "--model-path",
                "builtin://identity",
                "--port",
                "50051",
                "--broker",
                "/tmp/n",
            ]
        );
        let error = worker_args(&args[..4], "x", Path::new("/tmp/n")).unwrap_err();
        assert!(error.to_string().contains("--broker"), "{error}");
    }
}
