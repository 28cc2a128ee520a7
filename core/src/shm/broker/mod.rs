//! The node broker's protocol and client: brokered regions are sealed `memfd`s that the node
//! sidecar creates, accounts for and passes to the processes that may use them over
//! `<socket-dir>/broker.sock` (`SOCK_SEQPACKET`, one protobuf message per packet, descriptors as
//! `SCM_RIGHTS` on the same packet).
//!
//! - [`wire`]: packets as validated values; the one decoder of broker bytes, used by the client
//!   and by the sidecar's server.
//! - [`socket`]: sending and receiving one packet with its descriptors.
//! - [`memfd`]: creating and verifying sealed regions.
//! - [`BrokerClient`]: a session (Hello) and its calls: [`BrokerClient::allocate`],
//!   [`BrokerClient::open`], [`BrokerClient::stats`]; handles release on drop and are adopted
//!   back after a broker restart.
//!
//! Applications rarely use this module directly: with `REMOTEMEDIA_SIDECAR` set, the
//! [`SharedMemoryAllocator`](super::SharedMemoryAllocator) and
//! [`TensorBuffer::from_shared_memory`](crate::tensor::TensorBuffer::from_shared_memory) go
//! through the broker, and region ids are the broker's 32-hex-digit capabilities.
//!
//! ```no_run
//! use remotemedia_runtime_core::shm::broker::BrokerClient;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = BrokerClient::connect("/run/remotemedia".as_ref(), "my-app")?;
//! let region = client.allocate(1 << 20, "session-123")?;
//! let id = region.key().to_hex(); // give this to the process that should read the region
//! # let _ = id;
//! let same = client.open(region.key())?;
//! assert_eq!(same.size(), region.size());
//! # Ok(())
//! # }
//! ```

mod client;
pub mod memfd;
pub mod socket;
pub mod wire;

pub use client::{
    BROKER_SOCKET, BrokerClient, BrokerError, Redeemed, RegionHandle, SIDECAR_ENV,
    socket_dir_from_env,
};
pub use wire::{
    ErrorCode, GrantToken, LabelUsage, Refusal, RegionHandleId, RegionKey, SessionStats,
    SessionToken,
};
