//! The Helm chart (`charts/remotemedia`): what it renders for the values that matter, the values
//! schema refusing bad values, the API server validating what it renders, and a release's life on
//! the cluster — install (kwok runs the operator and the DaemonSet), upgrade, uninstall keeping
//! the CRD, reinstall adopting it. The operator's and the sidecar's service accounts hold exactly
//! the committed permissions, read through a token of each account.
//!
//! Tests that install with `crds.enabled=true` share the one cluster-scoped CRD, so only one test
//! does; the others install with `crds.enabled=false`. Each release is named after its test's
//! namespace, so cluster-scoped RBAC objects never collide.

use std::time::Duration;

use k8s_openapi::{
    api::apps::v1::{DaemonSet, Deployment},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::Api;
use remotemedia_e2e::chart::{
    allow_host_path, chart, expect_permissions, helm_ok, install_without_crd, service_account,
    service_account_kubeconfig,
};
use remotemedia_e2e::{
    Error, Probe, TestNamespace, api, client, kubectl_ok, repo, run, wait_for_crd_established,
    wait_until,
};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(90);
const CRD: &str = "modelworkers.remotemedia.io";
/// The simulated nodes of `e2e/nodes.yaml`: the DaemonSet runs one sidecar on each.
const NODES: i32 = 3;

/// `helm template` as release `rm` in namespace `remotemedia` with `--set` values: the rendered
/// manifest text, or helm's error output.
fn template(namespace: &str, sets: &[&str]) -> Result<String, String> {
    let chart = chart();
    let mut args = vec!["template", "rm", &chart, "--namespace", namespace];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = run("helm", &args, None);
    if out.success {
        Ok(out.stdout)
    } else {
        Err(out.stderr)
    }
}

/// The objects the chart renders with `sets`.
fn render(sets: &[&str]) -> Vec<Value> {
    let text = template("remotemedia", sets)
        .unwrap_or_else(|e| panic!("helm template {sets:?} failed: {e}"));
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("helm template {sets:?} printed invalid YAML: {e}"))
        .into_iter()
        .filter(|o| !o.is_null())
        .collect()
}

/// The error `helm template` prints for `sets`; the test fails if it renders.
fn render_error(sets: &[&str]) -> String {
    match template("remotemedia", sets) {
        Ok(_) => panic!("helm template {sets:?} rendered, but must refuse"),
        Err(e) => e,
    }
}

/// `Kind/name` of every object, sorted.
fn inventory(objects: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = objects
        .iter()
        .map(|o| format!("{}/{}", str_of(&o["kind"]), str_of(&o["metadata"]["name"])))
        .collect();
    names.sort();
    names
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// The one object of `kind` named `name`.
fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "{kind}/{name} in {:?}", inventory(objects));
    found[0]
}

fn sidecar_daemonset(objects: &[Value]) -> &Value {
    object(objects, "DaemonSet", "rm-remotemedia-sidecar")
}

fn operator_deployment(objects: &[Value]) -> &Value {
    object(objects, "Deployment", "rm-remotemedia-operator")
}

/// The container `name` of a workload's pod template (`initContainers` too).
fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    let spec = &workload["spec"]["template"]["spec"];
    spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {spec}"))
}

/// The env entry `name` of a container (its `value` or `valueFrom`).
fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    env(container, name)?["value"].as_str()
}

#[test]
fn chart_passes_helm_lint_strict_with_defaults_and_with_every_option_on() {
    let chart = chart();
    helm_ok(&["lint", "--strict", &chart]);
    helm_ok(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "sidecar.tcp.enabled=true,sidecar.allowNamedShm=true,sidecar.hostNetwork=true",
        "--set",
        "monitoring.podMonitors.enabled=true,operator.watchNamespace=models,crds.enabled=false",
    ]);
}

#[test]
fn defaults_render_the_crd_operator_sidecar_rbac_and_network_policy() {
    let objects = render(&[]);
    assert_eq!(
        inventory(&objects),
        [
            "ClusterRole/rm-remotemedia-operator",
            "ClusterRole/rm-remotemedia-sidecar",
            "ClusterRoleBinding/rm-remotemedia-operator",
            "ClusterRoleBinding/rm-remotemedia-sidecar",
            "CustomResourceDefinition/modelworkers.remotemedia.io",
            "DaemonSet/rm-remotemedia-sidecar",
            "Deployment/rm-remotemedia-operator",
            "NetworkPolicy/rm-remotemedia-workers",
            "PodDisruptionBudget/rm-remotemedia-operator",
            "Role/rm-remotemedia-operator-leader-election",
            "RoleBinding/rm-remotemedia-operator-leader-election",
            "ServiceAccount/rm-remotemedia-operator",
            "ServiceAccount/rm-remotemedia-sidecar",
        ]
    );
    // Every namespaced object lands in the release namespace.
    for o in &objects {
        let namespaced = !matches!(
            str_of(&o["kind"]),
            "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
        );
        if namespaced {
            assert_eq!(o["metadata"]["namespace"], "remotemedia", "{o}");
        }
    }
}

#[test]
fn the_crd_is_the_committed_one_kept_on_uninstall_and_absent_when_disabled() {
    let objects = render(&[]);
    let crd = object(&objects, "CustomResourceDefinition", CRD);
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let committed: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo("crds/modelworker.yaml")).expect("crds/ is readable"),
    )
    .expect("the committed CRD is YAML");
    // Not assert_eq: the two objects print as hundreds of lines.
    assert!(
        crd["spec"] == committed["spec"],
        "the chart's CRD differs from crds/modelworker.yaml: run `make crds`"
    );

    let without = render(&["crds.enabled=false"]);
    assert!(
        !without
            .iter()
            .any(|o| o["kind"] == "CustomResourceDefinition"),
        "{:?}",
        inventory(&without)
    );
    assert_eq!(without.len(), objects.len() - 1);
}

#[test]
fn the_sidecar_is_guaranteed_critical_and_fed_by_the_downward_api() {
    let objects = render(&[]);
    let ds = sidecar_daemonset(&objects);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({ "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 1, "maxSurge": 0 } })
    );
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "nvidia.com/gpu" && t["operator"] == "Exists"),
        "{pod}"
    );
    assert_eq!(
        pod["volumes"],
        json!([{ "name": "socket-dir", "hostPath": { "path": "/run/remotemedia", "type": "DirectoryOrCreate" } }])
    );
    // Guaranteed QoS needs requests == limits in every container, the init container included.
    for name in ["sidecar", "socket-dir"] {
        let resources = &container(ds, name)["resources"];
        assert_eq!(resources["requests"], resources["limits"], "{name}");
        assert_eq!(
            resources["limits"],
            json!({ "cpu": "500m", "memory": "2Gi" })
        );
    }
    let sidecar = container(ds, "sidecar");
    assert_eq!(
        env(sidecar, "REMOTEMEDIA_SIDECAR_NODE_NAME").unwrap()["valueFrom"],
        json!({ "fieldRef": { "fieldPath": "spec.nodeName" } })
    );
    assert_eq!(
        env(sidecar, "REMOTEMEDIA_SIDECAR_MEMORY_LIMIT_BYTES").unwrap()["valueFrom"],
        json!({ "resourceFieldRef": { "containerName": "sidecar", "resource": "limits.memory" } })
    );
    assert_eq!(
        env_value(sidecar, "REMOTEMEDIA_SIDECAR_DISCOVERY"),
        Some("kubernetes")
    );
    assert_eq!(
        env_value(sidecar, "REMOTEMEDIA_SIDECAR_MAX_SHM_BYTES"),
        Some("1073741824")
    );
    assert_eq!(
        env_value(sidecar, "REMOTEMEDIA_SIDECAR_SOCKET_DIR"),
        Some("/run/remotemedia")
    );
    let security = &sidecar["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 65532);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    // The one root step hands the socket directory to that user, with CAP_CHOWN only.
    let init = container(ds, "socket-dir");
    assert_eq!(
        init["command"],
        json!(["chown", "65532:65532", "/run/remotemedia"])
    );
    assert_eq!(
        init["securityContext"]["capabilities"],
        json!({ "drop": ["ALL"], "add": ["CHOWN"] })
    );
}

#[test]
fn the_tcp_listener_and_named_shared_memory_are_off_unless_enabled() {
    let defaults = render(&[]);
    let sidecar = container(sidecar_daemonset(&defaults), "sidecar");
    assert_eq!(env(sidecar, "REMOTEMEDIA_SIDECAR_PORT"), None);
    assert_eq!(
        env_value(sidecar, "REMOTEMEDIA_SIDECAR_ALLOW_NAMED_SHM"),
        Some("false")
    );
    assert_eq!(
        sidecar["ports"],
        json!([{ "name": "admin", "containerPort": 9091, "protocol": "TCP" }])
    );
    let pod = &sidecar_daemonset(&defaults)["spec"]["template"]["spec"];
    assert!(
        pod.get("hostIPC").is_none() && pod.get("hostNetwork").is_none(),
        "{pod}"
    );

    let enabled = render(&[
        "sidecar.tcp.enabled=true",
        "sidecar.tcp.listenAddress=0.0.0.0",
        "sidecar.allowNamedShm=true",
    ]);
    let ds = sidecar_daemonset(&enabled);
    let sidecar = container(ds, "sidecar");
    assert_eq!(
        env_value(sidecar, "REMOTEMEDIA_SIDECAR_PORT"),
        Some("50061")
    );
    assert_eq!(
        env_value(sidecar, "REMOTEMEDIA_SIDECAR_LISTEN_ADDRESS"),
        Some("0.0.0.0")
    );
    assert!(
        sidecar["ports"]
            .as_array()
            .unwrap()
            .contains(&json!({ "name": "grpc", "containerPort": 50061, "protocol": "TCP" })),
        "{sidecar}"
    );
    assert_eq!(
        env_value(sidecar, "REMOTEMEDIA_SIDECAR_ALLOW_NAMED_SHM"),
        Some("true")
    );
    // Named regions live in the node's /dev/shm, which the sidecar then shares.
    assert_eq!(ds["spec"]["template"]["spec"]["hostIPC"], true);
}

#[test]
fn the_operator_runs_two_restricted_replicas_with_leader_election_and_a_pdb() {
    let objects = render(&["image.tag=1.2.3"]);
    let deployment = operator_deployment(&objects);
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "rm-remotemedia-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let operator = container(deployment, "operator");
    assert_eq!(operator["image"], "remotemedia/remotemedia-operator:1.2.3");
    assert_eq!(
        operator["securityContext"],
        json!({ "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } })
    );
    assert_eq!(operator["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(operator["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(operator["ports"][0]["containerPort"], 8080);
    assert!(
        operator["resources"]["limits"]["memory"].is_string(),
        "{operator}"
    );
    for (name, value) in [
        ("REMOTEMEDIA_OPERATOR_ADMIN_PORT", "8080"),
        ("REMOTEMEDIA_OPERATOR_LEADER_ELECTION", "true"),
        ("REMOTEMEDIA_OPERATOR_LEASE_NAME", "remotemedia-operator"),
        (
            "REMOTEMEDIA_OPERATOR_WORKER_IMAGE",
            "remotemedia/remotemedia-model-worker:1.2.3",
        ),
        (
            "REMOTEMEDIA_OPERATOR_WORKER_CUDA_IMAGE",
            "remotemedia/remotemedia-model-worker-cuda:1.2.3",
        ),
        ("REMOTEMEDIA_OPERATOR_SOCKET_DIR", "/run/remotemedia"),
    ] {
        assert_eq!(env_value(operator, name), Some(value), "{name}");
    }
    assert_eq!(
        env(operator, "REMOTEMEDIA_OPERATOR_LEASE_NAMESPACE").unwrap()["valueFrom"],
        json!({ "fieldRef": { "fieldPath": "metadata.namespace" } })
    );
    assert_eq!(env(operator, "REMOTEMEDIA_OPERATOR_WATCH_NAMESPACE"), None);
    let pdb = object(&objects, "PodDisruptionBudget", "rm-remotemedia-operator");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    // One replica needs no PodDisruptionBudget (it would block every node drain).
    let single = render(&["operator.replicas=1"]);
    assert!(!single.iter().any(|o| o["kind"] == "PodDisruptionBudget"));
}

#[test]
fn a_watch_namespace_scopes_the_operators_rbac_to_roles_there() {
    let objects = render(&["operator.watchNamespace=models"]);
    let role = object(&objects, "Role", "rm-remotemedia-operator");
    assert_eq!(role["metadata"]["namespace"], "models");
    let binding = object(&objects, "RoleBinding", "rm-remotemedia-operator");
    assert_eq!(binding["metadata"]["namespace"], "models");
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": "rm-remotemedia-operator", "namespace": "remotemedia" }])
    );
    assert!(
        !objects
            .iter()
            .any(|o| o["kind"] == "ClusterRole"
                && o["metadata"]["name"] == "rm-remotemedia-operator"),
        "{:?}",
        inventory(&objects)
    );
    assert_eq!(
        env_value(
            container(operator_deployment(&objects), "operator"),
            "REMOTEMEDIA_OPERATOR_WATCH_NAMESPACE"
        ),
        Some("models")
    );
}

#[test]
fn the_network_policy_admits_only_sidecars_and_the_operator_in_each_listed_namespace() {
    let objects = render(&["networkPolicy.namespaces={models,batch}"]);
    let policies: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .collect();
    let namespaces: Vec<&str> = policies
        .iter()
        .map(|p| str_of(&p["metadata"]["namespace"]))
        .collect();
    assert_eq!(namespaces, ["models", "batch"]);
    for policy in policies {
        assert_eq!(
            policy["spec"]["podSelector"],
            json!({ "matchLabels": { "app.kubernetes.io/name": "remotemedia-model-worker" } })
        );
        let peer = |component: &str| {
            json!({
                "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "remotemedia" } },
                "podSelector": { "matchLabels": {
                    "app.kubernetes.io/name": format!("remotemedia-{component}"),
                    "app.kubernetes.io/instance": "rm",
                } },
            })
        };
        assert_eq!(
            policy["spec"]["ingress"],
            json!([{ "from": [peer("sidecar"), peer("operator")] }])
        );
    }
    // The peers select the pods the chart makes.
    let ds_labels = &sidecar_daemonset(&objects)["spec"]["template"]["metadata"]["labels"];
    assert_eq!(ds_labels["app.kubernetes.io/name"], "remotemedia-sidecar");
    assert_eq!(ds_labels["app.kubernetes.io/instance"], "rm");

    let off = render(&["networkPolicy.enabled=false"]);
    assert!(!off.iter().any(|o| o["kind"] == "NetworkPolicy"));
}

#[test]
fn pod_monitors_cover_operator_sidecars_and_workers_only_when_enabled() {
    assert!(!render(&[]).iter().any(|o| o["kind"] == "PodMonitor"));
    let objects = render(&[
        "monitoring.podMonitors.enabled=true",
        "monitoring.podMonitors.labels.release=prometheus",
    ]);
    let monitors: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "PodMonitor")
        .collect();
    assert_eq!(monitors.len(), 3, "{:?}", inventory(&objects));
    for monitor in &monitors {
        assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
        assert_eq!(
            monitor["spec"]["podMetricsEndpoints"][0]["path"],
            "/metrics"
        );
    }
    let sidecar = object(&objects, "PodMonitor", "rm-remotemedia-sidecar");
    assert_eq!(
        sidecar["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "remotemedia-sidecar"
    );
    let workers = object(&objects, "PodMonitor", "rm-remotemedia-workers");
    assert_eq!(workers["spec"]["namespaceSelector"], json!({ "any": true }));
    assert_eq!(workers["spec"]["podMetricsEndpoints"][0]["port"], "admin");
}

#[test]
fn the_values_schema_refuses_bad_values_naming_the_field() {
    for (sets, words) in [
        (
            "sidecar.resources.memory=lots",
            "at '/sidecar/resources/memory': 'lots' does not match pattern",
        ),
        (
            "operator.leaderElection.enabled=false",
            "at '/operator/replicas': maximum: got 2, want 1",
        ),
        (
            "sidecar.tcp.port=70000",
            "at '/sidecar/tcp/port': maximum: got 70,000, want 65,535",
        ),
        (
            "sidecar.maxShmBytes=0",
            "at '/sidecar/maxShmBytes': minimum: got 0, want 1",
        ),
        ("sidecar.typo=1", "additional properties 'typo' not allowed"),
        (
            "image.pullPolicy=Sometimes",
            "at '/image/pullPolicy': value must be one of",
        ),
    ] {
        let error = render_error(&[sets]);
        assert!(error.contains(words), "--set {sets}: {error}");
    }
}

#[test]
fn a_shared_memory_budget_over_the_sidecar_memory_limit_is_refused_at_render() {
    let error = render_error(&["sidecar.maxShmBytes=2000000000"]);
    assert!(
        error.contains(
            "failed to fit sidecar.maxShmBytes (2000000000) plus sidecar.memoryHeadroomBytes \
             (268435456) under sidecar.resources.memory (2Gi = 2147483648 bytes)"
        ),
        "{error}"
    );
    // Exactly the limit minus the headroom fits, as the sidecar's own check allows.
    render(&["sidecar.maxShmBytes=1879048192"]);
    let error = render_error(&[
        "sidecar.resources.memory=3G",
        "sidecar.maxShmBytes=2800000000",
    ]);
    assert!(error.contains("(3G = 3000000000 bytes)"), "{error}");
}

#[tokio::test]
async fn rendered_manifests_pass_the_api_servers_validation() -> Result<(), Error> {
    let client = client().await?;
    let ns = TestNamespace::create(&client, "chart-dry-run").await?;
    allow_host_path(&ns.name);
    let scoped = format!("operator.watchNamespace={}", ns.name);
    for sets in [
        vec![],
        vec![
            "sidecar.tcp.enabled=true",
            "sidecar.allowNamedShm=true",
            "sidecar.hostNetwork=true",
            "operator.replicas=1",
            &scoped,
        ],
    ] {
        let manifest = template(&ns.name, &sets)
            .map_err(|e| panic!("{sets:?}: {e}"))
            .unwrap();
        let documents = manifest.matches("\nkind: ").count();
        let out = run(
            "kubectl",
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&manifest),
        );
        assert!(out.success, "{sets:?}: {}", out.stderr);
        assert_eq!(
            out.stdout.matches("(server dry run)").count(),
            documents,
            "{sets:?}: {}",
            out.stdout
        );
    }
    ns.delete().await
}

/// Polls until the release's operator Deployment has `replicas` available and its DaemonSet a
/// ready, up-to-date sidecar on every node; returns both objects.
async fn wait_for_release(
    ns: &TestNamespace,
    release: &str,
) -> Result<(Deployment, DaemonSet), Error> {
    let deployments = &ns.api::<Deployment>();
    let daemonsets = &ns.api::<DaemonSet>();
    let operator = &format!("{release}-remotemedia-operator");
    let sidecar = &format!("{release}-remotemedia-sidecar");
    wait_until(
        "the operator's pods available and a sidecar ready on every node",
        SETTLE,
        || async move {
            let (Some(deployment), Some(daemonset)) = (
                deployments
                    .get_opt(operator)
                    .await
                    .map_err(api("get the operator Deployment"))?,
                daemonsets
                    .get_opt(sidecar)
                    .await
                    .map_err(api("get the sidecar DaemonSet"))?,
            ) else {
                return Ok(Probe::Waiting("not created yet".to_owned()));
            };
            let ds = daemonset.status.clone().unwrap_or_default();
            let available = deployment
                .status
                .as_ref()
                .and_then(|s| s.available_replicas)
                .unwrap_or(0);
            let settled = available == 2
                && ds.observed_generation == daemonset.metadata.generation
                && ds.desired_number_scheduled == NODES
                && ds.number_ready == NODES
                && ds.updated_number_scheduled == Some(NODES);
            Ok(if settled {
                Probe::Done((deployment, daemonset))
            } else {
                Probe::Waiting(format!(
                    "operator available {available}; sidecar desired {} ready {} updated {:?}",
                    ds.desired_number_scheduled, ds.number_ready, ds.updated_number_scheduled
                ))
            })
        },
    )
    .await
}

#[tokio::test]
async fn install_upgrade_uninstall_keep_the_crd_and_a_reinstall_adopts_it() -> Result<(), Error> {
    let client = client().await?;
    let ns = TestNamespace::create(&client, "chart-life").await?;
    allow_host_path(&ns.name);
    let release = ns.name.clone();
    let chart = chart();
    // Another test may have applied crds/ already, as a user might have: take it over.
    helm_ok(&[
        "install",
        &release,
        &chart,
        "-n",
        &ns.name,
        "--take-ownership",
    ]);
    wait_for_crd_established(&client, CRD).await?;
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let installed = crds.get(CRD).await.map_err(api("get the CRD"))?;
    let annotations = installed.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("meta.helm.sh/release-name"), Some(&release));

    let (deployment, daemonset) = wait_for_release(&ns, &release).await?;
    let pod_spec = |ds: &DaemonSet| serde_json::to_value(&ds.spec.template.spec).unwrap();
    assert_eq!(
        env_value(
            &pod_spec(&daemonset)["containers"][0],
            "REMOTEMEDIA_SIDECAR_MAX_SHM_BYTES"
        ),
        Some("1073741824")
    );

    // A sidecar value rolls the sidecars and leaves the operator alone.
    helm_ok(&[
        "upgrade",
        &release,
        &chart,
        "-n",
        &ns.name,
        "--set",
        "sidecar.maxShmBytes=536870912",
    ]);
    let (upgraded_deployment, upgraded) = wait_for_release(&ns, &release).await?;
    assert_eq!(
        upgraded.metadata.generation,
        daemonset.metadata.generation.map(|g| g + 1)
    );
    assert_eq!(
        env_value(
            &pod_spec(&upgraded)["containers"][0],
            "REMOTEMEDIA_SIDECAR_MAX_SHM_BYTES"
        ),
        Some("536870912")
    );
    assert_eq!(
        upgraded_deployment.metadata.generation,
        deployment.metadata.generation
    );
    let pods = kubectl_ok(&[
        "get",
        "pods",
        "-n",
        &ns.name,
        "-l",
        "app.kubernetes.io/name=remotemedia-sidecar",
        "-o",
        "jsonpath={range .items[*]}{.spec.containers[0].env[?(@.name==\"REMOTEMEDIA_SIDECAR_MAX_SHM_BYTES\")].value}{\"\\n\"}{end}",
    ]);
    assert_eq!(
        pods.lines().collect::<Vec<_>>(),
        ["536870912"; NODES as usize],
        "every sidecar pod runs the new template"
    );

    // Uninstall removes the release and keeps the CRD (with every ModelWorker in it).
    let out = helm_ok(&["uninstall", &release, "-n", &ns.name]);
    assert!(out.contains("kept due to the resource policy"), "{out}");
    let deployments = &ns.api::<Deployment>();
    let daemonsets = &ns.api::<DaemonSet>();
    let operator = &format!("{release}-remotemedia-operator");
    let sidecar = &format!("{release}-remotemedia-sidecar");
    wait_until("the release's workloads gone", SETTLE, || async move {
        let left = (
            deployments
                .get_opt(operator)
                .await
                .map_err(api("get the Deployment"))?
                .is_some(),
            daemonsets
                .get_opt(sidecar)
                .await
                .map_err(api("get the DaemonSet"))?
                .is_some(),
        );
        Ok(if left == (false, false) {
            Probe::Done(())
        } else {
            Probe::Waiting(format!("deployment, daemonset present: {left:?}"))
        })
    })
    .await?;
    let kept = crds.get(CRD).await.map_err(api("get the kept CRD"))?;
    assert_eq!(kept.metadata.uid, installed.metadata.uid);
    assert!(kept.metadata.deletion_timestamp.is_none());

    // A second install adopts the kept CRD without being told to.
    helm_ok(&["install", &release, &chart, "-n", &ns.name]);
    let adopted = crds.get(CRD).await.map_err(api("get the adopted CRD"))?;
    assert_eq!(adopted.metadata.uid, installed.metadata.uid);
    wait_for_release(&ns, &release).await?;
    helm_ok(&["uninstall", &release, "-n", &ns.name]);
    ns.delete().await
}

/// Installs the chart (default values) and compares `kubectl auth can-i --list` in its namespace,
/// read through a token of `component`'s service account, with `e2e/expected/<component>-can-i.txt`.
async fn permissions_are_the_committed_ones(component: &str) -> Result<(), Error> {
    let client = client().await?;
    let ns = TestNamespace::create(&client, &format!("chart-rbac-{component}")).await?;
    install_without_crd(&ns.name, &[]);
    let file = service_account_kubeconfig(&ns.name, &service_account(&ns.name, component))?;
    let kubeconfig = file.path().to_str().expect("temporary paths are UTF-8");
    let expected = format!("e2e/expected/{component}-can-i.txt");
    expect_permissions(kubeconfig, &ns.name, &expected).await?;
    helm_ok(&["uninstall", &ns.name, "-n", &ns.name]);
    ns.delete().await
}

#[tokio::test]
async fn the_operator_service_account_holds_exactly_the_committed_permissions() -> Result<(), Error>
{
    permissions_are_the_committed_ones("operator").await
}

#[tokio::test]
async fn the_sidecar_service_account_holds_exactly_the_committed_permissions() -> Result<(), Error>
{
    permissions_are_the_committed_ones("sidecar").await
}

#[test]
fn the_default_images_are_the_ones_make_images_builds() {
    let plan = run("make", &["-s", "-n", "-C", &repo(""), "images"], None);
    assert!(plan.success, "make -n images failed: {}", plan.stderr);
    let mut built: Vec<&str> = plan
        .stdout
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|pair| pair[0] == "-t")
        .map(|pair| pair[1])
        .collect();
    built.sort();
    let objects = render(&[]);
    let operator = container(operator_deployment(&objects), "operator");
    let mut named = vec![
        str_of(&operator["image"]),
        str_of(&container(sidecar_daemonset(&objects), "sidecar")["image"]),
        env_value(operator, "REMOTEMEDIA_OPERATOR_WORKER_IMAGE").unwrap(),
        env_value(operator, "REMOTEMEDIA_OPERATOR_WORKER_CUDA_IMAGE").unwrap(),
    ];
    named.sort();
    assert_eq!(built, named);
}

#[test]
fn the_sidecar_may_only_watch_endpoints_and_model_workers_and_scale_them() {
    let objects = render(&[]);
    let role = object(&objects, "ClusterRole", "rm-remotemedia-sidecar");
    assert_eq!(
        role["rules"],
        json!([
            { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"] },
            { "apiGroups": ["remotemedia.io"], "resources": ["modelworkers"], "verbs": ["list", "watch"] },
            { "apiGroups": ["remotemedia.io"], "resources": ["modelworkers/scale"], "verbs": ["patch"] },
        ])
    );
    let binding = object(&objects, "ClusterRoleBinding", "rm-remotemedia-sidecar");
    assert_eq!(
        binding["subjects"],
        json!([{ "kind": "ServiceAccount", "name": "rm-remotemedia-sidecar", "namespace": "remotemedia" }])
    );
    assert_eq!(
        sidecar_daemonset(&objects)["spec"]["template"]["spec"]["serviceAccountName"],
        "rm-remotemedia-sidecar"
    );
}
