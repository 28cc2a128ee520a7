//! `TensorBuffer`: a tensor's bytes, shape and data type, on the heap or in shared memory.
//!
//! A shared-memory tensor can be handed to another process by its region id; the other process
//! maps the same pages ([`TensorBuffer::from_shared_memory`]) and reads them in place. Typed
//! views (`as_f32_slice`, …) reinterpret the bytes without copying and refuse, rather than risk
//! undefined behaviour, when the bytes are not aligned for the type.

mod dtype;
mod layout;
#[cfg(feature = "model-registry")]
mod model;
mod storage;

pub use dtype::{DataType, Element, bf16, f16};
pub use layout::{byte_size, check_size, check_slice, contiguous_strides, element_count};
#[cfg(feature = "model-registry")]
pub use model::{InferenceError, InferenceModel};
pub use storage::TensorStorage;

pub use crate::shm::{RegionId, SharedMemoryAllocator, ShmError};

use crate::shm::{Access, Lease, Region};

/// Errors building or viewing a tensor.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("failed to build tensor: shape {shape:?} overflows the address space")]
    ShapeOverflow { shape: Vec<usize> },
    #[error(
        "failed to build tensor: shape {shape:?} of {dtype} needs {needed} bytes, but the size is {size}"
    )]
    ShapeMismatch {
        shape: Vec<usize>,
        dtype: DataType,
        needed: usize,
        size: usize,
    },
    #[error(
        "failed to build tensor: offset {offset} + size {size} is beyond the end of the {region_len}-byte region"
    )]
    SliceOutOfRange {
        offset: usize,
        size: usize,
        region_len: usize,
    },
    #[error(
        "failed to build tensor: its elements are {elements}, but the data type given is {declared}"
    )]
    ElementMismatch {
        declared: DataType,
        elements: DataType,
    },
    #[error("failed to view a {actual} tensor as {requested}")]
    DtypeMismatch {
        requested: DataType,
        actual: DataType,
    },
    #[error(
        "failed to view tensor as {dtype}: its data starts at an address that is not {align}-byte aligned"
    )]
    Misaligned { dtype: DataType, align: usize },
    #[error("failed to view tensor as bool: byte {index} is {value}, not 0 or 1")]
    InvalidBool { index: usize, value: u8 },
    #[error("failed to get region id: the tensor is on the heap, not in shared memory")]
    NotShared,
    #[error(transparent)]
    Shm(#[from] ShmError),
}

/// A dense, C-contiguous tensor.
#[derive(Debug)]
pub struct TensorBuffer {
    storage: TensorStorage,
    shape: Vec<usize>,
    strides: Vec<usize>,
    dtype: DataType,
}

impl TensorBuffer {
    /// A heap tensor that takes ownership of `data` (no copy). `dtype` must be the type of the
    /// elements (`DataType::I32` for a `Vec<i32>`): it is stated so that the line reads the
    /// same as the tensor's wire description, and a mismatch is an error, not a reinterpretation.
    pub fn from_vec<T: Element>(
        data: Vec<T>,
        shape: Vec<usize>,
        dtype: DataType,
    ) -> Result<Self, TensorError> {
        if dtype != T::DTYPE {
            return Err(TensorError::ElementMismatch {
                declared: dtype,
                elements: T::DTYPE,
            });
        }
        let size = std::mem::size_of_val(data.as_slice());
        Self::new(TensorStorage::heap(data), size, shape, T::DTYPE)
    }

    /// A heap copy of `bytes` as a tensor of `shape` and `dtype`, in a buffer aligned for every
    /// data type, so the typed views of the copy always work (bytes received from a socket or
    /// read from a file have no alignment).
    pub fn copy_from_bytes(
        bytes: &[u8],
        shape: Vec<usize>,
        dtype: DataType,
    ) -> Result<Self, TensorError> {
        check_size(&shape, dtype, bytes.len())?;
        Self::new(
            TensorStorage::aligned_copy(bytes),
            bytes.len(),
            shape,
            dtype,
        )
    }

    /// A heap tensor of any data type from raw bytes (no copy). Typed views need the bytes to
    /// be aligned for the type, which a `Vec<u8>` does not promise; [`TensorBuffer::from_vec`]
    /// does.
    pub fn from_bytes(
        data: Vec<u8>,
        shape: Vec<usize>,
        dtype: DataType,
    ) -> Result<Self, TensorError> {
        let size = data.len();
        Self::new(TensorStorage::heap(data), size, shape, dtype)
    }

    /// Maps `size` bytes at `offset` of the region `region_id` (created by a
    /// [`SharedMemoryAllocator`] here or in another process) as a tensor of `shape` and `dtype`,
    /// without copying. Writes through [`TensorBuffer::as_mut_slice`] are seen by every process
    /// that maps the region.
    ///
    /// Each call maps the region anew, so that every tensor's `&mut` access is its own; readers
    /// that only read and want one mapping per process use [`crate::shm::open_region`].
    pub fn from_shared_memory(
        region_id: &str,
        offset: usize,
        size: usize,
        shape: Vec<usize>,
        dtype: DataType,
    ) -> Result<Self, TensorError> {
        check_size(&shape, dtype, size)?;
        let region = Region::open(region_id, Access::Shared)?;
        check_slice(offset, size, region.len())?;
        Self::new(
            TensorStorage::mapped(region, offset, size),
            size,
            shape,
            dtype,
        )
    }

    /// A shared-memory tensor of `size` bytes, shape `[size]`, `U8`, from the allocator.
    pub(crate) fn from_lease(lease: Lease, size: usize) -> Self {
        Self {
            storage: TensorStorage::allocated(lease, size),
            shape: vec![size],
            strides: vec![1],
            dtype: DataType::U8,
        }
    }

    /// A zeroed heap tensor of `size` bytes, shape `[size]`, `U8` (the allocator's fallback).
    pub(crate) fn heap_zeroed(size: usize) -> Self {
        Self {
            storage: TensorStorage::heap(vec![0u8; size]),
            shape: vec![size],
            strides: vec![1],
            dtype: DataType::U8,
        }
    }

    fn new(
        storage: TensorStorage,
        size: usize,
        shape: Vec<usize>,
        dtype: DataType,
    ) -> Result<Self, TensorError> {
        check_size(&shape, dtype, size)?;
        let strides = contiguous_strides(&shape)?;
        Ok(Self {
            storage,
            shape,
            strides,
            dtype,
        })
    }

    /// The same bytes as another shape and data type (no copy); the sizes must match.
    pub fn reshape(self, shape: Vec<usize>, dtype: DataType) -> Result<Self, TensorError> {
        let size = self.storage.len();
        Self::new(self.storage, size, shape, dtype)
    }

    /// Where the bytes live; for a shared-memory tensor, the region id to hand to another
    /// process.
    pub fn storage(&self) -> &TensorStorage {
        &self.storage
    }

    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// C-contiguous strides, in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// The element type.
    pub fn dtype(&self) -> DataType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.storage.len() / self.dtype.size_bytes()
    }

    /// True for a tensor with no elements.
    pub fn is_empty(&self) -> bool {
        self.storage.len() == 0
    }

    /// Size in bytes.
    pub fn byte_len(&self) -> usize {
        self.storage.len()
    }

    /// The tensor's bytes: a view of the heap buffer or the mapping, never a copy.
    pub fn as_bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// The tensor's bytes, writable. For shared memory, writes land in the region itself.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.storage.bytes_mut()
    }

    /// The elements as `T` (no copy). Fails if `T` is not the tensor's data type, or if the
    /// bytes are not aligned for `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T], TensorError> {
        self.check_view::<T>(self.as_bytes())?;
        bytemuck::try_cast_slice(self.as_bytes()).map_err(|_| self.misaligned::<T>())
    }

    /// The elements as `T`, writable (no copy); the same checks as [`TensorBuffer::as_slice`].
    pub fn as_mut_slice_of<T: Element>(&mut self) -> Result<&mut [T], TensorError> {
        self.check_view::<T>(self.as_bytes())?;
        let misaligned = self.misaligned::<T>();
        bytemuck::try_cast_slice_mut(self.storage.bytes_mut()).map_err(|_| misaligned)
    }

    /// The elements as `bool`: checks that every byte is 0 or 1 (a `bool` with any other value
    /// is undefined behaviour), then views them without copying.
    pub fn as_bool_slice(&self) -> Result<&[bool], TensorError> {
        if self.dtype != DataType::Bool {
            return Err(TensorError::DtypeMismatch {
                requested: DataType::Bool,
                actual: self.dtype,
            });
        }
        let bytes = self.as_bytes();
        bytemuck::checked::try_cast_slice(bytes).map_err(|_| {
            // Only an invalid byte can fail a cast from bytes to bool; find it for the message.
            let index = bytes.iter().position(|&b| b > 1).unwrap_or(0);
            TensorError::InvalidBool {
                index,
                value: bytes.get(index).copied().unwrap_or(0),
            }
        })
    }

    fn check_view<T: Element>(&self, bytes: &[u8]) -> Result<(), TensorError> {
        if T::DTYPE != self.dtype {
            return Err(TensorError::DtypeMismatch {
                requested: T::DTYPE,
                actual: self.dtype,
            });
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return Err(self.misaligned::<T>());
        }
        Ok(())
    }

    fn misaligned<T: Element>(&self) -> TensorError {
        TensorError::Misaligned {
            dtype: T::DTYPE,
            align: std::mem::align_of::<T>(),
        }
    }
}

macro_rules! typed_views {
    ($($name:ident => $ty:ty),* $(,)?) => {
        impl TensorBuffer {$(
            #[doc = concat!("The elements as `", stringify!($ty), "` (no copy); see [`TensorBuffer::as_slice`].")]
            pub fn $name(&self) -> Result<&[$ty], TensorError> {
                self.as_slice::<$ty>()
            }
        )*}
    };
}

typed_views!(
    as_f64_slice => f64,
    as_f32_slice => f32,
    as_f16_slice => f16,
    as_bf16_slice => bf16,
    as_i8_slice => i8,
    as_i16_slice => i16,
    as_i32_slice => i32,
    as_i64_slice => i64,
    as_u8_slice => u8,
    as_u16_slice => u16,
    as_u32_slice => u32,
    as_u64_slice => u64,
);

#[cfg(test)]
mod tests;
