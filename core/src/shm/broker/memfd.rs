//! Brokered regions are sealed `memfd`s: created and sealed by the broker, checked by everyone
//! who receives one (clients on Allocate and Open, the broker on Adopt).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};

/// Seals every brokered region carries: nobody can shrink it under another holder (no SIGBUS),
/// grow it, or add seals (such as one that denies writes) later.
pub const REQUIRED_SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// The name every brokered region shows in `/proc/<pid>/maps` (as `/memfd:<name> (deleted)`).
/// Deliberately not the id: maps are readable by anyone who can see the process.
pub const MEMFD_NAME: &str = "remotemedia-region";

/// Why a received descriptor is not a usable region.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("failed to verify a region descriptor: it is not a sealable memory file")]
    NotSealable(#[source] io::Error),
    #[error("failed to verify a region descriptor: seals {found:?} lack shrink, grow or seal")]
    Unsealed { found: SealFlags },
    #[error("failed to verify a region descriptor: write seals would make it read-only")]
    WriteSealed,
    #[error("failed to verify a region descriptor: {actual} bytes, announced {announced}")]
    SizeMismatch { announced: u64, actual: u64 },
    #[error("failed to verify a region descriptor")]
    Stat(#[source] io::Error),
}

/// Creates a region of exactly `size` bytes (a whole number of pages), sealed, with its pages
/// allocated now: they are charged to the caller's memory cgroup and the first touch costs
/// nothing later.
pub fn create_sealed(size: u64) -> io::Result<OwnedFd> {
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // MFD_NOEXEC_SEAL (Linux 6.3+) keeps the region from ever becoming executable; older
    // kernels refuse the flag with EINVAL and get a region without it.
    let fd = match rustix::fs::memfd_create(MEMFD_NAME, flags | MemfdFlags::NOEXEC_SEAL) {
        Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(MEMFD_NAME, flags)?,
        other => other?,
    };
    rustix::fs::ftruncate(&fd, size)?;
    rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size)?;
    rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS)?;
    Ok(fd)
}

/// Checks that `fd` is a sealed region of exactly `size` bytes that can still be written.
pub fn verify(fd: BorrowedFd<'_>, size: u64) -> Result<(), SealError> {
    let seals =
        rustix::fs::fcntl_get_seals(fd).map_err(|errno| SealError::NotSealable(errno.into()))?;
    if !seals.contains(REQUIRED_SEALS) {
        return Err(SealError::Unsealed { found: seals });
    }
    if seals.intersects(SealFlags::WRITE | SealFlags::FUTURE_WRITE) {
        return Err(SealError::WriteSealed);
    }
    let actual = rustix::fs::fstat(fd)
        .map_err(|errno| SealError::Stat(errno.into()))?
        .st_size;
    let actual = u64::try_from(actual).unwrap_or(0);
    if actual != size {
        return Err(SealError::SizeMismatch {
            announced: size,
            actual,
        });
    }
    Ok(())
}

/// Identity of the file behind a descriptor (device, inode): two descriptors of one region
/// match even when they were passed through different processes.
pub fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let stat = rustix::fs::fstat(fd)?;
    Ok((stat.st_dev, stat.st_ino))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn created_regions_pass_verification_with_their_size_only() {
        let fd = create_sealed(8192).unwrap();
        verify(fd.as_fd(), 8192).unwrap();
        assert!(matches!(
            verify(fd.as_fd(), 4096),
            Err(SealError::SizeMismatch {
                announced: 4096,
                actual: 8192
            })
        ));
        assert!(
            rustix::fs::ftruncate(&fd, 4096).is_err(),
            "shrinking a sealed region must fail"
        );
    }

    #[test]
    fn unsealed_and_non_memfd_descriptors_are_refused() {
        let unsealed = rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&unsealed, 4096).unwrap();
        assert!(matches!(
            verify(unsealed.as_fd(), 4096),
            Err(SealError::Unsealed { .. })
        ));
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(matches!(
            verify(file.as_fd(), 4096),
            Err(SealError::NotSealable(_))
        ));
    }

    #[test]
    fn write_sealed_regions_are_refused() {
        let fd =
            rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS | SealFlags::WRITE).unwrap();
        assert!(matches!(
            verify(fd.as_fd(), 4096),
            Err(SealError::WriteSealed)
        ));
    }
}
