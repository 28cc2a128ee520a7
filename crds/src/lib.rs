//! The `ModelWorker` custom resource (`remotemedia.io/v1alpha1`): the Rust types are the single
//! source of truth for the API. Their doc comments become `kubectl explain`, their attributes the
//! schema and CEL rules the API server enforces, and `crds/modelworker.yaml` is generated from
//! them (`make crds`; `make test` fails when it drifts).
//!
//! Only the API types live here: no client, no controller.

mod model_worker;
mod status;

use serde_json::Value;

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

/// Joins the lines of the descriptions a type's doc comments give it and its fields, keeping
/// paragraph breaks: `kubectl explain` wraps text itself and would otherwise also break lines
/// where the source does. The `#[schemars(transform)]` of each API type.
fn unwrap_docs(schema: &mut schemars::Schema) {
    fn unwrap(description: Option<&mut Value>) {
        if let Some(Value::String(text)) = description {
            let paragraphs: Vec<String> =
                text.split("\n\n").map(|p| p.replace('\n', " ")).collect();
            *text = paragraphs.join("\n\n");
        }
    }
    unwrap(schema.get_mut("description"));
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        for property in properties.values_mut() {
            unwrap(property.get_mut("description"));
        }
    }
}
