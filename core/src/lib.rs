//! `remotemedia-runtime-core`: what an application process links to share models and tensors.
//!
//! - `model_registry` (feature `model-registry`): `ModelRegistry::get_or_load` loads a model once
//!   per process however many pipeline stages ask, and evicts idle models.
//! - `tensor` and `shm` (feature `shared-memory`): `TensorBuffer` over heap or shared memory, and
//!   the `SharedMemoryAllocator` with quotas and cleanup.
//!
//! The crate depends on no Kubernetes client, no gRPC server and no libtorch.

#[cfg(feature = "model-registry")]
pub mod model_registry;
