//! Names that travel in `parameters` and metadata of inference requests: Triton's
//! system-shared-memory extension, and RemoteMedia's extension for brokered regions.
//!
//! RemoteMedia's extension, step by step:
//! 1. A client on the node holds a brokered region (it allocated it, or opened it by id, on its
//!    broker session). On `<socket-dir>/infer.sock` — never over TCP — it names the region in an
//!    input or a requested output with [`BROKERED_REGION`] (the region id, 32 lowercase hex
//!    digits), [`BROKERED_OFFSET`] and [`BROKERED_BYTE_SIZE`] (int64 or uint64 parameters,
//!    relative to the region's start), and sends its broker session token as metadata
//!    [`SESSION_METADATA`] (32 lowercase hex digits). A region the session does not hold is
//!    NOT_FOUND.
//! 2. The sidecar forwards to a colocated worker with the region replaced by a one-time
//!    [`BROKERED_GRANT`] (32 lowercase hex digits) and an absolute [`BROKERED_OFFSET`]; the worker
//!    redeems the grant on its own broker connection (Redeem), which the broker honours once,
//!    only while that request is in flight, and only on the connection that redeemed the
//!    request's first grant. Region ids never reach a worker. A remote worker receives the bytes
//!    inline instead.
//! 3. An output written into a brokered region comes back carrying the same three parameters and
//!    an empty `raw_output_contents` entry, as the worker answers for Triton's shared memory.

use std::collections::HashMap;

use crate::inference::{InferParameter, infer_parameter::ParameterChoice};

/// Triton: the registered region an input is read from or an output is written to.
pub const SHARED_MEMORY_REGION: &str = "shared_memory_region";
/// Triton: byte offset within the registered range (int64 or uint64).
pub const SHARED_MEMORY_OFFSET: &str = "shared_memory_offset";
/// Triton: byte length of the tensor in the region (int64 or uint64).
pub const SHARED_MEMORY_BYTE_SIZE: &str = "shared_memory_byte_size";

/// gRPC metadata naming the caller's broker session (its Hello token, hex).
pub const SESSION_METADATA: &str = "remotemedia-session";
/// A brokered region id (hex), client to sidecar only.
pub const BROKERED_REGION: &str = "remotemedia_region";
/// A one-time grant (hex) for a brokered region, sidecar to colocated worker only.
pub const BROKERED_GRANT: &str = "remotemedia_grant";
/// Byte offset of the tensor in the brokered region (int64 or uint64).
pub const BROKERED_OFFSET: &str = "remotemedia_offset";
/// Byte length of the tensor in the brokered region (int64 or uint64).
pub const BROKERED_BYTE_SIZE: &str = "remotemedia_byte_size";

/// Listed in `ServerMetadata.extensions` by a server that accepts [`BROKERED_REGION`] references
/// (the node sidecar, on its Unix socket only); clients send brokered references only to such a
/// server.
pub const BROKERED_EXTENSION: &str = "remotemedia_brokered_shared_memory";

/// The unsigned integer parameter `key` (an offset or a byte size, which clients send as int64
/// or uint64), if present. The error is the reason, for the caller's own error type.
pub fn unsigned(
    parameters: &HashMap<String, InferParameter>,
    key: &str,
) -> Result<Option<u64>, String> {
    match parameters
        .get(key)
        .and_then(|parameter| parameter.parameter_choice.as_ref())
    {
        None => Ok(None),
        Some(ParameterChoice::Int64Param(value)) => u64::try_from(*value)
            .map(Some)
            .map_err(|_| format!("{key} is negative")),
        Some(ParameterChoice::Uint64Param(value)) => Ok(Some(*value)),
        Some(_) => Err(format!("{key} must be an integer")),
    }
}
