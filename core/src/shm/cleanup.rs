//! Removing regions whose owners died: a crashed producer leaves nothing behind in `/dev/shm`.

use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::mman::{shm_open, shm_unlink};
use nix::sys::stat::Mode;

use super::ShmError;
use super::region::is_our_name;

/// Where Linux keeps POSIX shared-memory objects; POSIX itself has no way to list them.
const SHM_DIR: &str = "/dev/shm";

/// What one cleanup pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Regions of ours whose owner was gone, now unlinked.
    pub removed: usize,
    /// Regions of ours whose owner is alive, left alone.
    pub alive: usize,
}

/// Unlinks every region of ours whose owner is gone. An owner holds a shared `flock` for the
/// region's whole life, so an exclusive lock that succeeds proves nobody owns it any more;
/// names outside our exact pattern are never touched. Readers that still map a removed region
/// keep their bytes until they unmap.
pub fn cleanup_dead_regions() -> Result<CleanupReport, ShmError> {
    let entries = std::fs::read_dir(SHM_DIR).map_err(|source| ShmError::ListRegions {
        dir: SHM_DIR,
        source,
    })?;
    let mut report = CleanupReport::default();
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !is_our_name(&name) {
            continue;
        }
        let path = format!("/{name}");
        // O_RDONLY is enough for flock; a region that vanished or belongs to another user is
        // simply not ours to clean.
        let fd: OwnedFd = match shm_open(
            path.as_str(),
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(_) => continue,
        };
        match Flock::lock(fd, FlockArg::LockExclusiveNonblock) {
            Ok(_lock) => {
                // Unlink while holding the lock, so an owner racing to lock a fresh region with
                // this name sees the unlink (st_nlink == 0) and picks another name.
                match shm_unlink(path.as_str()) {
                    Ok(()) => {
                        tracing::info!(region = %name, "removed region whose owner died");
                        report.removed += 1;
                    }
                    Err(Errno::ENOENT) => {}
                    Err(errno) => {
                        tracing::warn!(%errno, region = %name, "failed to remove dead region")
                    }
                }
            }
            Err((_, Errno::EWOULDBLOCK)) => report.alive += 1,
            Err((_, errno)) => {
                tracing::warn!(%errno, region = %name, "failed to probe region owner")
            }
        }
    }
    Ok(report)
}
