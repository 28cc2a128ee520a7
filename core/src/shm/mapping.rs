//! One `mmap` of a shared-memory descriptor. Backend-agnostic: named POSIX regions use it today,
//! brokered `memfd` regions (received over the broker socket) map through the same type.
#![allow(unsafe_code)]

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// How a process maps a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `MAP_SHARED`, read and write: writes are seen by every other holder.
    Shared,
    /// `MAP_PRIVATE`, read and write: reads see the region in place; a write gets a private
    /// copy-on-write page, so a reader that scribbles on its input never corrupts the owner's data.
    Private,
}

/// A live mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to another thread moves
// nothing thread-bound. Shared access from several threads only ever yields `&[u8]` (see
// `as_slice`); `&mut` access goes through `&mut self`.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; `&Mapping` gives out only shared slices.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` from its start.
    pub(crate) fn map(fd: BorrowedFd<'_>, len: NonZeroUsize, access: Access) -> nix::Result<Self> {
        let flags = match access {
            Access::Shared => MapFlags::MAP_SHARED,
            Access::Private => MapFlags::MAP_PRIVATE,
        };
        // SAFETY: we ask the kernel for a fresh address (no `addr` hint, no MAP_FIXED), so no
        // existing Rust object is replaced; the caller passes the descriptor's real size as `len`.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags,
                fd,
                0,
            )?
        };
        Ok(Self {
            ptr: ptr.cast(),
            len: len.get(),
        })
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping is never empty (`map` takes a non-zero length).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Address of the first byte, for alignment checks and for backends that hand memory to C.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The mapped bytes. Other processes that map the same region may change them: callers
    /// agree on who writes when, as with any shared memory.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` mapped, readable bytes that stay mapped until `self` is
        // dropped, which the returned borrow outlives not.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Copies `data` into the mapping at `offset`, through a shared reference: several requests
    /// may each write their own slice of one region (the model worker writes outputs into a
    /// client's region this way). `None` when `offset + data.len()` passes the end; nothing is
    /// written then.
    ///
    /// The bytes written must not be borrowed through [`Mapping::as_slice`] in this process at
    /// the same time; as with any shared memory, callers agree on who writes which bytes when.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Option<()> {
        let end = offset.checked_add(data.len())?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset..end` lies inside the mapping (checked above), which is writable
        // (PROT_WRITE) and stays mapped while `self` lives; `data` is a Rust slice and cannot
        // overlap a range no Rust reference covers (the caller keeps `as_slice` borrows of these
        // bytes apart, as documented). A raw copy creates no `&mut` over memory that other
        // holders may read.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len());
        }
        Some(())
    }

    /// The mapped bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the mapping is writable (PROT_WRITE); `&mut self`
        // guarantees no other borrow of this mapping exists in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what `mmap` returned, and no borrow of the bytes can
        // outlive `self`.
        if let Err(errno) = unsafe { munmap(self.ptr.cast(), self.len) } {
            tracing::warn!(%errno, len = self.len, "failed to unmap shared-memory region");
        }
    }
}
