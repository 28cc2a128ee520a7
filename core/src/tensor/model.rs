//! `InferenceModel`: the seed's model trait, over [`TensorBuffer`]s.

use std::{error::Error, fmt, future::Future};

use super::TensorBuffer;
use crate::model_registry::RegistryModel;

/// Why an inference failed: the model's own error, boxed.
///
/// Like `anyhow::Error`, it deliberately does not implement `Error` itself, so that `?` converts
/// any error into it inside an `infer`, and it into a `Box<dyn Error>` in the caller.
#[derive(Debug)]
pub struct InferenceError(Box<dyn Error + Send + Sync>);

impl InferenceError {
    /// Wraps an error or a message.
    pub fn new(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self(error.into())
    }

    /// The model's error.
    pub fn into_inner(self) -> Box<dyn Error + Send + Sync> {
        self.0
    }
}

impl fmt::Display for InferenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: Error + Send + Sync + 'static> From<E> for InferenceError {
    fn from(error: E) -> Self {
        Self(Box::new(error))
    }
}

impl From<InferenceError> for Box<dyn Error + Send + Sync> {
    fn from(error: InferenceError) -> Self {
        error.0
    }
}

impl From<InferenceError> for Box<dyn Error> {
    fn from(error: InferenceError) -> Self {
        error.0
    }
}

/// A model that pipeline stages run on tensors. It extends [`RegistryModel`], so any
/// `InferenceModel` can be shared through the `ModelRegistry` (its `memory_usage` counts against
/// the registry's caps).
pub trait InferenceModel: RegistryModel {
    /// The id the model is registered and served under.
    fn model_id(&self) -> &str;

    /// Where the model runs, e.g. `cpu` or `cuda:0`.
    fn device(&self) -> &str;

    /// Runs the model on one input tensor.
    fn infer(
        &self,
        input: &TensorBuffer,
    ) -> impl Future<Output = Result<TensorBuffer, InferenceError>> + Send;
}
