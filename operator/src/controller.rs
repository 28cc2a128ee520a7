//! The reconcile: validate → build desired objects → server-side apply under one field manager →
//! status from what was observed, with events on transitions. Children are owned by the
//! ModelWorker (no finalizer: garbage collection removes them with it).

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{core::v1::Pod, policy::v1::PodDisruptionBudget},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
};
use remotemedia_crds::{API_VERSION, ConditionReason, KIND, ModelWorker, ModelWorkerStatus};
use serde::{Serialize, de::DeserializeOwned};
use tokio::time::Instant;

use crate::{
    config::WorkerDefaults,
    desired::{Desired, endpoint, selector_string, validate},
    metrics::Metrics,
    names::{FIELD_MANAGER, LABEL_MODEL_WORKER},
    status::{Observed, status},
};

/// A healthy ModelWorker is looked at again this often even if nothing it watches changes.
const RESYNC: Duration = Duration::from_secs(300);
/// A failed reconcile is retried after this long.
const RETRY: Duration = Duration::from_secs(5);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub worker: WorkerDefaults,
    /// Every watched ModelWorker: duplicate modelIds are found here.
    pub store: Store<ModelWorker>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("failed to apply the {kind} {namespace}/{name}")]
    Apply {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to delete the PodDisruptionBudget {namespace}/{name}")]
    DeletePdb {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to list the worker pods of {namespace}/{name}")]
    ListPods {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to update the status of {namespace}/{name}")]
    Status {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ReconcileError {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Apply { .. } => "apply",
            Self::DeletePdb { .. } => "delete",
            Self::ListPods { .. } => "list",
            Self::Status { .. } => "status",
        }
    }
}

#[tracing::instrument(skip(worker, ctx), fields(namespace = worker.namespace(), name = %worker.name_any()))]
pub async fn reconcile(
    worker: Arc<ModelWorker>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    ctx.metrics.reconcile_started();
    let started = Instant::now();
    let result = reconcile_one(&worker, &ctx).await;
    ctx.metrics
        .reconcile_finished(started.elapsed().as_secs_f64());
    result
}

pub fn error_policy(
    _worker: Arc<ModelWorker>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.reconcile_failed(error.category());
    tracing::warn!(error = %crate::error_chain(error), "reconcile failed; retrying");
    Action::requeue(RETRY)
}

async fn reconcile_one(worker: &ModelWorker, ctx: &Context) -> Result<Action, ReconcileError> {
    let name = worker.name_any();
    // A namespaced kind always has one; being deleted: garbage collection takes the children.
    let Some(namespace) = worker.namespace() else {
        return Ok(Action::await_change());
    };
    if worker.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let client = &ctx.client;
    let (deployment, template_hash, endpoint, invalid) = match validate(worker) {
        Ok(valid) => {
            let desired = Desired::build(&valid, &ctx.worker);
            let deployment =
                apply(client, &namespace, &name, "Deployment", &desired.deployment).await?;
            apply(client, &namespace, &name, "Service", &desired.service).await?;
            match &desired.pdb {
                Some(pdb) => {
                    apply(client, &namespace, &name, "PodDisruptionBudget", pdb).await?;
                }
                None => delete_pdb(client, worker, &namespace, &name).await?,
            }
            (
                Some(deployment),
                Some(desired.template_hash),
                Some(endpoint(&name, &namespace)),
                None,
            )
        }
        Err(invalid) => (None, None, None, Some(invalid.to_string())),
    };
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels(&selector_string(&name)))
        .await
        .map_err(|source| ReconcileError::ListPods {
            namespace: namespace.clone(),
            name: name.clone(),
            source,
        })?
        .items;
    let duplicates = duplicates(&ctx.store, worker);
    let next = status(&Observed {
        generation: worker.metadata.generation,
        desired_replicas: worker.spec.replicas,
        deployment: deployment.as_ref(),
        template_hash: template_hash.as_deref(),
        pods: &pods,
        duplicates: &duplicates,
        model_id: &worker.spec.model_id,
        invalid,
        selector: selector_string(&name),
        endpoint,
        previous: worker.status.as_ref(),
        now: now(),
    });
    if worker.status.as_ref() != Some(&next) {
        write_status(client, &namespace, &name, &next).await?;
        publish_transitions(ctx, worker, &next).await;
    }
    Ok(Action::requeue(RESYNC))
}

/// Whole seconds: what the API server stores, so an unchanged status compares equal next time.
fn now() -> Time {
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// Server-side apply, forced: a field someone else took (a hand edit) comes back to ours.
async fn apply<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    kind: &'static str,
    object: &K,
) -> Result<K, ReconcileError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await
        .map_err(|source| ReconcileError::Apply {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        })
}

/// Removes the PodDisruptionBudget this ModelWorker owns once it has one replica or none; one
/// that someone else created under the same name is left alone.
async fn delete_pdb(
    client: &Client,
    worker: &ModelWorker,
    namespace: &str,
    name: &str,
) -> Result<(), ReconcileError> {
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace);
    let error = |source| ReconcileError::DeletePdb {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let Some(pdb) = pdbs.get_opt(name).await.map_err(error)? else {
        return Ok(());
    };
    let ours = pdb
        .owner_references()
        .iter()
        .any(|owner| Some(&owner.uid) == worker.metadata.uid.as_ref());
    if ours {
        match pdbs.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(source) => return Err(error(source)),
        }
    }
    Ok(())
}

async fn write_status(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &ModelWorkerStatus,
) -> Result<(), ReconcileError> {
    let patch = serde_json::json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status });
    Api::<ModelWorker>::namespaced(client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|source| ReconcileError::Status {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        })
}

/// `<namespace>/<name>` of the other live ModelWorkers with this one's modelId, sorted.
fn duplicates(store: &Store<ModelWorker>, worker: &ModelWorker) -> Vec<String> {
    let me = ObjectRef::from_obj(worker);
    let mut others: Vec<String> = store
        .state()
        .iter()
        .filter(|other| {
            other.spec.model_id == worker.spec.model_id
                && other.meta().deletion_timestamp.is_none()
                && ObjectRef::from_obj(other.as_ref()) != me
        })
        .map(|other| {
            format!(
                "{}/{}",
                other.namespace().unwrap_or_default(),
                other.name_any()
            )
        })
        .collect();
    others.sort();
    others
}

/// The other ModelWorkers to look at when one changes or goes: those sharing its modelId.
pub fn same_model_id(
    store: &Store<ModelWorker>,
    worker: &ModelWorker,
) -> Vec<ObjectRef<ModelWorker>> {
    let me = ObjectRef::from_obj(worker);
    store
        .state()
        .iter()
        .filter(|other| other.spec.model_id == worker.spec.model_id)
        .map(|other| ObjectRef::from_obj(other.as_ref()))
        .filter(|other| *other != me)
        .collect()
}

/// The ModelWorker a worker pod belongs to, from its label.
pub fn owner_of_pod(pod: Pod) -> Option<ObjectRef<ModelWorker>> {
    let name = pod.labels().get(LABEL_MODEL_WORKER)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// One event per change of `Ready` or `Degraded` (status or reason): Normal when it is good
/// news or progress, Warning when something blocks the ModelWorker.
async fn publish_transitions(ctx: &Context, worker: &ModelWorker, next: &ModelWorkerStatus) {
    let previous = worker.status.as_ref();
    for condition in &next.conditions {
        if condition.type_ == "Progressing" {
            continue;
        }
        let before =
            previous.and_then(|p| p.conditions.iter().find(|c| c.type_ == condition.type_));
        if before.is_some_and(|b| b.status == condition.status && b.reason == condition.reason) {
            continue;
        }
        let quiet = [
            ConditionReason::Available.as_str(),
            ConditionReason::Pending.as_str(),
        ];
        let type_ = if quiet.contains(&condition.reason.as_str()) {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let event = Event {
            type_,
            reason: condition.reason.clone(),
            note: Some(format!(
                "{}={}: {}",
                condition.type_, condition.status, condition.message
            )),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &worker.object_ref(&())).await {
            tracing::warn!(error = %error, "failed to publish an event");
        }
    }
}
