//! Regions a colocated sidecar passes by grant (`--broker`): the sidecar forwards a request
//! whose brokered tensors name a one-time `remotemedia_grant` and an absolute offset; the worker
//! redeems each grant on its own broker session, maps a region the first time it sees it (by
//! the handle the broker returns: `MAP_PRIVATE` for inputs, `MAP_SHARED` for outputs) and
//! reuses the mappings for every later grant of that region. Inputs are read in place and
//! outputs written into the client's pages, exactly as for Triton's system shared memory.
//!
//! The cache keeps at most [`CACHED_REGIONS`] regions; the least recently used one beyond that
//! is forgotten at the broker (its hold dropped). Each redemption's reply also names the
//! cached regions that nobody else holds any more (their clients released them or died) and
//! no request uses: those are unmapped and forgotten at once, so a released region's memory
//! goes back to the node instead of living on in this cache. A worker that gets no more
//! requests asks the broker for that list every `--orphan-sweep-interval` while it caches
//! anything ([`Granted::start_sweeper`]), so an idle worker returns them too.
//! After a broker restart the session is new and old handles mean nothing: the cache is
//! emptied when the session token changes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use remotemedia_proto::inference::{
    InferParameter, ModelInferRequest, infer_parameter::ParameterChoice,
};
use remotemedia_proto::params::{
    BROKERED_BYTE_SIZE, BROKERED_GRANT, BROKERED_OFFSET, SHARED_MEMORY_BYTE_SIZE,
    SHARED_MEMORY_OFFSET, SHARED_MEMORY_REGION,
};
use remotemedia_runtime_core::shm::broker::{
    BrokerClient, BrokerError, ErrorCode, GrantToken, RegionHandleId, SessionToken,
};

use crate::shm::{
    OutputSlot, Registration, Resolve, SharedMemoryError, SharedMemoryRef, SharedMemoryRegistry,
    input_in, output_in, sealed_registration,
};

/// Most regions whose mappings are kept between requests.
pub const CACHED_REGIONS: usize = 64;

/// Why a request's grants were not honoured.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("{kind} '{name}': {BROKERED_GRANT} must be 32 hex digits")]
    Malformed { kind: &'static str, name: String },
    #[error("{kind} '{name}': the region grant was refused")]
    Refused { kind: &'static str, name: String },
    #[error("a region grant reached a worker without --broker")]
    NoBroker,
    #[error("failed to redeem a region grant at the node broker")]
    Broker(#[source] BrokerError),
    #[error("failed to map a redeemed region")]
    Map,
}

impl GrantError {
    /// NOT_FOUND for grants the broker does not honour (replayed, expired, another session's),
    /// INVALID_ARGUMENT for malformed ones, UNAVAILABLE when the broker cannot be reached.
    pub fn code(&self) -> tonic::Code {
        match self {
            GrantError::Malformed { .. } | GrantError::NoBroker => tonic::Code::InvalidArgument,
            GrantError::Refused { .. } => tonic::Code::NotFound,
            GrantError::Broker(_) => tonic::Code::Unavailable,
            GrantError::Map => tonic::Code::Internal,
        }
    }
}

/// This worker's broker session and its mapped regions.
pub struct Granted {
    client: BrokerClient,
    misaligned_copies: Counter,
    /// Held from each redemption's (or sweep's) broker call to its last cache update and Forget:
    /// a reply naming a handle this session already holds must find it in the cache, which
    /// another thread's redemption of the same region may otherwise still be about to fill.
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    session: Option<SessionToken>,
    regions: HashMap<RegionHandleId, (Arc<Registration>, u64)>,
    clock: u64,
}

/// Whether a tensor carries a grant.
fn has_grant(parameters: &HashMap<String, InferParameter>) -> bool {
    parameters.contains_key(BROKERED_GRANT)
}

/// Whether any tensor of the request carries a grant.
pub fn has_grants(request: &ModelInferRequest) -> bool {
    request.inputs.iter().any(|i| has_grant(&i.parameters))
        || request.outputs.iter().any(|o| has_grant(&o.parameters))
}

/// The name a redeemed region goes by within one request.
fn local_name(handle: RegionHandleId) -> String {
    format!("remotemedia-grant-{}", handle.0)
}

impl Granted {
    /// Opens this worker's session at the broker in `socket_dir`.
    pub fn connect(
        socket_dir: &Path,
        label: &str,
        misaligned_copies: Counter,
    ) -> Result<Self, BrokerError> {
        Ok(Self {
            client: BrokerClient::connect(socket_dir, label)?,
            misaligned_copies,
            cache: Mutex::default(),
        })
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Empties `cache` if the broker session changed (the broker restarted): the old handles
    /// name nothing. Called after each broker call, which may have reconnected.
    fn follow_session(&self, cache: &mut Cache) {
        let session = self.client.session_token();
        if cache.session != session {
            cache.regions.clear();
            cache.session = session;
        }
    }

    /// Starts a thread that unmaps and forgets, every `interval`, the cached regions the broker
    /// reports as orphaned, so a worker that gets no more requests does not keep released
    /// regions alive. It ends when the last other reference to `self` goes.
    pub fn start_sweeper(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        let granted = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("grant-sweeper".into())
            .spawn(move || {
                while let Some(granted) = {
                    std::thread::sleep(interval);
                    Weak::upgrade(&granted)
                } {
                    granted.sweep();
                }
            })
            .map(drop)
    }

    /// One sweep: nothing to ask while nothing is cached.
    fn sweep(&self) {
        let mut cache = self.cache();
        if cache.regions.is_empty() {
            return;
        }
        match self.client.orphans() {
            Ok(orphans) => {
                self.follow_session(&mut cache);
                let dropped = take_orphans(&mut cache, Vec::new(), orphans);
                self.forget_all(dropped);
            }
            Err(error) => tracing::debug!(%error, "failed to ask the broker for orphaned regions"),
        }
    }

    /// Drops this session's holds on `handles` at the broker.
    fn forget_all(&self, handles: Vec<RegionHandleId>) {
        for handle in handles {
            if let Err(error) = self.client.forget(handle) {
                tracing::warn!(%error, "failed to forget a cached region");
            }
        }
    }

    /// Redeems every grant of `request` (blocking: one broker round trip each) and rewrites
    /// those tensors as Triton shared-memory references to this request's own regions, which
    /// the returned map resolves. Nothing else can name them: they are not registered.
    pub fn redeem(
        &self,
        request: &mut ModelInferRequest,
    ) -> Result<HashMap<String, Arc<Registration>>, GrantError> {
        let mut regions = HashMap::new();
        let tensors = request
            .inputs
            .iter_mut()
            .map(|i| ("input", &i.name, &mut i.parameters))
            .chain(
                request
                    .outputs
                    .iter_mut()
                    .map(|o| ("output", &o.name, &mut o.parameters)),
            );
        for (kind, name, parameters) in tensors {
            let Some(grant) = parameters.remove(BROKERED_GRANT) else {
                continue;
            };
            let shown = || name.chars().take(64).collect::<String>();
            let grant = match grant.parameter_choice {
                Some(ParameterChoice::StringParam(text)) => GrantToken::parse_hex(&text),
                _ => None,
            }
            .ok_or_else(|| GrantError::Malformed {
                kind,
                name: shown(),
            })?;
            let (handle, registration) = self.redeem_one(grant).map_err(|error| match error {
                GrantError::Refused { .. } => GrantError::Refused {
                    kind,
                    name: shown(),
                },
                other => other,
            })?;
            let local = local_name(handle);
            regions.insert(local.clone(), registration);
            // The sidecar's offset is absolute, as a whole-region registration reads it.
            for (from, to) in [
                (BROKERED_OFFSET, SHARED_MEMORY_OFFSET),
                (BROKERED_BYTE_SIZE, SHARED_MEMORY_BYTE_SIZE),
            ] {
                if let Some(value) = parameters.remove(from) {
                    parameters.insert(to.into(), value);
                }
            }
            parameters.insert(
                SHARED_MEMORY_REGION.into(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::StringParam(local)),
                },
            );
        }
        Ok(regions)
    }

    fn redeem_one(
        &self,
        grant: GrantToken,
    ) -> Result<(RegionHandleId, Arc<Registration>), GrantError> {
        let mut cache = self.cache();
        let redeemed = self
            .client
            .redeem(grant)
            .map_err(|error| match error.code() {
                Some(ErrorCode::NotFound) => GrantError::Refused {
                    kind: "tensor",
                    name: String::new(),
                },
                _ => GrantError::Broker(error),
            })?;
        self.follow_session(&mut cache);
        cache.clock += 1;
        let now = cache.clock;
        let registration = match (redeemed.fd, cache.regions.get_mut(&redeemed.handle)) {
            (None, Some((registration, used))) => {
                *used = now;
                registration.clone()
            }
            (Some(fd), _) => {
                let registration = sealed_registration(local_name(redeemed.handle), Arc::new(fd))
                    .map_err(|error| {
                    tracing::warn!(%error, "failed to map a redeemed region");
                    GrantError::Map
                })?;
                cache
                    .regions
                    .insert(redeemed.handle, (registration.clone(), now));
                registration
            }
            // The broker thinks this session holds a mapping it does not: drop the hold so the
            // next grant of the region brings the descriptor again.
            (None, None) => {
                let _ = self.client.forget(redeemed.handle);
                return Err(GrantError::Refused {
                    kind: "tensor",
                    name: String::new(),
                });
            }
        };
        let evicted = evict(&mut cache);
        let dropped = take_orphans(&mut cache, evicted, redeemed.orphaned);
        self.forget_all(dropped);
        Ok((redeemed.handle, registration))
    }

    /// A resolver for one request: its redeemed regions, then the worker's registrations.
    pub fn resolver<'a>(
        &'a self,
        regions: &'a HashMap<String, Arc<Registration>>,
        named: Option<&'a SharedMemoryRegistry>,
    ) -> RequestRegions<'a> {
        RequestRegions {
            regions,
            named,
            misaligned_copies: &self.misaligned_copies,
        }
    }
}

/// Removes the broker's orphans from the cache and adds them to `dropped` (once each): the
/// handles to forget. A mapping goes when the last request using it drops its Arc.
fn take_orphans(
    cache: &mut Cache,
    mut dropped: Vec<RegionHandleId>,
    orphans: Vec<RegionHandleId>,
) -> Vec<RegionHandleId> {
    for orphan in orphans {
        cache.regions.remove(&orphan);
        if !dropped.contains(&orphan) {
            dropped.push(orphan);
        }
    }
    dropped
}

/// The least recently used regions beyond [`CACHED_REGIONS`], removed from the cache.
fn evict(cache: &mut Cache) -> Vec<RegionHandleId> {
    let excess = cache.regions.len().saturating_sub(CACHED_REGIONS);
    if excess == 0 {
        return Vec::new();
    }
    let mut by_age: Vec<_> = cache
        .regions
        .iter()
        .map(|(h, (_, used))| (*used, *h))
        .collect();
    by_age.sort_unstable();
    by_age
        .into_iter()
        .take(excess)
        .map(|(_, handle)| {
            cache.regions.remove(&handle);
            handle
        })
        .collect()
}

/// One request's regions: those its grants gave, then the worker's named registrations.
pub struct RequestRegions<'a> {
    regions: &'a HashMap<String, Arc<Registration>>,
    named: Option<&'a SharedMemoryRegistry>,
    misaligned_copies: &'a Counter,
}

impl Resolve for RequestRegions<'_> {
    fn input(
        &self,
        tensor: &SharedMemoryRef,
        alignment: usize,
    ) -> Result<Bytes, SharedMemoryError> {
        match (self.regions.get(&tensor.region), self.named) {
            (Some(region), _) => {
                input_in(region.clone(), tensor, alignment, self.misaligned_copies)
            }
            (None, Some(named)) => named.input(tensor, alignment),
            (None, None) => Err(SharedMemoryError::Disabled),
        }
    }

    fn output(&self, tensor: &SharedMemoryRef) -> Result<OutputSlot, SharedMemoryError> {
        match (self.regions.get(&tensor.region), self.named) {
            (Some(region), _) => output_in(region.clone(), tensor),
            (None, Some(named)) => named.output(tensor),
            (None, None) => Err(SharedMemoryError::Disabled),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use super::*;

    fn handle(n: u64) -> RegionHandleId {
        RegionHandleId(NonZeroU64::new(n).unwrap())
    }

    #[test]
    fn the_least_recently_used_regions_beyond_the_cap_are_evicted() {
        let fd = remotemedia_runtime_core::shm::broker::memfd::create_sealed(4096).unwrap();
        let registration = sealed_registration("r".into(), Arc::new(fd)).unwrap();
        let mut cache = Cache::default();
        for n in 1..=CACHED_REGIONS as u64 + 2 {
            // Handle 1 is used last, so 2 and 3 are the oldest.
            let used = if n == 1 { 1000 } else { n };
            cache
                .regions
                .insert(handle(n), (registration.clone(), used));
        }
        let mut evicted = evict(&mut cache);
        evicted.sort();
        assert_eq!(evicted, [handle(2), handle(3)]);
        assert_eq!(cache.regions.len(), CACHED_REGIONS);
        assert!(evict(&mut cache).is_empty());
    }

    #[test]
    fn a_request_resolves_its_own_regions_before_the_workers_registrations() {
        let fd =
            Arc::new(remotemedia_runtime_core::shm::broker::memfd::create_sealed(4096).unwrap());
        let client = remotemedia_runtime_core::shm::Region::from_sealed(
            fd.clone(),
            remotemedia_runtime_core::shm::Access::Shared,
        )
        .unwrap();
        client.write_at(8, b"granted!").unwrap();
        let registration = sealed_registration("r".into(), fd).unwrap();
        let regions = HashMap::from([(local_name(handle(1)), registration)]);
        let counter = Counter::default();
        let resolver = RequestRegions {
            regions: &regions,
            named: None,
            misaligned_copies: &counter,
        };
        let tensor = |region: &str| SharedMemoryRef {
            region: region.into(),
            offset: 8,
            byte_size: 8,
        };
        let bytes = resolver.input(&tensor(&local_name(handle(1))), 8).unwrap();
        assert_eq!(bytes.as_ref(), b"granted!");
        assert_eq!(
            resolver.input(&tensor("other"), 1).unwrap_err(),
            SharedMemoryError::Disabled
        );
    }
}
