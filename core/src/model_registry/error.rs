//! What can go wrong when asking a registry for a model.

use std::error::Error;
use std::sync::Arc;

/// An error from [`ModelRegistry`](super::ModelRegistry).
///
/// It is `Clone` because one failed load answers every caller that waited for it: a loader's
/// error is shared behind an `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The loader returned an error.
    #[error("failed to load model {model_id}")]
    LoadFailed {
        model_id: String,
        #[source]
        source: Arc<dyn Error + Send + Sync + 'static>,
    },
    /// The loader panicked.
    #[error("failed to load model {model_id}: the loader panicked")]
    LoaderPanicked { model_id: String },
    /// The load was cancelled before it finished (its tokio runtime shut down).
    #[error("failed to load model {model_id}: the load was cancelled before it finished")]
    LoadAborted { model_id: String },
    /// The model does not fit under `max_memory_bytes`, even after unloading every idle model.
    #[error(
        "failed to load model {model_id}: it needs {needed} bytes but at most {available} bytes can be made available"
    )]
    OutOfMemory {
        model_id: String,
        needed: u64,
        available: u64,
    },
    /// `max_models` models are loaded and none of them can be unloaded.
    #[error(
        "failed to load model {model_id}: the registry holds its maximum of {max_models} models and none can be unloaded"
    )]
    RegistryFull { model_id: String, max_models: usize },
    /// The model id is loaded (or loading) as another Rust type.
    #[error("failed to get model {model_id} as {requested}: it is loaded as {loaded}")]
    TypeMismatch {
        model_id: String,
        loaded: &'static str,
        requested: &'static str,
    },
    /// `release` was asked to unload a model that handles still use.
    #[error("failed to release model {model_id}: {reference_count} handles still use it")]
    InUse {
        model_id: String,
        reference_count: usize,
    },
    /// A load was asked for outside a tokio runtime, where the loader cannot be run.
    #[error("failed to load model {model_id}: no tokio runtime is running")]
    NoRuntime { model_id: String },
    /// [`ModelRegistry::init_global`](super::ModelRegistry::init_global) came after the global
    /// registry was created.
    #[error("failed to initialise the global model registry: it already exists")]
    GlobalAlreadyInitialized,
}
