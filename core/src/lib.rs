//! `remotemedia-runtime-core`: what an application process links to share models and tensors.
//!
//! - `model_registry` (feature `model-registry`): `ModelRegistry::get_or_load` loads a model once
//!   per process however many pipeline stages ask, and evicts idle models.
//! - `tensor` and `shm` (feature `shared-memory`): `TensorBuffer` over heap or shared memory, and
//!   the `SharedMemoryAllocator` with quotas and cleanup. With `REMOTEMEDIA_SIDECAR` set, regions
//!   come from the node broker (`shm::broker`) instead of POSIX shared memory by name; the API
//!   is the same.
//! - `client` (feature `client`): `ModelWorkerClient` (re-exported from `model_worker`), calls
//!   a model worker or the node sidecar, sending shared-memory tensors by reference where the
//!   server can reach them.
//!
//! The crate depends on no Kubernetes client, no gRPC server and no libtorch.
//!
//! Handing a tensor to another process:
//! ```
//! use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator, TensorBuffer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let allocator = SharedMemoryAllocator::new(Default::default());
//! let mut tensor = allocator.allocate_tensor(1024 * 1024, Some("session-123"))?;
//! tensor.as_mut_slice().fill(1);
//! let region_id = tensor.storage().region_id()?; // hand this string to another process
//! // in the other process:
//! let shared = TensorBuffer::from_shared_memory(&region_id, 0, 1024 * 1024, vec![256, 1024], DataType::F32)?;
//! assert_eq!(shared.as_bytes(), tensor.as_bytes());
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "model-registry")]
pub mod model_registry;
/// The model-worker client under the name the quickstart uses.
#[cfg(feature = "client")]
pub mod model_worker {
    pub use crate::client::{
        ClientConfig, ClientError, InferOptions, InferOutputs, InferStream, IntoTensor,
        ModelStatus, ModelWorkerClient, OutputRequest, StreamResponse,
    };
}
#[cfg(feature = "shared-memory")]
pub mod shm;
#[cfg(feature = "shared-memory")]
pub mod tensor;
