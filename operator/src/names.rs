//! Names the operator writes and others read: the field manager, label keys, ports. One place, so
//! the sidecar's discovery, the chart and the tests agree with what the operator builds.

/// The one field manager of every server-side apply, children and status alike.
pub const FIELD_MANAGER: &str = "remotemedia-operator";

/// `app.kubernetes.io/name` of every child: what runs in it.
pub const APP_NAME: &str = "remotemedia-model-worker";
/// The ModelWorker a child or pod belongs to; with [`APP_NAME`] it selects the worker pods.
pub const LABEL_MODEL_WORKER: &str = "remotemedia.io/model-worker";
/// The modelId a Service serves: the sidecar's discovery selects Services by it.
pub const LABEL_MODEL_ID: &str = "remotemedia.io/model-id";
pub const LABEL_APP_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// On the pod template: a hash of the template without this label, so the pods of the current
/// template are known from the pods alone (see [`crate::desired::template_hash`]).
pub const LABEL_TEMPLATE_HASH: &str = "remotemedia.io/template-hash";
/// Selects every object this operator manages: its watches list only these.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=remotemedia-operator";

/// The worker's gRPC port (the worker's default, DESIGN §3) and its name on pods and Services.
pub const GRPC_PORT: i32 = 50051;
pub const GRPC_PORT_NAME: &str = "grpc";
/// The worker's admin port: probes and Prometheus.
pub const ADMIN_PORT: i32 = 9090;
pub const ADMIN_PORT_NAME: &str = "admin";

/// The worker container's name in the pod template.
pub const CONTAINER: &str = "worker";
/// Where a model's volume (a claim or a node directory) is mounted in the worker container.
pub const MODEL_MOUNT: &str = "/models";

/// GPUs as the NVIDIA device plugin names them.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
