//! `SharedMemoryAllocator`: one named region per tensor, pooled by size class, with a total
//! limit and per-session quotas.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::ShmError;
use super::broker::BrokerClient;
use super::cleanup::cleanup_dead_regions;
use super::mapping::Access;
use super::region::Region;
use crate::tensor::TensorBuffer;

/// Smallest size class: one page. Every region is a whole number of pages anyway.
const MIN_CLASS: usize = 4096;
/// How many free regions of one size class the pool keeps; more are unlinked.
const MAX_POOLED_PER_CLASS: usize = 8;

/// Limits and housekeeping of a [`SharedMemoryAllocator`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatorConfig {
    /// Most bytes of shared memory in use at once (tensors not yet freed), counted by size
    /// class (the region's real size).
    pub max_memory_bytes: u64,
    /// Most bytes one session label may hold at once. Tensors allocated without a label count
    /// only toward `max_memory_bytes`.
    pub per_session_quota: u64,
    /// How often allocation also removes regions whose owners died (any process's, ours
    /// included); the first allocation always does.
    pub cleanup_interval: Duration,
    /// When shared memory cannot be had (the total limit is reached, or the system refuses a
    /// region), return a heap tensor instead of an error, logging why. Quota errors are never
    /// turned into heap tensors: a quota bounds a session, whatever memory it uses.
    pub allow_heap_fallback: bool,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        Self {
            max_memory_bytes: 1 << 30,
            per_session_quota: 256 << 20,
            cleanup_interval: Duration::from_secs(60),
            allow_heap_fallback: false,
        }
    }
}

/// A snapshot of an allocator's books.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Bytes (by size class) held by live tensors.
    pub in_use_bytes: u64,
    /// Regions created since the allocator was made; flat in steady state.
    pub regions_created: u64,
    /// Allocations served by a pooled region.
    pub pool_hits: u64,
    /// Free regions waiting in the pool.
    pub pooled_regions: usize,
}

/// Hands out shared-memory tensors. Cheap to clone; clones share one set of books.
///
/// Each tensor is its own region, so it starts at offset 0 of the id it hands out. A freed
/// tensor's region goes back to the pool, with its pages returned to the system, unless a reader
/// still maps it, in which case it is unlinked and its memory goes when the last reader unmaps.
///
/// With `REMOTEMEDIA_SIDECAR` set, regions come from the node broker, charged there to this
/// process's session and to the tensor's session label. Brokered regions are not pooled: only
/// the broker knows whether another process still holds one, so a freed tensor's region is
/// released to it.
#[derive(Clone, Debug)]
pub struct SharedMemoryAllocator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: AllocatorConfig,
    books: Mutex<Books>,
    regions_created: AtomicU64,
    pool_hits: AtomicU64,
}

/// Everything that must change together: checking a limit and charging it happen under one lock,
/// so two allocations can never both pass a limit only one of them fits under.
#[derive(Debug, Default)]
struct Books {
    in_use: u64,
    sessions: HashMap<Arc<str>, u64>,
    pool: HashMap<usize, Vec<Region>>,
    last_cleanup: Option<Instant>,
}

impl SharedMemoryAllocator {
    /// An allocator with the given limits. Creates nothing until the first allocation.
    pub fn new(config: AllocatorConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                books: Mutex::default(),
                regions_created: AtomicU64::new(0),
                pool_hits: AtomicU64::new(0),
            }),
        }
    }

    /// The limits this allocator enforces.
    pub fn config(&self) -> &AllocatorConfig {
        &self.inner.config
    }

    /// A tensor of `size` bytes (shape `[size]`, `U8`; see [`TensorBuffer::reshape`]) in its own
    /// region, charged to `session` if given. A fresh region reads as zeros, and so does a
    /// pooled one (its pages were released when it was freed).
    pub fn allocate_tensor(
        &self,
        size: usize,
        session: Option<&str>,
    ) -> Result<TensorBuffer, ShmError> {
        let len = NonZeroUsize::new(size).ok_or(ShmError::EmptyAllocation)?;
        let class = size_class(len)?;
        self.maybe_cleanup();
        let mut lease = match self.inner.reserve(class, session) {
            Ok(lease) => lease,
            Err(error @ ShmError::MemoryLimitExceeded { .. }) => return self.heap_or(error, size),
            Err(error) => return Err(error),
        };
        let region = match self.inner.take_pooled(class) {
            Some(region) => region,
            None => match create_region(class, session) {
                Ok(region) => {
                    self.inner.regions_created.fetch_add(1, Ordering::Relaxed);
                    region
                }
                // A refusal by the broker (its quotas, its node cap) is an answer, not an outage.
                Err(ShmError::Broker(error)) if error.code().is_some() => {
                    return Err(error.into());
                }
                Err(error) => {
                    drop(lease);
                    return self.heap_or(error, size);
                }
            },
        };
        lease.region = Some(region);
        Ok(TensorBuffer::from_lease(lease, size))
    }

    /// Removes regions whose owners died, now, instead of waiting for `cleanup_interval`.
    pub fn cleanup_dead_regions(&self) -> Result<super::CleanupReport, ShmError> {
        self.inner.books().last_cleanup = Some(Instant::now());
        cleanup_dead_regions()
    }

    /// Bytes currently held by `session`'s live tensors.
    pub fn session_usage(&self, session: &str) -> u64 {
        self.inner
            .books()
            .sessions
            .get(session)
            .copied()
            .unwrap_or(0)
    }

    /// The allocator's books.
    pub fn stats(&self) -> AllocatorStats {
        let books = self.inner.books();
        AllocatorStats {
            in_use_bytes: books.in_use,
            regions_created: self.inner.regions_created.load(Ordering::Relaxed),
            pool_hits: self.inner.pool_hits.load(Ordering::Relaxed),
            pooled_regions: books.pool.values().map(Vec::len).sum(),
        }
    }

    fn heap_or(&self, error: ShmError, size: usize) -> Result<TensorBuffer, ShmError> {
        if !self.inner.config.allow_heap_fallback {
            return Err(error);
        }
        tracing::warn!(reason = %error, size, "shared memory unavailable, allocating on the heap");
        Ok(TensorBuffer::heap_zeroed(size))
    }

    fn maybe_cleanup(&self) {
        let due = {
            let mut books = self.inner.books();
            let due = books
                .last_cleanup
                .is_none_or(|at| at.elapsed() >= self.inner.config.cleanup_interval);
            if due {
                books.last_cleanup = Some(Instant::now());
            }
            due
        };
        if due && let Err(error) = cleanup_dead_regions() {
            tracing::warn!(%error, "failed to clean up dead regions");
        }
    }
}

impl Inner {
    fn books(&self) -> MutexGuard<'_, Books> {
        // Books are updated with plain arithmetic that cannot panic halfway; a poisoned lock
        // still guards consistent numbers.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks both limits and charges them in one critical section.
    fn reserve(
        self: &Arc<Self>,
        class: NonZeroUsize,
        session: Option<&str>,
    ) -> Result<Lease, ShmError> {
        let bytes = class.get() as u64;
        let mut books = self.books();
        let in_use_after = books.in_use.saturating_add(bytes);
        if in_use_after > self.config.max_memory_bytes {
            return Err(ShmError::MemoryLimitExceeded {
                requested: bytes,
                in_use: books.in_use,
                limit: self.config.max_memory_bytes,
            });
        }
        let session = match session {
            Some(label) => {
                let held = books.sessions.get(label).copied().unwrap_or(0);
                if held.saturating_add(bytes) > self.config.per_session_quota {
                    return Err(ShmError::QuotaExceeded {
                        session: label.to_owned(),
                        requested: bytes,
                        in_use: held,
                        quota: self.config.per_session_quota,
                    });
                }
                let key: Arc<str> = match books.sessions.get_key_value(label) {
                    Some((key, _)) => key.clone(),
                    None => label.into(),
                };
                *books.sessions.entry(key.clone()).or_insert(0) += bytes;
                Some(key)
            }
            None => None,
        };
        books.in_use = in_use_after;
        Ok(Lease {
            allocator: self.clone(),
            class,
            session,
            region: None,
        })
    }

    /// A pooled region of `class` that no reader maps any more. Regions that a reader opened
    /// while they were pooled (by a stale id) are unlinked instead of handed out again.
    fn take_pooled(&self, class: NonZeroUsize) -> Option<Region> {
        loop {
            let region = self.books().pool.get_mut(&class.get())?.pop()?;
            match region.has_readers() {
                Ok(false) => {
                    self.pool_hits.fetch_add(1, Ordering::Relaxed);
                    return Some(region);
                }
                Ok(true) => {}
                Err(error) => tracing::warn!(%error, "dropping pooled region"),
            }
        }
    }

    /// Takes back a freed tensor's region and uncharges it.
    fn release(&self, lease: &mut Lease) {
        let bytes = lease.class.get() as u64;
        let reusable = lease.region.take().filter(recyclable);
        let mut books = self.books();
        books.in_use -= bytes;
        if let Some(session) = &lease.session
            && let Some(held) = books.sessions.get_mut(session)
        {
            *held -= bytes;
            if *held == 0 {
                books.sessions.remove(session);
            }
        }
        // A region the pool has no room for (or that could not be recycled) drops after the
        // lock is released: dropping unlinks, a system call.
        let surplus = match reusable {
            Some(region) => {
                let slot = books.pool.entry(lease.class.get()).or_default();
                if slot.len() < MAX_POOLED_PER_CLASS {
                    slot.push(region);
                    None
                } else {
                    Some(region)
                }
            }
            None => None,
        };
        drop(books);
        drop(surplus);
    }
}

/// A fresh region from this process's backend: the node broker when `REMOTEMEDIA_SIDECAR` is
/// set (charged there to this session and to `session` as its label), a named region otherwise.
fn create_region(class: NonZeroUsize, session: Option<&str>) -> Result<Region, ShmError> {
    match BrokerClient::from_env()? {
        Some(client) => {
            let handle = client.allocate(class.get() as u64, session.unwrap_or(""))?;
            Region::from_handle(handle, Access::Shared)
        }
        None => Region::create_named(class),
    }
}

/// Whether a freed region may go back to the pool: only if nobody else maps it, and only once
/// its memory went back to the system. Anything else is dropped (unlinked) by the caller.
fn recyclable(region: &Region) -> bool {
    let outcome = match region.has_readers() {
        Ok(true) => Ok(false),
        Ok(false) => region.release_pages().map(|()| true),
        Err(error) => Err(error),
    };
    outcome.unwrap_or_else(|error| {
        tracing::warn!(%error, "not pooling region");
        false
    })
}

/// A tensor's claim on the allocator: its region and the bytes charged for it, both given back
/// on drop.
#[derive(Debug)]
pub(crate) struct Lease {
    allocator: Arc<Inner>,
    class: NonZeroUsize,
    session: Option<Arc<str>>,
    /// Set once the region exists; `None` only between reservation and creation.
    region: Option<Region>,
}

impl Lease {
    pub(crate) fn region(&self) -> &Region {
        self.region
            .as_ref()
            .expect("a lease handed to a tensor always holds its region")
    }

    pub(crate) fn region_mut(&mut self) -> &mut Region {
        self.region
            .as_mut()
            .expect("a lease handed to a tensor always holds its region")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let allocator = self.allocator.clone();
        allocator.release(self);
    }
}

/// The region size serving a request: a power of two, at least one page.
pub(crate) fn size_class(len: NonZeroUsize) -> Result<NonZeroUsize, ShmError> {
    len.get()
        .max(MIN_CLASS)
        .checked_next_power_of_two()
        .filter(|&class| i64::try_from(class).is_ok())
        .and_then(NonZeroUsize::new)
        .ok_or(ShmError::TooLarge {
            requested: len.get(),
        })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Barrier;

    use proptest::prelude::*;

    use super::*;
    use crate::tensor::{DataType, TensorError};

    fn config(max_memory_bytes: u64, per_session_quota: u64) -> AllocatorConfig {
        AllocatorConfig {
            max_memory_bytes,
            per_session_quota,
            ..AllocatorConfig::default()
        }
    }

    fn exists(id: &str) -> bool {
        Path::new("/dev/shm").join(id).exists()
    }

    #[test]
    fn sizes_round_up_to_power_of_two_classes_of_at_least_a_page() {
        let class = |n| size_class(NonZeroUsize::new(n).unwrap()).unwrap().get();
        assert_eq!(class(1), 4096);
        assert_eq!(class(4097), 8192);
        assert_eq!(class(1 << 20), 1 << 20);
        assert!(size_class(NonZeroUsize::new(usize::MAX).unwrap()).is_err());
    }

    #[test]
    fn freed_region_is_reused_so_steady_state_creates_none() {
        let allocator = SharedMemoryAllocator::new(AllocatorConfig::default());
        let first = allocator.allocate_tensor(1 << 20, None).unwrap();
        let id = first.storage().region_id().unwrap();
        drop(first);
        for _ in 0..5 {
            let again = allocator.allocate_tensor(1 << 20, None).unwrap();
            assert_eq!(again.storage().region_id().unwrap(), id);
        }
        let stats = allocator.stats();
        assert_eq!(stats.regions_created, 1);
        assert_eq!(stats.pool_hits, 5);
        assert_eq!(stats.in_use_bytes, 0);
        assert_eq!(stats.pooled_regions, 1);
    }

    #[test]
    fn reused_region_reads_as_zeros() {
        let allocator = SharedMemoryAllocator::new(AllocatorConfig::default());
        let mut tensor = allocator.allocate_tensor(8192, None).unwrap();
        tensor.as_mut_slice().fill(0xEE);
        drop(tensor);
        let tensor = allocator.allocate_tensor(8000, None).unwrap();
        assert_eq!(allocator.stats().pool_hits, 1);
        assert_eq!(tensor.byte_len(), 8000);
        assert!(tensor.as_bytes().iter().all(|&b| b == 0));
    }

    #[test]
    fn region_still_mapped_by_a_reader_is_freed_not_reused() {
        let allocator = SharedMemoryAllocator::new(AllocatorConfig::default());
        let mut tensor = allocator.allocate_tensor(4096, None).unwrap();
        tensor.as_mut_slice()[0] = 5;
        let id = tensor.storage().region_id().unwrap();
        let reader =
            crate::tensor::TensorBuffer::from_shared_memory(&id, 0, 4096, vec![4096], DataType::U8)
                .unwrap();
        drop(tensor);
        assert!(
            !exists(&id),
            "the name goes when the owner frees the tensor"
        );
        assert_eq!(reader.as_bytes()[0], 5, "the reader keeps its bytes");
        let next = allocator.allocate_tensor(4096, None).unwrap();
        assert_ne!(next.storage().region_id().unwrap(), id);
        assert_eq!(allocator.stats().regions_created, 2);
    }

    #[test]
    fn dropping_the_allocator_unlinks_pooled_regions() {
        let allocator = SharedMemoryAllocator::new(AllocatorConfig::default());
        let tensor = allocator.allocate_tensor(4096, None).unwrap();
        let id = tensor.storage().region_id().unwrap();
        drop(tensor);
        assert!(exists(&id), "pooled");
        drop(allocator);
        assert!(!exists(&id));
    }

    #[test]
    fn session_quota_is_enforced_per_label_and_released_on_free() {
        let allocator = SharedMemoryAllocator::new(config(1 << 30, 8192));
        let a = allocator.allocate_tensor(8192, Some("a")).unwrap();
        let error = allocator.allocate_tensor(1, Some("a")).unwrap_err();
        assert!(
            matches!(&error, ShmError::QuotaExceeded { session, requested: 4096, in_use: 8192, quota: 8192 } if session == "a"),
            "{error}"
        );
        assert!(allocator.allocate_tensor(8192, Some("b")).is_ok());
        assert!(
            allocator.allocate_tensor(1 << 20, None).is_ok(),
            "unlabelled: total only"
        );
        assert_eq!(allocator.session_usage("a"), 8192);
        drop(a);
        assert_eq!(allocator.session_usage("a"), 0);
        assert!(allocator.allocate_tensor(8192, Some("a")).is_ok());
    }

    #[test]
    fn total_limit_is_an_error_unless_heap_fallback_is_allowed() {
        let allocator = SharedMemoryAllocator::new(config(8192, 1 << 30));
        let _held = allocator.allocate_tensor(8192, None).unwrap();
        let error = allocator.allocate_tensor(10, None).unwrap_err();
        assert!(
            matches!(error, ShmError::MemoryLimitExceeded { limit: 8192, .. }),
            "{error}"
        );

        let allocator = SharedMemoryAllocator::new(AllocatorConfig {
            allow_heap_fallback: true,
            ..config(8192, 1 << 30)
        });
        let _held = allocator.allocate_tensor(8192, None).unwrap();
        let heap = allocator.allocate_tensor(10, None).unwrap();
        assert!(!heap.storage().is_shared());
        assert_eq!(heap.as_bytes(), &[0; 10]);
        assert!(matches!(
            heap.storage().region_id(),
            Err(TensorError::NotShared)
        ));
        assert_eq!(
            allocator.stats().in_use_bytes,
            8192,
            "heap tensors are not charged"
        );
    }

    #[test]
    fn quota_errors_never_fall_back_to_the_heap() {
        let allocator = SharedMemoryAllocator::new(AllocatorConfig {
            allow_heap_fallback: true,
            ..config(1 << 30, 4096)
        });
        let _held = allocator.allocate_tensor(4096, Some("s")).unwrap();
        assert!(matches!(
            allocator.allocate_tensor(1, Some("s")),
            Err(ShmError::QuotaExceeded { .. })
        ));
    }

    #[test]
    fn empty_allocation_is_refused() {
        let allocator = SharedMemoryAllocator::new(AllocatorConfig::default());
        assert!(matches!(
            allocator.allocate_tensor(0, None),
            Err(ShmError::EmptyAllocation)
        ));
    }

    #[test]
    fn cleanup_leaves_live_regions_alone() {
        let allocator = SharedMemoryAllocator::new(AllocatorConfig::default());
        let tensor = allocator.allocate_tensor(4096, None).unwrap();
        let id = tensor.storage().region_id().unwrap();
        let report = allocator.cleanup_dead_regions().unwrap();
        assert!(report.alive >= 1);
        assert!(exists(&id));
    }

    /// Every thread allocates until refused while holding what it got, all starting together:
    /// exactly as many allocations succeed as fit, however the threads interleave.
    fn race(
        threads: usize,
        per_thread: usize,
        limit: u64,
        quota: u64,
        label: Option<&str>,
    ) -> usize {
        let allocator = SharedMemoryAllocator::new(config(limit, quota));
        let barrier = Barrier::new(threads);
        let granted: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        let held: Vec<_> = (0..per_thread)
                            .map_while(|_| allocator.allocate_tensor(4096, label).ok())
                            .collect();
                        let count = held.len();
                        barrier.wait();
                        count
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allocator.stats().in_use_bytes, 0, "everything was freed");
        granted
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn concurrent_allocations_never_exceed_the_session_quota(threads in 2usize..6, pages in 1u64..12) {
            let granted = race(threads, 12, 1 << 30, pages * 4096, Some("shared-label"));
            prop_assert_eq!(granted as u64, pages);
        }

        #[test]
        fn concurrent_allocations_never_exceed_the_total(threads in 2usize..6, pages in 1u64..12) {
            let granted = race(threads, 12, pages * 4096, 1 << 30, None);
            prop_assert_eq!(granted as u64, pages);
        }
    }
}
