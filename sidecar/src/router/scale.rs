//! Scale from zero: a request held for a model whose ModelWorker has `spec.replicas: 0` and
//! `scaleFromZero: true` makes the sidecar ask for one replica through the ModelWorker's `/scale`
//! subresource; the request is served when an endpoint becomes ready, or answered UNAVAILABLE at
//! the hold timeout.
//!
//! - One ask per ModelWorker per hold episode: the episode opens with the first request held for
//!   it and closes when the last one leaves (served, timed out or cancelled); the request that
//!   opens it asks, the others wait with it. A new episode asks again.
//! - Several sidecars (or episodes) asking at once is harmless: the patch carries a test that
//!   holds only while the replicas are 0, and the API server applies patches one at a time to the
//!   current object, so the first ask scales 0 → 1 and every other one is refused and counted as
//!   `already_scaled`. No ask ever lowers a count someone else raised (`kubectl scale`, an HPA).
//! - A ModelWorker at 0 replicas without `scaleFromZero` is answered UNAVAILABLE at once, not
//!   after the hold: nothing will start a worker for it, so holding would only delay the same
//!   answer and take one of the `--max-held` places.
//! - Scaling back to zero when idle is not the sidecar's job (an HPA, KEDA or a person does it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use kube::api::{Api, Patch, PatchParams};
use remotemedia_crds::ModelWorker;
use tokio::sync::watch;

use super::{RouteError, served_name, unambiguous};
use crate::metrics::{Metrics, ScaleUp};

/// The field manager of the sidecar's scale patches (shown in the ModelWorker's managedFields).
pub const FIELD_MANAGER: &str = "remotemedia-sidecar";

/// A ModelWorker, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub namespace: String,
    pub name: String,
}

/// What discovery knows of one ModelWorker's scale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerScale {
    pub target: Target,
    /// `namespace/modelId`, as the router names the model's endpoints.
    pub model: String,
    /// `spec.replicas`.
    pub replicas: i32,
    /// `spec.scaleFromZero`.
    pub scale_from_zero: bool,
}

/// The ModelWorkers' scales, kept current by discovery.
pub type Scales = watch::Receiver<Arc<Vec<WorkerScale>>>;

/// Asks for one replica of a ModelWorker that has none.
pub trait Scaler: Send + Sync + 'static {
    fn ask_for_one(&self, target: Target) -> BoxFuture<'static, ScaleUp>;
}

/// What to do for a model that has no ready endpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Hold: a worker may come (replicas above 0 not ready yet, or no ModelWorker known).
    Wait,
    /// Ask for one replica of this ModelWorker, and hold.
    ScaleUp(Target),
    /// Answer now: the model's ModelWorker has 0 replicas and does not allow scale from zero.
    Refuse,
}

/// The decision for `requested` (`modelId` or `namespace/modelId`) from the ModelWorkers' scales.
pub fn decide(scales: &[WorkerScale], requested: &str) -> Result<Decision, RouteError> {
    unambiguous(scales.iter().map(|scale| scale.model.as_str()), requested)?;
    let matching: Vec<&WorkerScale> = scales
        .iter()
        .filter(|scale| served_name(&scale.model, requested).is_some())
        .collect();
    if matching.is_empty() || matching.iter().any(|scale| scale.replicas > 0) {
        return Ok(Decision::Wait);
    }
    Ok(match matching.iter().find(|scale| scale.scale_from_zero) {
        Some(scale) => Decision::ScaleUp(scale.target.clone()),
        None => Decision::Refuse,
    })
}

type Episodes = Arc<Mutex<HashMap<Target, usize>>>;

/// Scale from zero for the router: decisions from discovery's scales, and the open episodes.
pub struct ScaleFromZero {
    scales: Scales,
    scaler: Arc<dyn Scaler>,
    metrics: Arc<Metrics>,
    /// Requests held in each open episode.
    episodes: Episodes,
}

/// A held request's place in an episode; the episode closes when the last place is dropped.
pub struct Joined {
    target: Target,
    episodes: Episodes,
}

impl ScaleFromZero {
    pub fn new(scales: Scales, scaler: Arc<dyn Scaler>, metrics: Arc<Metrics>) -> Self {
        Self {
            scales,
            scaler,
            metrics,
            episodes: Episodes::default(),
        }
    }

    pub fn decide(&self, requested: &str) -> Result<Decision, RouteError> {
        decide(&self.scales.borrow(), requested)
    }

    /// Adds a held request to `target`'s episode; the request that opens it asks for a replica.
    /// The ask runs on its own task, so a request cancelled meanwhile does not cut it short.
    pub fn join(&self, target: Target) -> Joined {
        let mut episodes = self.episodes.lock().unwrap_or_else(|e| e.into_inner());
        let held = episodes.entry(target.clone()).or_insert(0);
        *held += 1;
        if *held == 1 {
            let ask = self.scaler.ask_for_one(target.clone());
            let metrics = self.metrics.clone();
            tokio::spawn(async move { metrics.scale_up(ask.await) });
        }
        Joined {
            target,
            episodes: self.episodes.clone(),
        }
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let mut episodes = self.episodes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = episodes.get_mut(&self.target) {
            *held -= 1;
            if *held == 0 {
                episodes.remove(&self.target);
            }
        }
    }
}

/// [`Scaler`] through the API server: a JSON patch of the ModelWorker's `/scale` subresource.
pub struct ModelWorkerScaler {
    pub client: kube::Client,
}

/// `spec.replicas` 0 → 1, only while it is 0. An autoscaling/v1 Scale leaves a zero `replicas`
/// out of its spec, so "the spec is empty" is the test for 0 (a `test` of `/spec/replicas`
/// would find no value).
fn from_zero_patch() -> json_patch::Patch {
    serde_json::from_value(serde_json::json!([
        { "op": "test", "path": "/spec", "value": {} },
        { "op": "add", "path": "/spec/replicas", "value": 1 },
    ]))
    .expect("a JSON patch built from literals is valid")
}

impl Scaler for ModelWorkerScaler {
    fn ask_for_one(&self, target: Target) -> BoxFuture<'static, ScaleUp> {
        let api = Api::<ModelWorker>::namespaced(self.client.clone(), &target.namespace);
        Box::pin(async move {
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            };
            let patch = Patch::Json::<()>(from_zero_patch());
            match api.patch_scale(&target.name, &params, &patch).await {
                Ok(_) => {
                    tracing::info!(
                        namespace = target.namespace,
                        model_worker = target.name,
                        "asked for one replica (scale from zero)"
                    );
                    ScaleUp::Scaled
                }
                // The patch is valid for any ModelWorker: only its test can fail, when the
                // replicas are no longer 0.
                Err(kube::Error::Api(status)) if status.code == 422 => {
                    tracing::info!(
                        namespace = target.namespace,
                        model_worker = target.name,
                        "already scaled up by someone else"
                    );
                    ScaleUp::AlreadyScaled
                }
                Err(error) => {
                    tracing::warn!(
                        namespace = target.namespace,
                        model_worker = target.name,
                        error = %super::discovery::error_chain(&error),
                        "failed to ask for one replica (scale from zero)"
                    );
                    ScaleUp::Failed
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scale(namespace: &str, model_id: &str, replicas: i32, scale_from_zero: bool) -> WorkerScale {
        WorkerScale {
            target: Target {
                namespace: namespace.into(),
                name: format!("{model_id}-worker"),
            },
            model: format!("{namespace}/{model_id}"),
            replicas,
            scale_from_zero,
        }
    }

    fn target(namespace: &str, model_id: &str) -> Target {
        scale(namespace, model_id, 0, true).target
    }

    #[test]
    fn a_model_worker_at_zero_that_allows_it_is_scaled_up_by_bare_or_namespaced_name() {
        let scales = [scale("ml", "vad", 0, true), scale("ml", "asr", 2, true)];
        for name in ["vad", "ml/vad"] {
            assert_eq!(
                decide(&scales, name).unwrap(),
                Decision::ScaleUp(target("ml", "vad"))
            );
        }
    }

    #[test]
    fn a_model_worker_at_zero_without_scale_from_zero_is_refused() {
        let scales = [scale("ml", "vad", 0, false)];
        assert_eq!(decide(&scales, "vad").unwrap(), Decision::Refuse);
        assert_eq!(decide(&scales, "ml/vad").unwrap(), Decision::Refuse);
    }

    #[test]
    fn replicas_on_their_way_or_an_unknown_model_are_waited_for() {
        let scales = [scale("ml", "vad", 1, false), scale("ml", "asr", 0, true)];
        assert_eq!(decide(&scales, "vad").unwrap(), Decision::Wait);
        assert_eq!(decide(&scales, "other").unwrap(), Decision::Wait);
        assert_eq!(decide(&scales, "other/asr").unwrap(), Decision::Wait);
        assert_eq!(decide(&[], "vad").unwrap(), Decision::Wait);
    }

    #[test]
    fn a_bare_name_of_model_workers_in_two_namespaces_is_ambiguous() {
        let scales = [scale("a", "vad", 0, true), scale("b", "vad", 0, false)];
        assert!(matches!(
            decide(&scales, "vad"),
            Err(RouteError::Ambiguous(_))
        ));
        assert_eq!(decide(&scales, "b/vad").unwrap(), Decision::Refuse);
        assert_eq!(
            decide(&scales, "a/vad").unwrap(),
            Decision::ScaleUp(target("a", "vad"))
        );
    }

    #[test]
    fn the_patch_tests_for_zero_replicas_before_asking_for_one() {
        let patch = serde_json::to_value(from_zero_patch()).unwrap();
        let mut at_zero = serde_json::json!({ "kind": "Scale", "spec": {}, "status": {} });
        json_patch::patch(&mut at_zero, &from_zero_patch()).unwrap();
        assert_eq!(at_zero["spec"]["replicas"], 1, "{patch}");
        let mut at_two = serde_json::json!({ "kind": "Scale", "spec": { "replicas": 2 } });
        assert!(json_patch::patch(&mut at_two, &from_zero_patch()).is_err());
        assert_eq!(at_two["spec"]["replicas"], 2);
    }
}
