//! The `ModelWorker` custom resource (`remotemedia.io/v1alpha1`): the Rust types are the single
//! source of truth for the API. Their doc comments become `kubectl explain`, their attributes the
//! schema and CEL rules the API server enforces, and `crds/modelworker.yaml` is generated from
//! them (`make crds`; `make test` fails when it drifts).
//!
//! Only the API types live here: no client, no controller.

mod model_worker;
mod status;

pub use model_worker::{Batching, Device, ModelSource, ModelWorker, ModelWorkerSpec, Rollout};
pub use status::{ConditionReason, ConditionType, ModelWorkerStatus};

/// The API group of every RemoteMedia custom resource.
pub const GROUP: &str = "remotemedia.io";
/// The served and stored version of [`ModelWorker`].
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of [`ModelWorker`] objects.
pub const API_VERSION: &str = "remotemedia.io/v1alpha1";
/// `kind` of [`ModelWorker`] objects.
pub const KIND: &str = "ModelWorker";
/// The resource name in URLs and RBAC rules.
pub const PLURAL: &str = "modelworkers";
/// `kubectl get mw`.
pub const SHORT_NAME: &str = "mw";
/// `kubectl get remotemedia` lists every RemoteMedia resource.
pub const CATEGORY: &str = "remotemedia";
