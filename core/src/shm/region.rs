//! The named backend: POSIX shared memory regions, created by an owner and opened by readers.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, FcntlArg, Flock, FlockArg, OFlag, fallocate, fcntl};
use nix::sys::mman::{shm_open, shm_unlink};
use nix::sys::stat::{Mode, fstat};
use nix::unistd::ftruncate;

use super::broker::{BrokerClient, RegionHandle, RegionKey};
use super::mapping::{Access, Mapping};
use super::{RegionId, ShmError};

/// Every region this crate creates is named `/remotemedia-<pid>-<16 hex digits>`; cleanup only
/// ever considers names of exactly that form.
pub const REGION_PREFIX: &str = "remotemedia-";

/// Longest shm name Linux accepts (NAME_MAX, without the leading slash).
const MAX_NAME_LEN: usize = 255;
/// How many random names to try before giving up on `O_EXCL` collisions or cleanup races. A
/// creator descheduled between `shm_open` and its lock loses its name to any cleanup that scans
/// meanwhile; on a loaded machine with cleanups in a tight loop (the cleanup-race test) that
/// happened 8 times in a row, so the bound is generous.
const CREATE_ATTEMPTS: u32 = 64;

/// A mapped region. Owners unlink the name when the region is dropped; readers only unmap.
#[derive(Debug)]
pub struct Region {
    id: RegionId,
    access: Access,
    // Field order matters: the mapping is unmapped before the descriptor (and its lock) goes.
    mapping: Mapping,
    holder: Holder,
}

/// `(st_dev, st_ino)` of a shared-memory object.
type Identity = (u64, u64);

#[derive(Debug)]
enum Holder {
    /// The creator: a shared `flock` held for the region's whole life says "owner alive".
    Owner(Flock<OwnedFd>),
    /// Someone who opened the region by id, holding a read lock on byte 0 (see `reader_lock`).
    Reader(OwnedFd),
    /// A brokered region: this process's hold at the node broker, released on drop.
    Brokered(Arc<RegionHandle>),
    /// A sealed region's descriptor whose hold someone else keeps (the sidecar's router for a
    /// request in flight, a model worker's redeemed grant): only the mapping is ours.
    Sealed(Arc<OwnedFd>),
}

impl Region {
    /// Creates a fresh region of `len` bytes (zero-filled) owned by this process.
    pub fn create_named(len: NonZeroUsize) -> Result<Self, ShmError> {
        let size = off_t(len.get())?;
        for _ in 0..CREATE_ATTEMPTS {
            let id = RegionId(fresh_name()?);
            let path = shm_path(&id);
            let fd = match shm_open(
                path.as_str(),
                OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_CLOEXEC,
                Mode::S_IRUSR | Mode::S_IWUSR,
            ) {
                Ok(fd) => fd,
                Err(Errno::EEXIST) => continue,
                Err(source) => return Err(os("create", &id, source)),
            };
            // From here on the name exists; unlink it on every failure path.
            let unlink_on_error = |op, source| {
                let _ = shm_unlink(path.as_str());
                os(op, &id, source)
            };
            ftruncate(&fd, size).map_err(|e| unlink_on_error("size", e))?;
            // Blocking: a concurrent cleanup may hold the exclusive lock for a moment, because
            // between `shm_open` and here the region had no owner lock and looked dead.
            let lock = Flock::lock(fd, FlockArg::LockShared)
                .map_err(|(_, e)| unlink_on_error("lock", e))?;
            // If that cleanup won, it unlinked our name: start over with another one.
            let stat = fstat(&*lock).map_err(|e| unlink_on_error("inspect", e))?;
            if stat.st_nlink == 0 {
                continue;
            }
            let mapping = Mapping::map(lock.as_fd(), len, Access::Shared)
                .map_err(|e| unlink_on_error("map", e))?;
            return Ok(Self {
                id,
                access: Access::Shared,
                mapping,
                holder: Holder::Owner(lock),
            });
        }
        Err(ShmError::NameCollision {
            attempts: CREATE_ATTEMPTS,
        })
    }

    /// Opens and maps a region that another process (or this one) created, uncached: each call
    /// is its own mapping. Use [`open_region`] to share one mapping per process.
    ///
    /// `id` is any valid POSIX shared-memory name without its leading slash, not only the names
    /// this crate creates: the model worker maps keys that Triton-style clients chose.
    pub fn open_named(id: &str, access: Access) -> Result<Self, ShmError> {
        let (id, fd, stat) = open_object(id, access)?;
        Self::map_opened(id, fd, &stat, access)
    }

    /// Maps an object `open_object` opened: registers as a reader, then maps all of it.
    fn map_opened(
        id: RegionId,
        fd: OwnedFd,
        stat: &nix::sys::stat::FileStat,
        access: Access,
    ) -> Result<Self, ShmError> {
        let len = usize::try_from(stat.st_size)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| ShmError::EmptyRegion { id: id.0.clone() })?;
        fcntl(
            &fd,
            FcntlArg::F_OFD_SETLK(&reader_lock(libc_lock_type::READ)),
        )
        .map_err(|e| os("register as reader of", &id, e))?;
        let mapping = Mapping::map(fd.as_fd(), len, access).map_err(|e| os("map", &id, e))?;
        Ok(Self {
            id,
            access,
            mapping,
            holder: Holder::Reader(fd),
        })
    }

    /// Opens a region by id through this process's backend: the node broker when
    /// `REMOTEMEDIA_SIDECAR` is set, POSIX shared memory by name otherwise.
    pub fn open(id: &str, access: Access) -> Result<Self, ShmError> {
        match BrokerClient::from_env()? {
            Some(client) => {
                let key = RegionKey::parse_hex(id).ok_or_else(|| ShmError::InvalidRegionId {
                    id: id.chars().take(64).collect(),
                    reason: "a brokered region id is 32 hex digits",
                })?;
                Self::from_handle(client.open(key)?, access)
            }
            None => Self::open_named(id, access),
        }
    }

    /// Maps a brokered region whose handle this process holds.
    pub fn from_handle(handle: Arc<RegionHandle>, access: Access) -> Result<Self, ShmError> {
        let len = usize::try_from(handle.size().get())
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or(ShmError::TooLarge {
                requested: usize::MAX,
            })?;
        // Errors name the backend, not the id: a brokered id is a capability, kept out of logs.
        let mapping = Mapping::map(handle.fd(), len, access)
            .map_err(|e| os("map", &RegionId("(brokered)".into()), e))?;
        Ok(Self {
            id: RegionId(handle.key().to_hex()),
            access,
            mapping,
            holder: Holder::Brokered(handle),
        })
    }

    /// Maps a sealed region by its descriptor alone, after checking its seals and size (so no
    /// holder can shrink it under the mapping). Its id is unknown here: [`Region::id`] says
    /// `(sealed)`. The sidecar maps client regions this way to serve them inline, and a model
    /// worker maps the regions it redeemed.
    pub fn from_sealed(fd: Arc<OwnedFd>, access: Access) -> Result<Self, ShmError> {
        let id = RegionId("(sealed)".into());
        let size = fstat(fd.as_fd())
            .map_err(|e| os("inspect", &id, e))?
            .st_size;
        let len = usize::try_from(size)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| ShmError::EmptyRegion { id: id.0.clone() })?;
        super::broker::memfd::verify(fd.as_fd(), len.get() as u64)
            .map_err(|e| ShmError::Broker(e.into()))?;
        let mapping = Mapping::map(fd.as_fd(), len, access).map_err(|e| os("map", &id, e))?;
        Ok(Self {
            id,
            access,
            mapping,
            holder: Holder::Sealed(fd),
        })
    }

    /// The id another process passes to [`Region::open`].
    pub fn id(&self) -> &RegionId {
        &self.id
    }

    /// True for a region from the node broker; false for POSIX shared memory by name.
    pub fn is_brokered(&self) -> bool {
        matches!(self.holder, Holder::Brokered(_))
    }

    /// Size of the region in bytes.
    pub fn len(&self) -> usize {
        self.mapping.len()
    }

    /// Always false: regions are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// How this process mapped the region.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The mapping (address, bytes).
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// The bytes of the region.
    pub fn as_slice(&self) -> &[u8] {
        self.mapping.as_slice()
    }

    /// The bytes of the region, writable (through to every holder for [`Access::Shared`]).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.mapping.as_mut_slice()
    }

    /// Copies `data` in at `offset` through a shared reference; see [`Mapping::write_at`].
    /// `None` when the range passes the end of the region.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Option<()> {
        self.mapping.write_at(offset, data)
    }

    /// Whether any reader (in any process, this one included) still has the region open.
    pub(crate) fn has_readers(&self) -> Result<bool, ShmError> {
        // Who else holds a brokered region is known only to the broker: assume someone does, so
        // the allocator gives it back (Release) instead of pooling it.
        if matches!(self.holder, Holder::Brokered(_) | Holder::Sealed(_)) {
            return Ok(true);
        }
        let mut probe = reader_lock(libc_lock_type::WRITE);
        fcntl(self.fd(), FcntlArg::F_OFD_GETLK(&mut probe))
            .map_err(|e| os("probe readers of", &self.id, e))?;
        Ok(probe.l_type != libc_lock_type::UNLOCKED)
    }

    /// Gives the region's pages back to the system; the region reads as zeros afterwards. Used
    /// when a region goes back to the pool, so a pooled region holds address space, not memory.
    pub(crate) fn release_pages(&self) -> Result<(), ShmError> {
        let len = off_t(self.len())?;
        fallocate(
            self.fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            len,
        )
        .map_err(|e| os("release pages of", &self.id, e))
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.holder {
            Holder::Owner(lock) => lock.as_fd(),
            Holder::Reader(fd) => fd.as_fd(),
            Holder::Brokered(handle) => handle.fd(),
            Holder::Sealed(fd) => fd.as_fd(),
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if matches!(self.holder, Holder::Owner(_)) {
            // Readers that still map the region keep its memory until they unmap; the name goes
            // now so nobody new can open a region its owner has freed.
            match shm_unlink(shm_path(&self.id).as_str()) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(errno) => tracing::warn!(%errno, region = %self.id, "failed to unlink region"),
            }
        }
    }
}

/// Maps `id` once per process and access mode: while any caller holds the returned region,
/// every other call gets the same mapping (mapping a large region and faulting its pages in
/// costs milliseconds; readers such as the model worker see the same region on every request).
/// The mapping goes when the last holder drops it.
pub fn open_region(id: &str, access: Access) -> Result<Arc<Region>, ShmError> {
    type Cache = HashMap<(String, Access), Weak<Region>>;
    static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Default::default);
    let key = (id.to_owned(), access);
    // A poisoned cache only means another thread panicked between two map operations; the map
    // itself is always consistent.
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(region) = cache.get(&key).and_then(Weak::upgrade) {
        return Ok(region);
    }
    let region = Arc::new(Region::open(id, access)?);
    cache.retain(|_, weak| weak.strong_count() > 0);
    cache.insert(key, Arc::downgrade(&region));
    Ok(region)
}

/// Like [`open_region`], for POSIX shared memory by name only (never the broker), and for any
/// valid name, not only ours: the model worker maps the keys Triton-style clients register.
///
/// Each call still opens the name, so a name that was unlinked is `NotFound` even while a
/// mapping of it is cached, and a name that now belongs to a new object maps that object, never
/// the stale one.
pub fn open_named_region(id: &str, access: Access) -> Result<Arc<Region>, ShmError> {
    type Cache = HashMap<(String, Access), (Weak<Region>, Identity)>;
    static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Default::default);
    let (region_id, fd, stat) = open_object(id, access)?;
    let key = (id.to_owned(), access);
    // Poisoning: as in `open_region`.
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((weak, cached)) = cache.get(&key)
        && *cached == identity(&stat)
        && let Some(region) = weak.upgrade()
    {
        return Ok(region);
    }
    let region = Arc::new(Region::map_opened(region_id, fd, &stat, access)?);
    cache.retain(|_, (weak, _)| weak.strong_count() > 0);
    cache.insert(key, (Arc::downgrade(&region), identity(&stat)));
    Ok(region)
}

/// Opens the object named `id` for `access`, without mapping it.
fn open_object(
    id: &str,
    access: Access,
) -> Result<(RegionId, OwnedFd, nix::sys::stat::FileStat), ShmError> {
    validate_id(id)?;
    let id = RegionId(id.to_owned());
    let flags = match access {
        Access::Shared => OFlag::O_RDWR,
        // A private mapping never writes back, so read access to the object is enough.
        Access::Private => OFlag::O_RDONLY,
    };
    let fd = match shm_open(
        shm_path(&id).as_str(),
        flags | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Err(ShmError::NotFound { id: id.0 }),
        Err(source) => return Err(os("open", &id, source)),
    };
    let stat = fstat(&fd).map_err(|e| os("inspect", &id, e))?;
    Ok((id, fd, stat))
}

fn identity(stat: &nix::sys::stat::FileStat) -> Identity {
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    (stat.st_dev as u64, stat.st_ino as u64)
}

/// Checks that `id` can name a POSIX shared-memory object: the precise reason when it cannot.
pub(crate) fn validate_id(id: &str) -> Result<(), ShmError> {
    let reason = if id.is_empty() {
        "it is empty"
    } else if id.len() > MAX_NAME_LEN {
        "it is longer than 255 bytes"
    } else if id.contains('/') {
        "it contains '/'"
    } else if id.contains('\0') {
        "it contains a NUL byte"
    } else if id == "." || id == ".." {
        "it names a directory"
    } else {
        return Ok(());
    };
    Err(ShmError::InvalidRegionId {
        id: id.chars().take(64).collect(),
        reason,
    })
}

/// True for names this crate creates (`remotemedia-<pid>-<16 hex digits>`), the only ones
/// cleanup may remove.
pub(crate) fn is_our_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(REGION_PREFIX) else {
        return false;
    };
    let Some((pid, random)) = rest.split_once('-') else {
        return false;
    };
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 16
        && random.bytes().all(|b| b.is_ascii_hexdigit())
}

fn fresh_name() -> Result<String, ShmError> {
    let random = getrandom::u64().map_err(ShmError::Random)?;
    Ok(format!(
        "{REGION_PREFIX}{}-{random:016x}",
        std::process::id()
    ))
}

fn shm_path(id: &RegionId) -> String {
    format!("/{id}")
}

fn os(op: &'static str, id: &RegionId, source: Errno) -> ShmError {
    ShmError::Os {
        op,
        id: id.0.clone(),
        source,
    }
}

fn off_t(len: usize) -> Result<i64, ShmError> {
    i64::try_from(len).map_err(|_| ShmError::TooLarge { requested: len })
}

/// `l_type` values of `struct flock`, which libc declares as `c_int` but the struct holds as
/// `c_short`.
mod libc_lock_type {
    pub const READ: i16 = nix::libc::F_RDLCK as i16;
    pub const WRITE: i16 = nix::libc::F_WRLCK as i16;
    pub const UNLOCKED: i16 = nix::libc::F_UNLCK as i16;
}

/// The reader marker: an open-file-description lock on byte 0. OFD locks belong to the open
/// file, not the process, so two readers in one process are told apart, and they do not
/// interact with the owner's `flock`.
fn reader_lock(l_type: i16) -> nix::libc::flock {
    nix::libc::flock {
        l_type,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_mib() -> NonZeroUsize {
        NonZeroUsize::new(1 << 20).unwrap()
    }

    #[test]
    fn created_region_is_zeroed_and_visible_under_its_name() {
        let region = Region::create_named(one_mib()).unwrap();
        assert!(is_our_name(region.id()));
        assert!(
            std::path::Path::new("/dev/shm")
                .join(region.id().as_str())
                .exists()
        );
        assert!(region.as_slice().iter().all(|&b| b == 0));
        assert_eq!(region.len(), 1 << 20);
    }

    #[test]
    fn dropping_the_owner_unlinks_the_name_but_readers_keep_their_bytes() {
        let mut owner = Region::create_named(one_mib()).unwrap();
        owner.as_mut_slice()[..4].copy_from_slice(b"abcd");
        let reader = Region::open_named(owner.id(), Access::Shared).unwrap();
        let id = owner.id().clone();
        drop(owner);
        assert!(matches!(
            Region::open_named(&id, Access::Shared),
            Err(ShmError::NotFound { .. })
        ));
        assert_eq!(&reader.as_slice()[..4], b"abcd");
    }

    #[test]
    fn owner_sees_readers_until_they_unmap() {
        let owner = Region::create_named(one_mib()).unwrap();
        assert!(!owner.has_readers().unwrap());
        let reader = Region::open_named(owner.id(), Access::Private).unwrap();
        assert!(owner.has_readers().unwrap());
        drop(reader);
        assert!(!owner.has_readers().unwrap());
    }

    #[test]
    fn private_reader_writes_stay_private() {
        let mut owner = Region::create_named(one_mib()).unwrap();
        owner.as_mut_slice()[0] = 7;
        let mut private = Region::open_named(owner.id(), Access::Private).unwrap();
        assert_eq!(private.as_slice()[0], 7);
        private.as_mut_slice()[0] = 9;
        assert_eq!(owner.as_slice()[0], 7);
        assert_eq!(private.as_slice()[0], 9);
    }

    #[test]
    fn released_pages_read_as_zero() {
        let mut owner = Region::create_named(one_mib()).unwrap();
        owner.as_mut_slice().fill(0xAB);
        owner.release_pages().unwrap();
        assert!(owner.as_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn open_region_maps_once_while_held() {
        let owner = Region::create_named(one_mib()).unwrap();
        let a = open_region(owner.id(), Access::Private).unwrap();
        let b = open_region(owner.id(), Access::Private).unwrap();
        assert_eq!(a.as_slice().as_ptr(), b.as_slice().as_ptr());
        let shared = open_region(owner.id(), Access::Shared).unwrap();
        assert_ne!(a.as_slice().as_ptr(), shared.as_slice().as_ptr());
    }

    #[test]
    fn open_named_region_refuses_an_unlinked_name_and_maps_a_new_object_under_an_old_name() {
        let owner = Region::create_named(one_mib()).unwrap();
        let id = owner.id().to_string();
        let cached = open_named_region(&id, Access::Private).unwrap();
        drop(owner);
        assert!(matches!(
            open_named_region(&id, Access::Private),
            Err(ShmError::NotFound { .. })
        ));
        // The holder keeps its bytes; a new object under the same name is not the cached one.
        assert_eq!(cached.len(), 1 << 20);
        let path = format!("/{id}");
        let fd = shm_open(
            path.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .unwrap();
        ftruncate(&fd, 4096).unwrap();
        // Held like an owner holds it, so a cleanup running in another test meanwhile leaves it.
        let _owner = nix::fcntl::Flock::lock(fd, nix::fcntl::FlockArg::LockShared).unwrap();
        let fresh = open_named_region(&id, Access::Private);
        shm_unlink(path.as_str()).unwrap();
        let fresh = fresh.unwrap();
        assert_eq!(fresh.len(), 4096);
        assert!(!Arc::ptr_eq(&fresh, &cached));
    }

    #[test]
    fn write_at_reaches_other_holders_and_refuses_ranges_past_the_end() {
        let owner = Region::create_named(one_mib()).unwrap();
        let writer = Region::open_named(owner.id(), Access::Shared).unwrap();
        writer.write_at(10, b"xyz").unwrap();
        assert_eq!(&owner.as_slice()[10..13], b"xyz");
        assert_eq!(writer.write_at((1 << 20) - 2, b"xyz"), None);
        assert_eq!(writer.write_at(usize::MAX, b"x"), None);
        assert!(owner.as_slice()[(1 << 20) - 2..].iter().all(|&b| b == 0));
    }

    #[test]
    fn invalid_ids_are_refused_with_the_reason() {
        for (id, reason) in [
            ("", "it is empty"),
            ("a/b", "it contains '/'"),
            ("a\0b", "it contains a NUL byte"),
            ("..", "it names a directory"),
        ] {
            match Region::open_named(id, Access::Shared) {
                Err(ShmError::InvalidRegionId { reason: r, .. }) => assert_eq!(r, reason),
                other => panic!("{id:?}: expected InvalidRegionId, got {other:?}"),
            }
        }
        let long = "x".repeat(256);
        assert!(matches!(
            Region::open_named(&long, Access::Shared),
            Err(ShmError::InvalidRegionId { .. })
        ));
    }

    #[test]
    fn unknown_region_is_not_found() {
        assert!(matches!(
            Region::open_named("remotemedia-1-0000000000000000", Access::Shared),
            Err(ShmError::NotFound { .. })
        ));
    }

    #[test]
    fn cleanup_running_alongside_never_removes_a_region_being_created() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = AtomicBool::new(false);
        let removed = std::thread::scope(|scope| {
            let cleaner = scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    super::super::cleanup_dead_regions().unwrap();
                }
            });
            // Count instead of asserting here, so a failure stops the cleaner instead of hanging.
            let removed = (0..2000)
                .filter(|_| {
                    let region = Region::create_named(NonZeroUsize::new(4096).unwrap()).unwrap();
                    !std::path::Path::new("/dev/shm")
                        .join(region.id().as_str())
                        .exists()
                })
                .count();
            stop.store(true, Ordering::Relaxed);
            cleaner.join().unwrap();
            removed
        });
        assert_eq!(removed, 0, "live owners' regions were removed");
    }

    #[test]
    fn only_our_exact_name_shape_counts_as_ours() {
        assert!(is_our_name("remotemedia-42-0123456789abcdef"));
        assert!(!is_our_name("remotemedia-42-0123"));
        assert!(!is_our_name("remotemedia-x-0123456789abcdef"));
        assert!(!is_our_name("remotemedia-session"));
        assert!(!is_our_name("triton-region"));
    }
}
