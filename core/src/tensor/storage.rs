//! Where a tensor's bytes live.

use crate::shm::{Lease, Region, RegionId};

use super::{Element, TensorError};

/// A tensor's bytes: a heap buffer, a region this process allocated, or a slice of a region
/// opened by id.
#[derive(Debug)]
pub struct TensorStorage {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Heap(Box<dyn HeapBytes>),
    /// A copy in 8-byte words (the largest element alignment), of which `len` bytes are used.
    Aligned {
        words: Vec<u64>,
        len: usize,
    },
    /// From the allocator: the whole tensor starts at offset 0 of its own region.
    Allocated {
        lease: Lease,
        len: usize,
    },
    /// Opened by id: `len` bytes at `offset`, checked against the region when opened.
    Mapped {
        region: Region,
        offset: usize,
        len: usize,
    },
}

/// A heap buffer of any element type seen as bytes, so `from_vec` keeps the caller's `Vec<T>`
/// (and its alignment) instead of copying it into a `Vec<u8>`.
trait HeapBytes: Send + Sync + std::fmt::Debug {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl<T: Element> HeapBytes for Vec<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(self)
    }
}

impl TensorStorage {
    pub(super) fn heap<T: Element>(data: Vec<T>) -> Self {
        Self {
            kind: Kind::Heap(Box::new(data)),
        }
    }

    pub(super) fn aligned_copy(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self {
            kind: Kind::Aligned {
                words,
                len: bytes.len(),
            },
        }
    }

    pub(super) fn allocated(lease: Lease, len: usize) -> Self {
        Self {
            kind: Kind::Allocated { lease, len },
        }
    }

    pub(super) fn mapped(region: Region, offset: usize, len: usize) -> Self {
        Self {
            kind: Kind::Mapped {
                region,
                offset,
                len,
            },
        }
    }

    /// The id of the shared-memory region holding the bytes, to hand to another process; a
    /// heap tensor has none.
    pub fn region_id(&self) -> Result<RegionId, TensorError> {
        self.region()
            .map(|region| region.id().clone())
            .ok_or(TensorError::NotShared)
    }

    /// Where the bytes start inside the region (0 for heap and allocated tensors).
    pub fn offset(&self) -> usize {
        match &self.kind {
            Kind::Mapped { offset, .. } => *offset,
            Kind::Heap(_) | Kind::Aligned { .. } | Kind::Allocated { .. } => 0,
        }
    }

    /// True when the bytes are in shared memory.
    pub fn is_shared(&self) -> bool {
        self.region().is_some()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        match &self.kind {
            Kind::Heap(data) => data.bytes().len(),
            Kind::Aligned { len, .. } | Kind::Allocated { len, .. } | Kind::Mapped { len, .. } => {
                *len
            }
        }
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shared-memory region, if the bytes live in one.
    pub fn region(&self) -> Option<&Region> {
        match &self.kind {
            Kind::Heap(_) | Kind::Aligned { .. } => None,
            Kind::Allocated { lease, .. } => Some(lease.region()),
            Kind::Mapped { region, .. } => Some(region),
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        match &self.kind {
            Kind::Heap(data) => data.bytes(),
            Kind::Aligned { words, len } => &bytemuck::cast_slice(words)[..*len],
            Kind::Allocated { lease, len } => &lease.region().as_slice()[..*len],
            Kind::Mapped {
                region,
                offset,
                len,
            } => &region.as_slice()[*offset..*offset + *len],
        }
    }

    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.kind {
            Kind::Heap(data) => data.bytes_mut(),
            Kind::Aligned { words, len } => &mut bytemuck::cast_slice_mut(words)[..*len],
            Kind::Allocated { lease, len } => &mut lease.region_mut().as_mut_slice()[..*len],
            Kind::Mapped {
                region,
                offset,
                len,
            } => &mut region.as_mut_slice()[*offset..*offset + *len],
        }
    }
}
