//! HTTP/2 settings the worker's and the sidecar's gRPC servers share.

/// Largest HTTP/2 frame a client may send: fewer frames (and wake-ups) per large tensor.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// The flow-control window (stream and connection) of a server whose largest message is
/// `max_message_bytes`: a client sends a whole inline tensor without waiting for window
/// updates. h2 windows are at most 2^31 - 1 bytes.
pub fn window(max_message_bytes: usize) -> u32 {
    u32::try_from(max_message_bytes.min(i32::MAX as usize)).unwrap_or(i32::MAX as u32)
}
