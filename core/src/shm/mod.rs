//! Shared-memory regions and the allocator that hands them out as tensors.
//!
//! A region is a descriptor of known size mapped into each process that uses it; tensors are
//! `(region, offset, length)`. Two backends sit behind one API, chosen by the environment:
//! - *brokered*, when `REMOTEMEDIA_SIDECAR` is set: sealed `memfd`s created by the node sidecar
//!   and passed over its socket ([`broker`]); region ids are the broker's 128-bit capabilities;
//! - *named* otherwise: POSIX shared memory (`shm_open`) under names that start with
//!   [`REGION_PREFIX`], which is how two processes on one machine exchange a tensor by handing
//!   over its region id.
//!
//! [`Mapping`] knows nothing about either; both map through it.
//!
//! Who holds a named region, and how others find out:
//! - the owner (the allocator that created it) holds a shared `flock` on it for as long as it
//!   lives, pooled or in use; [`cleanup_dead_regions`] removes regions whose exclusive `flock`
//!   succeeds, i.e. whose owner died;
//! - every reader holds an open-file-description read lock on its first byte, so the owner can
//!   tell whether anyone still maps a region before it recycles it.

mod allocator;
pub mod broker;
mod cleanup;
mod mapping;
mod region;

use std::fmt;

pub(crate) use allocator::Lease;
pub use allocator::{AllocatorConfig, AllocatorStats, SharedMemoryAllocator};
pub use cleanup::{CleanupReport, cleanup_dead_regions};
pub use mapping::{Access, Mapping};
pub use region::{REGION_PREFIX, Region, open_named_region, open_region};

/// The string another process needs to open a region: the POSIX shared-memory name without
/// its leading slash, e.g. `remotemedia-4242-9f86d081884c7d65`, or for a brokered region its
/// 32-hex-digit id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegionId(String);

impl RegionId {
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for RegionId {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for RegionId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for RegionId {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_ref()
    }
}

impl From<RegionId> for String {
    fn from(id: RegionId) -> String {
        id.0
    }
}

/// Errors of the shared-memory layer.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("invalid region id {id:?}: {reason}")]
    InvalidRegionId { id: String, reason: &'static str },
    #[error("failed to open region {id}: no such region")]
    NotFound { id: String },
    #[error("failed to open region {id}: it is empty")]
    EmptyRegion { id: String },
    #[error("failed to {op} region {id}")]
    Os {
        op: &'static str,
        id: String,
        #[source]
        source: nix::Error,
    },
    #[error("failed to allocate: a tensor needs at least one byte")]
    EmptyAllocation,
    #[error("failed to allocate {requested} bytes: larger than any region this system can map")]
    TooLarge { requested: usize },
    #[error(
        "failed to allocate {requested} bytes for session {session:?}: quota of {quota} bytes, {in_use} in use"
    )]
    QuotaExceeded {
        session: String,
        requested: u64,
        in_use: u64,
        quota: u64,
    },
    #[error(
        "failed to allocate {requested} bytes: allocator limit of {limit} bytes, {in_use} in use"
    )]
    MemoryLimitExceeded {
        requested: u64,
        in_use: u64,
        limit: u64,
    },
    #[error("failed to create a region: {attempts} random names were all taken")]
    NameCollision { attempts: u32 },
    #[error("failed to draw a random region name")]
    Random(#[source] getrandom::Error),
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("failed to list shared-memory regions in {dir}")]
    ListRegions {
        dir: &'static str,
        #[source]
        source: std::io::Error,
    },
}
