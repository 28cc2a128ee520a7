//! `--discovery kubernetes`: the EndpointSlices of ModelWorker Services and the ModelWorker
//! objects, watched through the API server with the sidecar's service account.
//!
//! The operator names a ModelWorker's Service after the ModelWorker and labels it with
//! `remotemedia.io/model-id`; the EndpointSlice controller copies that label onto the Service's
//! slices and names the Service in `kubernetes.io/service-name`. A slice becomes endpoints of the
//! model `namespace/modelId` of the ModelWorker it names; a slice naming no ModelWorker (yet) is
//! left out. Only endpoints that are serving and not terminating are listed: the others get no new
//! requests, and the router's calls already sent to them finish on the connections they hold.
//!
//! The same ModelWorker watch gives each ModelWorker's replicas and `scaleFromZero` to the
//! router's scale from zero ([`crate::router::scale`]).

use std::collections::HashMap;
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use remotemedia_crds::ModelWorker;
use tokio::sync::watch;

use super::{Discovery, EndpointSpec, Endpoints, error_chain};
use crate::router::scale::{Scales, Target, WorkerScale};

/// The label the operator puts on a ModelWorker's Service (and the controller on its slices).
pub const LABEL_MODEL_ID: &str = "remotemedia.io/model-id";
/// The label naming an EndpointSlice's Service.
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The worker's gRPC port name on the Service, hence on its slices.
const GRPC_PORT_NAME: &str = "grpc";

/// Watches every namespace the client's credentials may list.
pub struct Kubernetes {
    client: kube::Client,
    scales: watch::Sender<Arc<Vec<WorkerScale>>>,
}

impl Kubernetes {
    /// Discovery through `client`, and the ModelWorkers' scales it keeps current once watching.
    pub fn new(client: kube::Client) -> (Self, Scales) {
        let (scales, receiver) = watch::channel(Arc::new(Vec::new()));
        (Self { client, scales }, receiver)
    }
}

impl Discovery for Kubernetes {
    fn watch(self: Box<Self>) -> Endpoints {
        let (sender, receiver) = watch::channel(Arc::new(Vec::new()));
        let (workers, workers_writer) = reflector::store::<ModelWorker>();
        let (slices, slices_writer) = reflector::store::<EndpointSlice>();
        let worker_events = reflector::reflector(
            workers_writer,
            watcher(
                Api::<ModelWorker>::all(self.client.clone()),
                watcher::Config::default(),
            ),
        );
        let slice_events = reflector::reflector(
            slices_writer,
            watcher(
                Api::<EndpointSlice>::all(self.client),
                watcher::Config::default().labels(LABEL_MODEL_ID),
            ),
        );
        tokio::spawn(publish(
            sender,
            self.scales,
            workers,
            slices,
            steps(worker_events),
            steps(slice_events),
        ));
        receiver
    }
}

/// What a watch event tells the publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Part of a (re-)list: the store is not complete until [`Step::Listed`].
    Listing,
    /// A (re-)list is complete.
    Listed,
    /// An object changed after the list.
    Changed,
}

fn steps<K, S>(events: S) -> impl Stream<Item = Result<Step, watcher::Error>>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    // Backoff keeps the watch going through API-server errors and restarts: an error is logged,
    // the watch re-lists, and the store keeps its last complete list meanwhile.
    events.default_backoff().map_ok(|event| match event {
        watcher::Event::Init | watcher::Event::InitApply(_) => Step::Listing,
        watcher::Event::InitDone => Step::Listed,
        watcher::Event::Apply(_) | watcher::Event::Delete(_) => Step::Changed,
    })
}

async fn publish(
    sender: watch::Sender<Arc<Vec<EndpointSpec>>>,
    scales_sender: watch::Sender<Arc<Vec<WorkerScale>>>,
    workers: Store<ModelWorker>,
    slices: Store<EndpointSlice>,
    worker_steps: impl Stream<Item = Result<Step, watcher::Error>>,
    slice_steps: impl Stream<Item = Result<Step, watcher::Error>>,
) {
    let tagged = futures::stream::select(
        worker_steps.map(|step| (0, step)),
        slice_steps.map(|step| (1, step)),
    );
    let mut tagged = std::pin::pin!(tagged);
    // Half a first list would publish a partial list: wait until both are complete.
    let mut listed = [false, false];
    while let Some((source, step)) = tagged.next().await {
        match step {
            Ok(Step::Listing) => {}
            Ok(step) => {
                listed[source] |= step == Step::Listed;
                if listed == [true, true] {
                    let workers = workers.state();
                    let specs = endpoints(&workers, &slices.state());
                    sender.send_if_modified(|current| {
                        let changed = **current != specs;
                        if changed {
                            tracing::info!(endpoints = specs.len(), "endpoints changed");
                            *current = Arc::new(specs);
                        }
                        changed
                    });
                    let scales = scales(&workers);
                    scales_sender.send_if_modified(|current| {
                        let changed = **current != scales;
                        if changed {
                            *current = Arc::new(scales);
                        }
                        changed
                    });
                }
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), "watch failed; retrying with backoff")
            }
        }
        if sender.is_closed() {
            return;
        }
    }
}

/// Each ModelWorker's replicas and `scaleFromZero`, sorted so that equal inputs give equal lists.
pub fn scales(workers: &[Arc<ModelWorker>]) -> Vec<WorkerScale> {
    let mut scales: Vec<WorkerScale> = workers
        .iter()
        .filter_map(|worker| {
            let namespace = worker.metadata.namespace.clone()?;
            let name = worker.metadata.name.clone()?;
            Some(WorkerScale {
                model: format!("{namespace}/{}", worker.spec.model_id),
                target: Target { namespace, name },
                replicas: worker.spec.replicas,
                scale_from_zero: worker.spec.scale_from_zero,
            })
        })
        .collect();
    scales.sort_by(|a, b| a.target.cmp(&b.target));
    scales
}

/// The router's endpoint list from ModelWorkers and EndpointSlices, sorted so that equal inputs
/// give equal lists.
pub fn endpoints(workers: &[Arc<ModelWorker>], slices: &[Arc<EndpointSlice>]) -> Vec<EndpointSpec> {
    let model_ids: HashMap<(&str, &str), &str> = workers
        .iter()
        .filter_map(|worker| {
            let namespace = worker.metadata.namespace.as_deref()?;
            let name = worker.metadata.name.as_deref()?;
            Some(((namespace, name), worker.spec.model_id.as_str()))
        })
        .collect();
    let mut specs = Vec::new();
    for slice in slices {
        let Some(namespace) = slice.metadata.namespace.as_deref() else {
            continue;
        };
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(LABEL_SERVICE_NAME));
        let Some(model_id) = service.and_then(|name| model_ids.get(&(namespace, name.as_str())))
        else {
            continue;
        };
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|port| port.name.as_deref() == Some(GRPC_PORT_NAME))
            .and_then(|port| port.port);
        let Some(port) = port else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            let conditions = endpoint.conditions.clone().unwrap_or_default();
            // Unset conditions mean ready and serving (the EndpointSlice API's convention).
            let serving = conditions.serving.or(conditions.ready).unwrap_or(true);
            if !serving || conditions.terminating.unwrap_or(false) {
                continue;
            }
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let host = if address.contains(':') {
                format!("[{address}]")
            } else {
                address.clone()
            };
            specs.push(EndpointSpec {
                model: format!("{namespace}/{model_id}"),
                address: format!("{host}:{port}"),
                node: endpoint.node_name.clone().unwrap_or_default(),
            });
        }
    }
    specs.sort_by(|a, b| (&a.model, &a.address).cmp(&(&b.model, &b.address)));
    specs.dedup();
    specs
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn worker(namespace: &str, name: &str, model_id: &str) -> Arc<ModelWorker> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "remotemedia.io/v1alpha1",
                "kind": "ModelWorker",
                "metadata": { "name": name, "namespace": namespace },
                "spec": { "modelId": model_id, "model": { "uri": "pvc://models/m.pt" } },
            }))
            .unwrap(),
        )
    }

    #[test]
    fn each_model_worker_gives_its_namespaced_model_replicas_and_scale_from_zero() {
        let mut at_zero = (*worker("ml", "vad-worker", "vad")).clone();
        at_zero.spec.replicas = 0;
        at_zero.spec.scale_from_zero = true;
        let listed = scales(&[Arc::new(at_zero), worker("a", "asr-worker", "asr")]);
        let target = |namespace: &str, name: &str| Target {
            namespace: namespace.into(),
            name: name.into(),
        };
        assert_eq!(
            listed,
            [
                WorkerScale {
                    target: target("a", "asr-worker"),
                    model: "a/asr".into(),
                    replicas: 1,
                    scale_from_zero: false,
                },
                WorkerScale {
                    target: target("ml", "vad-worker"),
                    model: "ml/vad".into(),
                    replicas: 0,
                    scale_from_zero: true,
                },
            ]
        );
    }

    fn slice(namespace: &str, service: &str, endpoints: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {
                    "name": format!("{service}-abc"),
                    "namespace": namespace,
                    "labels": { LABEL_SERVICE_NAME: service, LABEL_MODEL_ID: "ignored" },
                },
                "addressType": "IPv4",
                "ports": [{ "name": "admin", "port": 9090 }, { "name": "grpc", "port": 50051 }],
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_slice_becomes_endpoints_of_its_model_workers_namespaced_model_id_on_the_grpc_port() {
        let specs = endpoints(
            &[worker("ml", "vad-worker", "vad")],
            &[slice(
                "ml",
                "vad-worker",
                json!([
                    { "addresses": ["10.251.1.5"], "nodeName": "node-1",
                      "conditions": { "ready": true, "serving": true, "terminating": false } },
                    { "addresses": ["10.251.2.7"], "nodeName": "node-2" },
                ]),
            )],
        );
        assert_eq!(
            specs,
            [
                EndpointSpec {
                    model: "ml/vad".into(),
                    address: "10.251.1.5:50051".into(),
                    node: "node-1".into(),
                },
                EndpointSpec {
                    model: "ml/vad".into(),
                    address: "10.251.2.7:50051".into(),
                    node: "node-2".into(),
                },
            ]
        );
    }

    #[test]
    fn endpoints_not_serving_or_terminating_are_left_out() {
        let specs = endpoints(
            &[worker("ml", "w", "m")],
            &[slice(
                "ml",
                "w",
                json!([
                    { "addresses": ["10.0.0.1"], "conditions": { "ready": false } },
                    { "addresses": ["10.0.0.2"], "conditions": { "ready": false, "serving": false } },
                    { "addresses": ["10.0.0.3"],
                      "conditions": { "ready": false, "serving": true, "terminating": true } },
                    { "addresses": ["10.0.0.4"], "conditions": { "ready": true } },
                ]),
            )],
        );
        let addresses: Vec<&str> = specs.iter().map(|s| s.address.as_str()).collect();
        assert_eq!(addresses, ["10.0.0.4:50051"]);
    }

    #[test]
    fn slices_without_a_model_worker_in_their_namespace_or_a_grpc_port_are_left_out() {
        let ready = json!([{ "addresses": ["10.0.0.1"] }]);
        let mut no_grpc = (*slice("ml", "w", ready.clone())).clone();
        no_grpc.ports = Some(vec![]);
        let specs = endpoints(
            &[worker("ml", "w", "m")],
            &[
                slice("other", "w", ready.clone()),
                slice("ml", "not-a-worker", ready),
                Arc::new(no_grpc),
            ],
        );
        assert_eq!(specs, []);
    }

    #[test]
    fn ipv6_addresses_are_bracketed_and_a_missing_node_never_matches_a_node_name() {
        let specs = endpoints(
            &[worker("ml", "w", "m")],
            &[slice("ml", "w", json!([{ "addresses": ["fd00::5"] }]))],
        );
        assert_eq!(specs[0].address, "[fd00::5]:50051");
        assert_eq!(specs[0].node, "");
    }
}
