//! How many ModelWorkers one operator carries, and what it costs: creates N ModelWorkers (one
//! replica each) in a fresh namespace, starts `remotemedia-operator` as a process watching only
//! that namespace, and prints the operator's latency (creation → Deployment, pods ready →
//! `Ready=True`), what it waits for (the API server creating each Service; and the Deployment
//! controller counting the pods, which it no longer waits for), its share once those are there,
//! the time until all N are Ready, its peak RSS and CPU seconds, and the signs of what limited
//! the run.
//!
//! Run by `e2e/bench.sh` (`make bench`), which brings up the local control plane with stated rate
//! settings, builds the operator in release mode beside this program, and tears everything down:
//! `cargo bench -p remotemedia-e2e --bench operator_scale -- [--quick] [--workers N]`
//! (N = 500, `--quick` = 20). Against another cluster, KUBECONFIG names it and kubectl must be on
//! PATH.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{Node, Pod, Service},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, PostParams, WatchEvent, WatchParams},
};
use remotemedia_crds::ModelWorker;
use remotemedia_e2e::{
    Error, Probe, TestNamespace, api, client, install_crd, operator::Component, wait_until,
};
use serde_json::json;

const LABEL_MODEL_WORKER: &str = "remotemedia.io/model-worker";
/// kube's default `--max-pods`; the bench's nodes carry this many pods each.
const PODS_PER_NODE: usize = 110;
/// ModelWorkers created at once: a burst, as a user applying a folder of manifests makes.
const CREATE_CONCURRENCY: usize = 16;
const HISTOGRAM: &str = "remotemedia_operator_reconcile_duration_seconds";

/// When each ModelWorker (by name) was first seen in some state.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

struct Args {
    workers: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut workers = 500;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => workers = 20,
            "--workers" => {
                workers = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("failed to parse --workers: expected a positive integer")?;
            }
            // `cargo bench` passes `--bench` to every bench program.
            "--bench" => {}
            other => return Err(format!("failed to parse arguments: unknown {other:?}")),
        }
    }
    Ok(Args { workers })
}

fn model_worker(name: &str) -> ModelWorker {
    serde_json::from_value(json!({
        "apiVersion": "remotemedia.io/v1alpha1",
        "kind": "ModelWorker",
        "metadata": { "name": name },
        "spec": { "modelId": name, "model": { "uri": "file:///models/model.pt" } },
    }))
    .expect("a ModelWorker built from literals is valid")
}

fn bench_node(name: &str) -> Node {
    let capacity = json!({ "cpu": "64", "memory": "256Gi", "pods": PODS_PER_NODE.to_string() });
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": { "kwok.x-k8s.io/node": "fake" },
            "labels": { "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok",
                        "remotemedia.io/bench": "operator-scale" },
        },
        "status": { "capacity": capacity, "allocatable": capacity },
    }))
    .expect("a node built from literals is valid")
}

fn is_ready(conditions: Option<impl IntoIterator<Item = (String, String)>>) -> bool {
    conditions
        .into_iter()
        .flatten()
        .any(|(type_, status)| type_ == "Ready" && status == "True")
}

fn pod_ready(pod: &Pod) -> bool {
    is_ready(
        pod.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .map(|cs| {
                cs.iter()
                    .map(|c| (c.type_.clone(), c.status.clone()))
                    .collect::<Vec<_>>()
            }),
    )
}

fn worker_ready(worker: &ModelWorker) -> bool {
    is_ready(worker.status.as_ref().map(|s| {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone()))
            .collect::<Vec<_>>()
    }))
}

/// The Deployment controller has counted the pods of the current template (the operator's status
/// waited for this until it read the template from the pods' label).
fn deployment_updated(deployment: &Deployment) -> bool {
    let Some(status) = &deployment.status else {
        return false;
    };
    status.observed_generation >= deployment.metadata.generation
        && status.updated_replicas.unwrap_or(0) >= 1
}

fn owner_label<K: Resource>(object: &K) -> Option<String> {
    object
        .meta()
        .labels
        .as_ref()?
        .get(LABEL_MODEL_WORKER)
        .cloned()
}

/// Watches `api` (re-watching when the server ends a watch) and records, per ModelWorker name
/// `key` returns, the first moment an event shows the object in the state `key` looks for.
async fn record<K, F>(objects: Api<K>, seen: Seen, key: F) -> Result<(), Error>
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    F: Fn(&K) -> Option<String> + Send + 'static,
{
    let mut version = "0".to_owned();
    loop {
        let mut events = objects
            .watch(&WatchParams::default(), &version)
            .await
            .map_err(api("watch"))?
            .boxed();
        while let Some(event) = events.try_next().await.map_err(api("watch"))? {
            let now = Instant::now();
            let object = match event {
                WatchEvent::Added(o) | WatchEvent::Modified(o) => o,
                WatchEvent::Deleted(_) | WatchEvent::Error(_) => continue,
                WatchEvent::Bookmark(b) => {
                    version = b.metadata.resource_version;
                    continue;
                }
            };
            if let Some(v) = object.meta().resource_version.clone() {
                version = v;
            }
            if let Some(name) = key(&object) {
                seen.lock()
                    .expect("no recorder panics holding the lock")
                    .entry(name)
                    .or_insert(now);
            }
        }
    }
}

/// The value at quantile `q` (nearest rank) of `values`, sorted in place.
fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).max(1);
    values.get(rank - 1).copied()
}

fn ms(values: &mut [f64]) -> String {
    match (quantile(values, 0.5), quantile(values, 0.99)) {
        (Some(p50), Some(p99)) => format!("{p50:>9.0} {p99:>9.0}   n={}", values.len()),
        _ => "        -         -   n=0".to_owned(),
    }
}

/// From each ModelWorker's moment in `from` to its moment in `to`, in milliseconds.
fn lags(from: &HashMap<String, Instant>, to: &HashMap<String, Instant>) -> Vec<f64> {
    from.iter()
        .filter_map(|(name, start)| {
            let end = to.get(name)?;
            Some(end.saturating_duration_since(*start).as_secs_f64() * 1e3)
        })
        .collect()
}

/// Per ModelWorker seen in both, the later of its two moments.
fn later(a: &HashMap<String, Instant>, b: &HashMap<String, Instant>) -> HashMap<String, Instant> {
    a.iter()
        .filter_map(|(name, at)| Some((name.clone(), *at.max(b.get(name)?))))
        .collect()
}

fn millis(time: &Time) -> i64 {
    time.0.as_millisecond()
}

/// The reconcile-duration quantile `q` from the operator's histogram: the upper bound of the
/// first bucket holding it (the histogram knows no finer), and the reconcile count.
fn histogram_quantile(metrics: &str, q: f64) -> Option<(f64, f64)> {
    let mut buckets = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line
            .strip_prefix(HISTOGRAM)
            .and_then(|r| r.strip_prefix("_bucket{le=\""))
        else {
            continue;
        };
        let (le, count) = rest.split_once("\"}")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((le, count.trim().parse::<f64>().ok()?));
    }
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(le, _)| (*le, total))
}

/// Peak RSS (MiB) and user + system CPU seconds of process `pid`, from /proc.
fn usage(pid: u32) -> Result<(f64, f64), Error> {
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .map_err(|e| Error::Process(format!("failed to read /proc/{pid}/{file}: {e}")))
    };
    let hwm_kib: f64 = read("status")?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| Error::Process("failed to parse VmHWM".to_owned()))?;
    let stat = read("stat")?;
    // Fields after the command name (which may hold spaces): utime and stime are 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    let (utime, stime) = ticks(11)
        .zip(ticks(12))
        .ok_or_else(|| Error::Process("failed to parse /proc/<pid>/stat".to_owned()))?;
    let clk_tck: f64 = remotemedia_e2e::run("getconf", &["CLK_TCK"], None)
        .stdout
        .trim()
        .parse()
        .unwrap_or(100.0);
    Ok((hwm_kib / 1024.0, (utime + stime) / clk_tck))
}

/// Lines of client-side throttling ("Waited for ... due to client-side throttling") in a log.
fn throttled(log: &std::path::Path) -> String {
    match std::fs::read_to_string(log) {
        Ok(text) => text
            .lines()
            .filter(|l| l.contains("client-side throttling"))
            .count()
            .to_string(),
        Err(_) => "no log".to_owned(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let n = args.workers;
    let client = client().await?;
    install_crd(&client).await?;

    // Pod capacity for every pod on nodes of the bench's own, whatever the cluster has already.
    let nodes_api = Api::<Node>::all(client.clone());
    let node_names: Vec<String> = (0..n.div_ceil(PODS_PER_NODE))
        .map(|i| format!("kwok-bench-{i}"))
        .collect();
    for name in &node_names {
        nodes_api
            .create(&PostParams::default(), &bench_node(name))
            .await
            .map_err(api("create a bench node"))?;
    }
    let result = run(&client, n, &node_names).await;
    for name in &node_names {
        nodes_api
            .delete(name, &DeleteParams::default())
            .await
            .map_err(api("delete a bench node"))?;
    }
    result
}

async fn run(
    client: &Client,
    n: usize,
    node_names: &[String],
) -> Result<(), Box<dyn std::error::Error>> {
    let nodes_api = &Api::<Node>::all(client.clone());
    wait_until(
        "the bench nodes Ready",
        Duration::from_secs(60),
        || async move {
            let nodes = nodes_api
                .list(&ListParams::default().labels("remotemedia.io/bench=operator-scale"))
                .await
                .map_err(api("list the bench nodes"))?;
            let ready = nodes
                .items
                .iter()
                .filter(|node| {
                    is_ready(
                        node.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .map(|cs| {
                                cs.iter()
                                    .map(|c| (c.type_.clone(), c.status.clone()))
                                    .collect::<Vec<_>>()
                            }),
                    )
                })
                .count();
            Ok(if ready == node_names.len() {
                Probe::Done(())
            } else {
                Probe::Waiting(format!("{ready} of {} Ready", node_names.len()))
            })
        },
    )
    .await?;

    let ns = TestNamespace::create(client, "scale").await?;
    let mut operator = Component::start(
        &ns.name,
        &["--leader-election=false", "--watch-namespace", &ns.name],
    )?;
    wait_until(
        "the operator's metrics",
        Duration::from_secs(30),
        || async {
            Ok(match operator.get("/metrics") {
                Some((200, _)) => Probe::Done(()),
                _ => Probe::Waiting("no answer".to_owned()),
            })
        },
    )
    .await?;

    let deployments_seen = Seen::default();
    let deployments_updated = Seen::default();
    let services_seen = Seen::default();
    let pods_ready = Seen::default();
    let workers_ready = Seen::default();
    let recorders = [
        tokio::spawn(record(
            ns.api::<Deployment>(),
            deployments_seen.clone(),
            owner_label,
        )),
        tokio::spawn(record(
            ns.api::<Deployment>(),
            deployments_updated.clone(),
            |d| deployment_updated(d).then(|| owner_label(d)).flatten(),
        )),
        tokio::spawn(record(
            ns.api::<Service>(),
            services_seen.clone(),
            owner_label,
        )),
        tokio::spawn(record(ns.api::<Pod>(), pods_ready.clone(), |p| {
            pod_ready(p).then(|| owner_label(p)).flatten()
        })),
        tokio::spawn(record(
            ns.api::<ModelWorker>(),
            workers_ready.clone(),
            |w| worker_ready(w).then(|| w.name_any()),
        )),
    ];
    // The watches are open before the first object exists, so no first sighting is missed.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let workers = ns.api::<ModelWorker>();
    let start = Instant::now();
    let created: Vec<(String, Instant, f64)> = futures::stream::iter(0..n)
        .map(|i| {
            let workers = workers.clone();
            async move {
                let name = format!("scale-{i:04}");
                let sent = Instant::now();
                workers
                    .create(&PostParams::default(), &model_worker(&name))
                    .await
                    .map_err(api("create a ModelWorker"))?;
                let done = Instant::now();
                Ok::<_, Error>((name, done, (done - sent).as_secs_f64() * 1e3))
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect()
        .await?;
    let burst = start.elapsed();

    let timeout = Duration::from_secs(60 + n as u64);
    wait_until(&format!("all {n} ModelWorkers Ready"), timeout, || async {
        let ready = workers_ready.lock().expect("no recorder panics").len();
        Ok(if ready == n {
            Probe::Done(())
        } else {
            Probe::Waiting(format!("{ready} of {n} Ready"))
        })
    })
    .await?;
    let (rss_mib, cpu_s) = usage(operator.pid())?;
    let metrics = operator
        .get("/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    for recorder in &recorders {
        recorder.abort();
    }

    // Object timestamps: whole seconds, as the API server stores them.
    let listed_workers = workers
        .list(&ListParams::default())
        .await
        .map_err(api("list"))?;
    let listed_deployments = ns
        .api::<Deployment>()
        .list(&ListParams::default())
        .await
        .map_err(api("list"))?;
    let listed_pods = ns
        .api::<Pod>()
        .list(&ListParams::default())
        .await
        .map_err(api("list"))?;
    let deployment_created: HashMap<String, i64> = listed_deployments
        .items
        .iter()
        .filter_map(|d| {
            Some((
                owner_label(d)?,
                millis(d.metadata.creation_timestamp.as_ref()?),
            ))
        })
        .collect();
    let pod_ready_at: HashMap<String, i64> = listed_pods
        .items
        .iter()
        .filter_map(|p| {
            let c = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "Ready")?;
            Some((owner_label(p)?, millis(c.last_transition_time.as_ref()?)))
        })
        .collect();
    let mut ts_create = Vec::new();
    let mut ts_ready = Vec::new();
    for worker in &listed_workers.items {
        let name = worker.name_any();
        if let (Some(created), Some(deployed)) = (
            worker.metadata.creation_timestamp.as_ref(),
            deployment_created.get(&name),
        ) {
            ts_create.push((deployed - millis(created)) as f64);
        }
        let ready_at = worker
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| &c.last_transition_time);
        if let (Some(ready), Some(pods)) = (ready_at, pod_ready_at.get(&name)) {
            ts_ready.push((millis(ready) - pods) as f64);
        }
    }

    let created_at: HashMap<String, Instant> = created
        .iter()
        .map(|(name, at, _)| (name.clone(), *at))
        .collect();
    let mut create_latency: Vec<f64> = created.iter().map(|(_, _, ms)| *ms).collect();
    let deployments_seen = deployments_seen.lock().expect("no recorder panics").clone();
    let pods_ready = pods_ready.lock().expect("no recorder panics").clone();
    let deployments_updated = deployments_updated
        .lock()
        .expect("no recorder panics")
        .clone();
    let services_seen = services_seen.lock().expect("no recorder panics").clone();
    // Ready=True also needs the Service (clients reach the workers through it): the operator's
    // own share starts when both are there.
    let inputs_ready = later(&pods_ready, &services_seen);
    let workers_ready = workers_ready.lock().expect("no recorder panics").clone();
    // The last sighting, not the poll that noticed it.
    let ready_all = workers_ready
        .values()
        .max()
        .map_or(Duration::ZERO, |last| last.saturating_duration_since(start));
    let logs = std::env::var_os("REMOTEMEDIA_E2E_LOGS").map(std::path::PathBuf::from);

    println!(
        "operator at scale: {n} ModelWorkers x 1 replica, {} bench nodes x {PODS_PER_NODE} pods, created {CREATE_CONCURRENCY} at a time",
        node_names.len()
    );
    println!("{:<58} {:>9} {:>9}", "latency (ms)", "p50", "p99");
    println!(
        "{:<58} {}",
        "creation -> Deployment, watched",
        ms(&mut lags(&created_at, &deployments_seen))
    );
    println!(
        "{:<58} {}",
        "pods ready -> Ready=True, watched",
        ms(&mut lags(&pods_ready, &workers_ready))
    );
    println!(
        "{:<58} {}",
        "pods ready -> Deployment controller counts them, watched",
        ms(&mut lags(&pods_ready, &deployments_updated))
    );
    println!(
        "{:<58} {}",
        "later of pods ready, Service created -> Ready=True, watched",
        ms(&mut lags(&inputs_ready, &workers_ready))
    );
    println!(
        "{:<58} {}",
        "creation -> Service, watched (API server: ClusterIP)",
        ms(&mut lags(&created_at, &services_seen))
    );
    println!(
        "{:<58} {}",
        "creation -> Deployment, timestamps (1 s resolution)",
        ms(&mut ts_create)
    );
    println!(
        "{:<58} {}",
        "pods ready -> Ready=True, timestamps (1 s resolution)",
        ms(&mut ts_ready)
    );
    println!(
        "{:<58} {}",
        "creation -> Ready=True, watched",
        ms(&mut lags(&created_at, &workers_ready))
    );
    match (
        histogram_quantile(&metrics, 0.5),
        histogram_quantile(&metrics, 0.99),
    ) {
        (Some((p50, count)), Some((p99, _))) => println!(
            "{:<58} {:>9} {:>9}   n={count} reconciles",
            "one reconcile, operator histogram (bucket upper bound)",
            format!("<={:.0}", p50 * 1e3),
            format!("<={:.0}", p99 * 1e3)
        ),
        _ => println!("one reconcile, operator histogram: not found in /metrics"),
    }
    println!(
        "{:<58} {}",
        "API server: ModelWorker create call (client side)",
        ms(&mut create_latency)
    );
    println!(
        "{:<58} {:>9.2} s",
        format!("creating all {n}"),
        burst.as_secs_f64()
    );
    println!(
        "{:<58} {:>9.2} s",
        format!("first creation -> all {n} Ready=True"),
        ready_all.as_secs_f64()
    );
    println!("{:<58} {:>9.1} MiB", "operator peak RSS (VmHWM)", rss_mib);
    println!(
        "{:<58} {:>9.2} s   ({:.0}% of one core over the run)",
        "operator CPU (user + system)",
        cpu_s,
        100.0 * cpu_s / start.elapsed().as_secs_f64()
    );
    println!(
        "{:<58} {:>9}",
        "client-side throttling lines: operator",
        throttled(&operator.log)
    );
    if let Some(logs) = logs {
        for component in ["kube-controller-manager", "kube-scheduler", "kwok"] {
            println!(
                "{:<58} {:>9}",
                format!("client-side throttling lines: {component}"),
                throttled(&logs.join(format!("{component}.log")))
            );
        }
    }

    let clean_exit = operator.terminate();
    ns.delete().await?;
    if !clean_exit {
        return Err("the operator did not exit cleanly on SIGTERM".into());
    }
    Ok(())
}
