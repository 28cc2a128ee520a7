//! Triton's system-shared-memory extension: clients register POSIX shared-memory objects by
//! key, then name them in requests; inputs are read in place and outputs written straight into
//! the client's range.
//!
//! - Each registration maps its object twice, once at registration time, and every request
//!   reuses those mappings (never a mapping per request): `MAP_PRIVATE` for inputs, so a model
//!   that writes into its input gets private copy-on-write pages and the client's bytes stay as
//!   they were, and `MAP_SHARED` for outputs, so the one copy out lands in the client's pages.
//!   Mappings come from `remotemedia_runtime_core::shm::open_named_region`, so two registrations of
//!   one key share them. Backends get the input as `&[u8]` and cannot write into it; one that
//!   handed the mapping to libtorch with `from_blob` would need more than `MAP_PRIVATE`, because
//!   a page it wrote would stay the worker's private copy for every later request on that
//!   region (the TorchScript backend copies its inputs instead).
//! - A request holds a lease on each registration it uses (an `Arc`) until its forward pass
//!   ended and its outputs were written. **Unregister waits**: the name is gone at once (new
//!   requests naming it get NOT_FOUND), and the call returns once every in-flight request that
//!   holds it has finished, so after it returns the worker neither reads nor writes the region.
//!   Unregistering a name that is not registered succeeds, as in Triton.
//! - A client that unlinks its key after registering does not disturb the worker: the mappings
//!   keep the object alive until the registration goes.
//! - A tensor whose address is not a multiple of its element size is copied into an aligned
//!   buffer (counted in `remotemedia_worker_shm_misaligned_copies_total`) instead of being handed
//!   to a backend misaligned.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use remotemedia_proto::inference::system_shared_memory_status_response::RegionStatus;
use remotemedia_runtime_core::shm::{Access, Region, ShmError, open_named_region};
use tokio::sync::oneshot;

use crate::decode::shown;

/// A tensor placed in shared memory by the client: Triton's `shared_memory_region`,
/// `shared_memory_offset` (relative to the registered range) and `shared_memory_byte_size`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMemoryRef {
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// Why a registration or a shared-memory tensor was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedMemoryError {
    #[error("system shared memory is turned off on this worker (--allow-named-shm false)")]
    Disabled,
    #[error("failed to register a shared-memory region: the name is empty")]
    EmptyName,
    #[error("failed to register shared-memory region '{0}': a region of that name is registered")]
    AlreadyRegistered(String),
    #[error("failed to register shared-memory region '{name}': invalid key: {reason}")]
    InvalidKey { name: String, reason: String },
    #[error("failed to register shared-memory region '{0}': no shared-memory object has that key")]
    KeyNotFound(String),
    #[error("failed to register shared-memory region '{0}': byte_size is 0")]
    EmptyRange(String),
    #[error(
        "failed to register shared-memory region '{name}': offset {offset} + byte_size {byte_size} passes the object's {object_size} bytes"
    )]
    PastObject {
        name: String,
        offset: u64,
        byte_size: u64,
        object_size: usize,
    },
    #[error("failed to register shared-memory region '{0}': the object cannot be mapped")]
    Map(String),
    #[error("shared-memory region '{0}' is not registered")]
    NotRegistered(String),
    #[error(
        "offset {offset} + byte_size {byte_size} passes the {registered} bytes registered as region '{region}'"
    )]
    OutOfRange {
        region: String,
        offset: u64,
        byte_size: u64,
        registered: u64,
    },
    #[error(
        "output '{output}' is {needed} bytes, more than the {given} bytes given in region '{region}'"
    )]
    OutputTooSmall {
        output: String,
        region: String,
        needed: usize,
        given: u64,
    },
}

/// The worker's registered regions. Shared by every connection, as in Triton.
pub struct SharedMemoryRegistry {
    regions: Mutex<HashMap<String, Entry>>,
    misaligned_copies: Counter,
    registered: Gauge,
}

struct Entry {
    registration: Arc<Registration>,
    /// Resolves (with an error) once the registration is dropped, i.e. no request holds it.
    released: oneshot::Receiver<()>,
}

/// One registered range and its two mappings.
pub(crate) struct Registration {
    name: String,
    key: String,
    offset: u64,
    byte_size: u64,
    /// `MAP_PRIVATE`, for inputs.
    input: Arc<Region>,
    /// `MAP_SHARED`, for outputs.
    output: Arc<Region>,
    /// Dropped with the registration: wakes an unregister waiting for the last lease.
    _released: oneshot::Sender<()>,
}

impl Registration {
    /// The range `tensor` names, as an offset into the object; checked against the registered
    /// range with overflow-checked arithmetic.
    fn locate(&self, tensor: &SharedMemoryRef) -> Result<(usize, usize), SharedMemoryError> {
        let out_of_range = || SharedMemoryError::OutOfRange {
            region: shown(&tensor.region),
            offset: tensor.offset,
            byte_size: tensor.byte_size,
            registered: self.byte_size,
        };
        let end = tensor
            .offset
            .checked_add(tensor.byte_size)
            .ok_or_else(out_of_range)?;
        if end > self.byte_size {
            return Err(out_of_range());
        }
        // Registration checked that offset + byte_size fits the mapping, so these fit usize.
        let start = usize::try_from(self.offset + tensor.offset).map_err(|_| out_of_range())?;
        let len = usize::try_from(tensor.byte_size).map_err(|_| out_of_range())?;
        Ok((start, len))
    }
}

impl SharedMemoryRegistry {
    pub fn new(misaligned_copies: Counter, registered: Gauge) -> Self {
        SharedMemoryRegistry {
            regions: Mutex::default(),
            misaligned_copies,
            registered,
        }
    }

    /// A registry whose metrics are registered nowhere (tests, fuzzing).
    pub fn unmeasured() -> Self {
        Self::new(Counter::default(), Gauge::default())
    }

    fn regions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A poisoned lock only means a thread panicked between two map operations; the map
        // itself is always consistent.
        self.regions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `byte_size` bytes at `offset` of the POSIX shared-memory object `key` (with or
    /// without its leading slash, as `shm_open` takes it) under `name`.
    pub fn register(
        &self,
        name: &str,
        key: &str,
        offset: u64,
        byte_size: u64,
    ) -> Result<(), SharedMemoryError> {
        if name.is_empty() {
            return Err(SharedMemoryError::EmptyName);
        }
        // Errors quote the name cut to a length fit for a status message.
        let quoted = shown(name);
        if self.regions().contains_key(name) {
            return Err(SharedMemoryError::AlreadyRegistered(quoted.clone()));
        }
        if byte_size == 0 {
            return Err(SharedMemoryError::EmptyRange(quoted.clone()));
        }
        // glibc's shm_open skips leading slashes; so does the worker.
        let object = key.trim_start_matches('/');
        let open = |access| {
            open_named_region(object, access).map_err(|error| match error {
                ShmError::NotFound { .. } => SharedMemoryError::KeyNotFound(quoted.clone()),
                ShmError::InvalidRegionId { reason, .. } => SharedMemoryError::InvalidKey {
                    name: quoted.clone(),
                    reason: reason.to_owned(),
                },
                ShmError::EmptyRegion { .. } => SharedMemoryError::PastObject {
                    name: quoted.clone(),
                    offset,
                    byte_size,
                    object_size: 0,
                },
                other => {
                    // The OS error names the key: logged, not sent.
                    tracing::warn!(region = name, error = %other, "failed to map a registered region");
                    SharedMemoryError::Map(quoted.clone())
                }
            })
        };
        let input = open(Access::Private)?;
        let output = open(Access::Shared)?;
        let object_size = input.len().min(output.len());
        if offset
            .checked_add(byte_size)
            .is_none_or(|end| end > object_size as u64)
        {
            return Err(SharedMemoryError::PastObject {
                name: quoted,
                offset,
                byte_size,
                object_size,
            });
        }
        let (sender, released) = oneshot::channel();
        let registration = Arc::new(Registration {
            name: name.to_owned(),
            key: key.to_owned(),
            offset,
            byte_size,
            input,
            output,
            _released: sender,
        });
        let mut regions = self.regions();
        // Another call may have taken the name while this one was mapping.
        if regions.contains_key(name) {
            return Err(SharedMemoryError::AlreadyRegistered(quoted.clone()));
        }
        regions.insert(
            name.to_owned(),
            Entry {
                registration,
                released,
            },
        );
        self.registered.set(regions.len() as i64);
        tracing::info!(
            region = name,
            byte_size,
            "registered a shared-memory region"
        );
        Ok(())
    }

    /// Every registration, or the one named (`NotRegistered` if there is none).
    pub fn status(&self, name: &str) -> Result<HashMap<String, RegionStatus>, SharedMemoryError> {
        let regions = self.regions();
        let status = |registration: &Registration| RegionStatus {
            name: registration.name.clone(),
            key: registration.key.clone(),
            offset: registration.offset,
            byte_size: registration.byte_size,
        };
        if name.is_empty() {
            return Ok(regions
                .iter()
                .map(|(name, entry)| (name.clone(), status(&entry.registration)))
                .collect());
        }
        let entry = regions
            .get(name)
            .ok_or_else(|| SharedMemoryError::NotRegistered(name.to_owned()))?;
        Ok(HashMap::from([(
            name.to_owned(),
            status(&entry.registration),
        )]))
    }

    /// Unregisters `name` (every region when empty) and waits until no in-flight request holds
    /// what was unregistered. New requests cannot name it from the moment this is called, and
    /// cancelling the wait does not bring it back.
    pub async fn unregister(&self, name: &str) -> Vec<String> {
        let removed: Vec<(String, Entry)> = {
            let mut regions = self.regions();
            let removed = if name.is_empty() {
                regions.drain().collect()
            } else {
                regions
                    .remove_entry(name)
                    .into_iter()
                    .collect::<Vec<(String, Entry)>>()
            };
            self.registered.set(regions.len() as i64);
            removed
        };
        let mut names = Vec::with_capacity(removed.len());
        for (name, entry) in removed {
            let Entry {
                registration,
                released,
            } = entry;
            drop(registration);
            // The sender lives in the registration: this resolves when the last lease drops.
            let _ = released.await;
            tracing::info!(region = %name, "unregistered a shared-memory region");
            names.push(name);
        }
        names
    }

    fn lease(&self, region: &str) -> Result<Arc<Registration>, SharedMemoryError> {
        self.regions()
            .get(region)
            .map(|entry| Arc::clone(&entry.registration))
            .ok_or_else(|| SharedMemoryError::NotRegistered(shown(region)))
    }

    /// The input bytes `tensor` names, in place in the region's private mapping when their
    /// address is a multiple of `alignment`, else copied into an aligned buffer. The returned
    /// bytes hold a lease on the registration for as long as they (or clones) live.
    pub fn input(
        &self,
        tensor: &SharedMemoryRef,
        alignment: usize,
    ) -> Result<Bytes, SharedMemoryError> {
        input_in(
            self.lease(&tensor.region)?,
            tensor,
            alignment,
            &self.misaligned_copies,
        )
    }

    /// Where an output requested in shared memory goes; holds a lease until dropped.
    pub fn output(&self, tensor: &SharedMemoryRef) -> Result<OutputSlot, SharedMemoryError> {
        output_in(self.lease(&tensor.region)?, tensor)
    }
}

/// Resolves the shared-memory tensors of a request: the registry itself, or a request's own
/// regions beside it (see `crate::granted`).
pub trait Resolve {
    fn input(&self, tensor: &SharedMemoryRef, alignment: usize)
    -> Result<Bytes, SharedMemoryError>;
    fn output(&self, tensor: &SharedMemoryRef) -> Result<OutputSlot, SharedMemoryError>;
}

impl Resolve for SharedMemoryRegistry {
    fn input(
        &self,
        tensor: &SharedMemoryRef,
        alignment: usize,
    ) -> Result<Bytes, SharedMemoryError> {
        SharedMemoryRegistry::input(self, tensor, alignment)
    }

    fn output(&self, tensor: &SharedMemoryRef) -> Result<OutputSlot, SharedMemoryError> {
        SharedMemoryRegistry::output(self, tensor)
    }
}

/// A whole sealed region (a redeemed grant) as a registration: offsets are absolute.
pub(crate) fn sealed_registration(
    name: String,
    fd: std::sync::Arc<std::os::fd::OwnedFd>,
) -> Result<Arc<Registration>, ShmError> {
    let input = Arc::new(Region::from_sealed(fd.clone(), Access::Private)?);
    let output = Arc::new(Region::from_sealed(fd, Access::Shared)?);
    // Nobody waits for this registration's release: the receiver is dropped at once.
    let (sender, _) = oneshot::channel();
    Ok(Arc::new(Registration {
        key: String::new(),
        offset: 0,
        byte_size: input.len() as u64,
        name,
        input,
        output,
        _released: sender,
    }))
}

/// [`SharedMemoryRegistry::input`] for a registration already leased.
pub(crate) fn input_in(
    registration: Arc<Registration>,
    tensor: &SharedMemoryRef,
    alignment: usize,
    misaligned_copies: &Counter,
) -> Result<Bytes, SharedMemoryError> {
    let (start, len) = registration.locate(tensor)?;
    let slice = InputSlice {
        registration,
        start,
        len,
    };
    let address = slice.as_ref().as_ptr() as usize;
    if alignment <= 1 || address.is_multiple_of(alignment) {
        return Ok(Bytes::from_owner(slice));
    }
    misaligned_copies.inc();
    Ok(Bytes::from_owner(AlignedCopy::of(slice.as_ref())))
}

/// [`SharedMemoryRegistry::output`] for a registration already leased.
pub(crate) fn output_in(
    registration: Arc<Registration>,
    tensor: &SharedMemoryRef,
) -> Result<OutputSlot, SharedMemoryError> {
    let (start, len) = registration.locate(tensor)?;
    Ok(OutputSlot {
        registration,
        reference: tensor.clone(),
        start,
        len,
    })
}

/// Input bytes read in place from a registration's private mapping.
struct InputSlice {
    registration: Arc<Registration>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for InputSlice {
    fn as_ref(&self) -> &[u8] {
        &self.registration.input.as_slice()[self.start..self.start + self.len]
    }
}

/// A copy whose first byte is 8-byte aligned, enough for every datatype.
struct AlignedCopy {
    words: Vec<u64>,
    len: usize,
}

impl AlignedCopy {
    fn of(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        AlignedCopy {
            words,
            len: bytes.len(),
        }
    }
}

impl AsRef<[u8]> for AlignedCopy {
    fn as_ref(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}

/// The client's range an output is written into.
pub struct OutputSlot {
    registration: Arc<Registration>,
    reference: SharedMemoryRef,
    start: usize,
    len: usize,
}

impl OutputSlot {
    /// The client's description of the range, echoed in the response.
    pub fn reference(&self) -> &SharedMemoryRef {
        &self.reference
    }

    /// Copies `data` (output `output`) into the client's range: the one copy, no serialization.
    pub fn write(&self, output: &str, data: &[u8]) -> Result<(), SharedMemoryError> {
        let too_small = || SharedMemoryError::OutputTooSmall {
            output: shown(output),
            region: shown(&self.reference.region),
            needed: data.len(),
            given: self.reference.byte_size,
        };
        if data.len() > self.len {
            return Err(too_small());
        }
        self.registration
            .output
            .write_at(self.start, data)
            .ok_or_else(too_small)
    }
}

impl std::fmt::Debug for OutputSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputSlot")
            .field("reference", &self.reference)
            .finish_non_exhaustive()
    }
}

impl Clone for OutputSlot {
    fn clone(&self) -> Self {
        OutputSlot {
            registration: Arc::clone(&self.registration),
            reference: self.reference.clone(),
            start: self.start,
            len: self.len,
        }
    }
}

impl PartialEq for OutputSlot {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.registration, &other.registration) && self.reference == other.reference
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroUsize, time::Duration};

    use super::*;

    fn registry() -> SharedMemoryRegistry {
        SharedMemoryRegistry::unmeasured()
    }

    /// A client's object of `len` bytes, filled with 0, 1, 2, … (mod 256).
    fn client_region(len: usize) -> Region {
        let mut region = Region::create_named(NonZeroUsize::new(len).unwrap()).unwrap();
        for (i, byte) in region.as_mut_slice().iter_mut().enumerate() {
            *byte = i as u8;
        }
        region
    }

    fn reference(region: &str, offset: u64, byte_size: u64) -> SharedMemoryRef {
        SharedMemoryRef {
            region: region.into(),
            offset,
            byte_size,
        }
    }

    #[test]
    fn inputs_are_read_in_place_relative_to_the_registered_offset() {
        let client = client_region(4096);
        let registry = registry();
        registry
            .register("r", &format!("/{}", client.id()), 64, 1024)
            .unwrap();
        let first = registry.input(&reference("r", 8, 16), 8).unwrap();
        assert_eq!(first.as_ref(), &client.as_slice()[72..88]);
        let second = registry.input(&reference("r", 8, 16), 8).unwrap();
        // Same mapping both times, and not the heap: the bytes live at the region's address.
        assert_eq!(first.as_ptr(), second.as_ptr());
        assert_eq!(registry.misaligned_copies.get(), 0);
    }

    #[test]
    fn misaligned_inputs_are_copied_to_an_aligned_buffer_and_counted() {
        let client = client_region(4096);
        let registry = registry();
        registry.register("r", client.id(), 0, 4096).unwrap();
        let bytes = registry.input(&reference("r", 3, 32), 4).unwrap();
        assert_eq!(bytes.as_ref(), &client.as_slice()[3..35]);
        assert!(bytes.as_ptr().cast::<u64>().is_aligned());
        assert_eq!(registry.misaligned_copies.get(), 1);
        // Bytes need no alignment.
        registry.input(&reference("r", 3, 32), 1).unwrap();
        assert_eq!(registry.misaligned_copies.get(), 1);
    }

    #[test]
    fn ranges_past_the_registration_are_refused() {
        let client = client_region(4096);
        let registry = registry();
        registry.register("r", client.id(), 1024, 1024).unwrap();
        for (offset, byte_size) in [(0, 1025), (1000, 25), (u64::MAX, 2)] {
            assert!(
                matches!(
                    registry.input(&reference("r", offset, byte_size), 1),
                    Err(SharedMemoryError::OutOfRange { .. })
                ),
                "{offset} + {byte_size}"
            );
        }
        registry.input(&reference("r", 1000, 24), 1).unwrap();
        assert_eq!(
            registry.input(&reference("nope", 0, 1), 1).unwrap_err(),
            SharedMemoryError::NotRegistered("nope".into())
        );
    }

    #[test]
    fn bad_registrations_get_their_errors() {
        let client = client_region(4096);
        let registry = registry();
        registry.register("r", client.id(), 0, 16).unwrap();
        assert_eq!(
            registry.register("r", client.id(), 0, 16),
            Err(SharedMemoryError::AlreadyRegistered("r".into()))
        );
        assert_eq!(
            registry.register("", client.id(), 0, 16),
            Err(SharedMemoryError::EmptyName)
        );
        assert_eq!(
            registry.register("k", "/remotemedia-test-no-such-key", 0, 16),
            Err(SharedMemoryError::KeyNotFound("k".into()))
        );
        assert!(matches!(
            registry.register("k", "/a/b", 0, 16),
            Err(SharedMemoryError::InvalidKey { .. })
        ));
        assert_eq!(
            registry.register("k", client.id(), 0, 0),
            Err(SharedMemoryError::EmptyRange("k".into()))
        );
        for (offset, byte_size) in [(0, 4097), (4000, 100), (u64::MAX, 1)] {
            assert!(matches!(
                registry.register("k", client.id(), offset, byte_size),
                Err(SharedMemoryError::PastObject { .. })
            ));
        }
        assert_eq!(registry.status("").unwrap().len(), 1);
    }

    #[test]
    fn outputs_are_written_into_the_clients_range_and_too_small_is_refused() {
        let client = client_region(4096);
        let registry = registry();
        registry.register("out", client.id(), 100, 200).unwrap();
        let slot = registry.output(&reference("out", 10, 8)).unwrap();
        slot.write("OUTPUT0", b"abcdefgh").unwrap();
        assert_eq!(&client.as_slice()[110..118], b"abcdefgh");
        assert!(matches!(
            slot.write("OUTPUT0", b"abcdefghi"),
            Err(SharedMemoryError::OutputTooSmall { needed: 9, .. })
        ));
        assert_eq!(client.as_slice()[118], 118);
    }

    #[test]
    fn inputs_come_from_a_private_mapping_and_outputs_go_to_a_shared_one() {
        // What a private mapping guarantees (a write stays in the writer's copy-on-write page)
        // is core's `private_reader_writes_stay_private`; here, that the worker uses it.
        let client = client_region(4096);
        let registry = registry();
        registry.register("r", client.id(), 0, 4096).unwrap();
        let lease = registry.lease("r").unwrap();
        assert_eq!(lease.input.access(), Access::Private);
        assert_eq!(lease.output.access(), Access::Shared);
    }

    #[test]
    fn status_lists_registrations_and_an_unknown_name_is_not_found() {
        let client = client_region(4096);
        let registry = registry();
        registry
            .register("a", &format!("/{}", client.id()), 0, 10)
            .unwrap();
        registry.register("b", client.id(), 5, 20).unwrap();
        let all = registry.status("").unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all["b"].offset, 5);
        assert_eq!(all["b"].byte_size, 20);
        assert_eq!(all["a"].key, format!("/{}", client.id()));
        assert_eq!(registry.status("a").unwrap().len(), 1);
        assert_eq!(
            registry.status("c"),
            Err(SharedMemoryError::NotRegistered("c".into()))
        );
        assert_eq!(registry.registered.get(), 2);
    }

    #[tokio::test]
    async fn unregister_waits_for_requests_holding_the_region() {
        let client = client_region(4096);
        let registry = Arc::new(registry());
        registry.register("r", client.id(), 0, 4096).unwrap();
        registry.register("other", client.id(), 0, 16).unwrap();
        let in_flight = registry.input(&reference("r", 0, 16), 1).unwrap();
        let unregister = tokio::spawn({
            let registry = registry.clone();
            async move { registry.unregister("r").await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !unregister.is_finished(),
            "unregister returned while in use"
        );
        // Gone for new requests already; the one in flight still reads its bytes.
        assert_eq!(
            registry.input(&reference("r", 0, 16), 1).unwrap_err(),
            SharedMemoryError::NotRegistered("r".into())
        );
        assert_eq!(in_flight.as_ref(), &client.as_slice()[..16]);
        drop(in_flight);
        let removed = tokio::time::timeout(Duration::from_secs(5), unregister)
            .await
            .expect("unregister still waiting after the lease dropped")
            .unwrap();
        assert_eq!(removed, ["r"]);
        assert_eq!(registry.unregister("").await, ["other"]);
        assert!(registry.unregister("r").await.is_empty());
        assert_eq!(registry.registered.get(), 0);
    }

    proptest::proptest! {
        #[test]
        fn a_tensor_is_served_exactly_when_it_lies_inside_the_registered_range(
            registered_offset in 0u64..64,
            registered_size in 1u64..64,
            offset in 0u64..80,
            byte_size in 0u64..80,
            alignment in proptest::sample::select(vec![1usize, 2, 4, 8]),
        ) {
            let client = client_region(128);
            let registry = registry();
            registry.register("r", client.id(), registered_offset, registered_size).unwrap();
            let result = registry.input(&reference("r", offset, byte_size), alignment);
            if offset + byte_size <= registered_size {
                let start = (registered_offset + offset) as usize;
                let bytes = result.unwrap();
                proptest::prop_assert_eq!(bytes.as_ref(), &client.as_slice()[start..start + byte_size as usize]);
                proptest::prop_assert!((bytes.as_ptr() as usize).is_multiple_of(alignment) || bytes.is_empty());
            } else {
                let out_of_range = matches!(result, Err(SharedMemoryError::OutOfRange { .. }));
                proptest::prop_assert!(out_of_range);
            }
        }
    }

    #[test]
    fn an_unlinked_key_keeps_serving_from_the_registration() {
        let client = client_region(4096);
        let registry = registry();
        registry.register("r", client.id(), 0, 4096).unwrap();
        let id = client.id().to_string();
        drop(client); // the owner unlinks the name
        let bytes = registry.input(&reference("r", 250, 10), 1).unwrap();
        assert_eq!(bytes.as_ref(), [250, 251, 252, 253, 254, 255, 0, 1, 2, 3]);
        // Registering the key again is refused: the name no longer exists.
        assert_eq!(
            registry.register("again", &id, 0, 16),
            Err(SharedMemoryError::KeyNotFound("again".into()))
        );
    }
}
