//! One instance of each model per process, shared by every pipeline stage that asks for it, and
//! unloaded when idle.
//!
//! [`ModelRegistry::get_or_load`] loads a model once however many callers ask at the same time
//! and hands each a counted [`ModelHandle`]; when the last handle drops the model is idle, and
//! the [`EvictionPolicy`] decides when it goes. Caps on memory and model count are enforced when a
//! load finishes, by evicting idle models; models in use are never evicted.
//!
//! `examples/model_registry.rs` shows the API in use.

mod config;
mod error;
mod handle;
mod registry;
#[cfg(test)]
mod tests;

/// The seed's model trait, declared with the tensor types as an extension of [`RegistryModel`].
#[cfg(feature = "shared-memory")]
pub use crate::tensor::{InferenceError, InferenceModel};
pub use config::{EvictionPolicy, RegistryConfig};
pub use error::RegistryError;
pub use handle::ModelHandle;
pub use registry::{ModelInfo, ModelRegistry, RegistryMetrics, SizedLoad};

/// What the registry needs from a model: how much memory it holds.
pub trait RegistryModel: Send + Sync + 'static {
    /// Bytes the model holds, counted against `max_memory_bytes` once its loader returns.
    /// `None` (the default) means it cannot say: a size declared with
    /// [`ModelRegistry::with_size_hint`] counts instead, or nothing.
    fn memory_usage(&self) -> Option<u64> {
        None
    }
}
