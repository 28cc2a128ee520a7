//! DLPack on CPU, both ways: the C structures, exporting tensor bytes in a capsule, and taking
//! ownership of a capsule another library (NumPy, torch) exported.
//!
//! This is the crate's only `unsafe` code: DLPack is a C ABI of raw pointers and destructor
//! callbacks, and Python capsules are reached through the C API. The protocol (DLPack's
//! `dlpack.h` and the Python array API's `__dlpack__`): the producer returns a capsule named
//! `"dltensor"` holding a `DLManagedTensor*`; a consumer renames it `"used_dltensor"` and from then
//! on owns it, calling its `deleter` once when done; a capsule that was never consumed calls the
//! deleter from its own destructor. DLPack 1.0 added a versioned capsule (`"dltensor_versioned"`,
//! with a read-only flag); consumers that ask for it (`max_version >= (1, 0)`) get it, others the
//! unversioned kind. NumPy marks arrays from unversioned capsules read-only, hence both.
#![allow(unsafe_code)]

use std::any::Any;
use std::ffi::{CStr, c_void};
use std::ptr::NonNull;

use pyo3::ffi;
use pyo3::prelude::*;
use remotemedia_runtime_core::tensor::{DataType, TensorError, byte_size, contiguous_strides};

use crate::errors::{self, Kind};

/// `kDLCPU`: the only device we export or import.
pub(crate) const CPU_DEVICE_TYPE: i32 = 1;
const CAPSULE_NAME: &CStr = c"dltensor";
const USED_CAPSULE_NAME: &CStr = c"used_dltensor";
const VERSIONED_CAPSULE_NAME: &CStr = c"dltensor_versioned";
const USED_VERSIONED_CAPSULE_NAME: &CStr = c"used_dltensor_versioned";
/// The DLPack version of the versioned structures below.
pub(crate) const DLPACK_VERSION: (u32, u32) = (1, 0);
/// `DLPACK_FLAG_BITMASK_READ_ONLY`.
const FLAG_READ_ONLY: u64 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    /// Null means C-contiguous.
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

#[repr(C)]
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

// DLPack's type codes.
const INT: u8 = 0;
const UINT: u8 = 1;
const FLOAT: u8 = 2;
const BFLOAT: u8 = 4;
const BOOL: u8 = 6;

fn to_dl_dtype(dtype: DataType) -> DLDataType {
    let code = match dtype {
        DataType::F64 | DataType::F32 | DataType::F16 => FLOAT,
        DataType::BF16 => BFLOAT,
        DataType::I8 | DataType::I16 | DataType::I32 | DataType::I64 => INT,
        DataType::U8 | DataType::U16 | DataType::U32 | DataType::U64 => UINT,
        DataType::Bool => BOOL,
    };
    DLDataType {
        code,
        // Every DataType is at most 8 bytes: 64 bits fit in a u8.
        bits: (dtype.size_bytes() * 8) as u8,
        lanes: 1,
    }
}

fn from_dl_dtype(dtype: DLDataType) -> Option<DataType> {
    DataType::ALL
        .into_iter()
        .find(|candidate| to_dl_dtype(*candidate) == dtype)
}

/// What keeps an export's metadata and bytes alive until the consumer calls its deleter.
struct ExportParts {
    shape: Vec<i64>,
    strides: Vec<i64>,
    _owner: Box<dyn Any + Send>,
}

/// What an unversioned capsule points to. `managed` comes first, so a pointer to the managed
/// tensor is a pointer to the whole export, which its deleter frees.
#[repr(C)]
struct LegacyExport {
    managed: DLManagedTensor,
    parts: ExportParts,
}

/// What a versioned capsule points to; laid out like [`LegacyExport`].
#[repr(C)]
struct VersionedExport {
    managed: DLManagedTensorVersioned,
    parts: ExportParts,
}

/// A capsule over the bytes at `data`, of `shape` and `dtype`, kept valid by `owner` until the
/// consumer is done with it; versioned when the consumer accepts DLPack 1.0.
///
/// The caller guarantees that `data` points to `byte_size(shape, dtype)` bytes that stay valid and
/// writable while `owner` lives.
pub(crate) fn export<'py>(
    py: Python<'py>,
    data: *mut u8,
    shape: &[usize],
    dtype: DataType,
    owner: Box<dyn Any + Send>,
    versioned: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let as_i64 = |values: Vec<usize>| -> PyResult<Vec<i64>> {
        values
            .into_iter()
            .map(|value| {
                i64::try_from(value).map_err(|_| {
                    errors::raise(
                        Kind::Tensor,
                        format!("failed to export tensor: dimension {value} does not fit DLPack"),
                    )
                })
            })
            .collect()
    };
    let ndim = i32::try_from(shape.len())
        .map_err(|_| errors::raise(Kind::Tensor, "failed to export tensor: too many dimensions"))?;
    let mut parts = ExportParts {
        shape: as_i64(shape.to_vec())?,
        strides: as_i64(contiguous_strides(shape).map_err(errors::tensor_error)?)?,
        _owner: owner,
    };
    // The vectors' buffers do not move when `parts` does, so these pointers stay valid.
    let dl_tensor = DLTensor {
        data: data.cast(),
        device: DLDevice {
            device_type: CPU_DEVICE_TYPE,
            device_id: 0,
        },
        ndim,
        dtype: to_dl_dtype(dtype),
        shape: parts.shape.as_mut_ptr(),
        strides: parts.strides.as_mut_ptr(),
        byte_offset: 0,
    };
    let (pointer, name, free): (*mut c_void, &'static CStr, fn(*mut c_void)) = if versioned {
        let export = Box::into_raw(Box::new(VersionedExport {
            managed: DLManagedTensorVersioned {
                version: DLPackVersion {
                    major: DLPACK_VERSION.0,
                    minor: DLPACK_VERSION.1,
                },
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_versioned_export),
                flags: 0,
                dl_tensor,
            },
            parts,
        }));
        // SAFETY: `export` is a live, uniquely owned allocation; storing its address in it is fine.
        unsafe { (*export).managed.manager_ctx = export.cast() };
        (export.cast(), VERSIONED_CAPSULE_NAME, |export| {
            // SAFETY: called only below, for the box made just above, when no capsule took it.
            drop(unsafe { Box::from_raw(export.cast::<VersionedExport>()) })
        })
    } else {
        let export = Box::into_raw(Box::new(LegacyExport {
            managed: DLManagedTensor {
                dl_tensor,
                manager_ctx: std::ptr::null_mut(),
                deleter: Some(delete_legacy_export),
            },
            parts,
        }));
        // SAFETY: as above.
        unsafe { (*export).managed.manager_ctx = export.cast() };
        (export.cast(), CAPSULE_NAME, |export| {
            // SAFETY: as above.
            drop(unsafe { Box::from_raw(export.cast::<LegacyExport>()) })
        })
    };
    // SAFETY: the name is a 'static C string, as PyCapsule_New requires (it keeps the pointer);
    // the pointer is the managed tensor, which stays valid until its deleter runs.
    let capsule = unsafe { ffi::PyCapsule_New(pointer, name.as_ptr(), Some(drop_capsule)) };
    if capsule.is_null() {
        free(pointer);
        return Err(PyErr::fetch(py));
    }
    // SAFETY: PyCapsule_New returned a new (owned) reference.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) })
}

/// The deleter of our unversioned exports.
unsafe extern "C" fn delete_legacy_export(managed: *mut DLManagedTensor) {
    // SAFETY: our managed tensors are the first field of a boxed export (repr(C)), and DLPack
    // calls the deleter exactly once.
    drop(unsafe { Box::from_raw(managed.cast::<LegacyExport>()) });
}

/// The deleter of our versioned exports.
unsafe extern "C" fn delete_versioned_export(managed: *mut DLManagedTensorVersioned) {
    // SAFETY: as in `delete_legacy_export`.
    drop(unsafe { Box::from_raw(managed.cast::<VersionedExport>()) });
}

/// Destructor of the capsules we create: frees the export unless a consumer took it (and renamed
/// the capsule).
unsafe extern "C" fn drop_capsule(capsule: *mut ffi::PyObject) {
    // SAFETY: Python calls capsule destructors with the GIL held and a live capsule; a capsule
    // still valid under its original name holds a managed tensor of that kind that is ours.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, CAPSULE_NAME.as_ptr()) == 1 {
            let managed =
                ffi::PyCapsule_GetPointer(capsule, CAPSULE_NAME.as_ptr()).cast::<DLManagedTensor>();
            if let Some(deleter) = (*managed).deleter {
                deleter(managed);
            }
        } else if ffi::PyCapsule_IsValid(capsule, VERSIONED_CAPSULE_NAME.as_ptr()) == 1 {
            let managed = ffi::PyCapsule_GetPointer(capsule, VERSIONED_CAPSULE_NAME.as_ptr())
                .cast::<DLManagedTensorVersioned>();
            if let Some(deleter) = (*managed).deleter {
                deleter(managed);
            }
        }
    }
}

/// A managed tensor another library handed over, which we must delete once.
#[derive(Debug)]
enum Managed {
    Legacy(NonNull<DLManagedTensor>),
    Versioned(NonNull<DLManagedTensorVersioned>),
}

impl Managed {
    /// Takes the managed tensor out of `capsule` (renaming it, so its destructor leaves it to us).
    fn take(capsule: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = capsule.py();
        let capsule = capsule.as_ptr();
        for (name, used, versioned) in [
            (CAPSULE_NAME, USED_CAPSULE_NAME, false),
            (VERSIONED_CAPSULE_NAME, USED_VERSIONED_CAPSULE_NAME, true),
        ] {
            // SAFETY: PyCapsule_IsValid accepts any object and sets no exception.
            if unsafe { ffi::PyCapsule_IsValid(capsule, name.as_ptr()) } != 1 {
                continue;
            }
            // SAFETY: the capsule is valid under this name, checked just above.
            let pointer = unsafe { ffi::PyCapsule_GetPointer(capsule, name.as_ptr()) };
            let managed = if versioned {
                NonNull::new(pointer.cast()).map(Managed::Versioned)
            } else {
                NonNull::new(pointer.cast()).map(Managed::Legacy)
            }
            .ok_or_else(|| invalid("no managed tensor"))?;
            // SAFETY: a live capsule; the name is a 'static C string.
            if unsafe { ffi::PyCapsule_SetName(capsule, used.as_ptr()) } != 0 {
                return Err(PyErr::fetch(py));
            }
            return Ok(managed);
        }
        Err(errors::raise(
            Kind::Tensor,
            "failed to import tensor: __dlpack__() did not return an unused DLPack capsule",
        ))
    }

    fn dl_tensor(&self) -> &DLTensor {
        // SAFETY: the producer keeps the managed tensor valid until its deleter runs, which only
        // `Drop` calls, after every borrow of self.
        unsafe {
            match self {
                Managed::Legacy(managed) => &managed.as_ref().dl_tensor,
                Managed::Versioned(managed) => &managed.as_ref().dl_tensor,
            }
        }
    }

    fn read_only(&self) -> bool {
        match self {
            Managed::Legacy(_) => false,
            // SAFETY: as in `dl_tensor`.
            Managed::Versioned(managed) => unsafe { managed.as_ref().flags & FLAG_READ_ONLY != 0 },
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        // Producers' deleters (NumPy's, torch's) release Python objects: hold the GIL for them.
        Python::attach(|_| {
            // SAFETY: we own the managed tensor (its capsule was renamed) and this is the one
            // place that deletes it, once, when the `Managed` goes.
            unsafe {
                match self {
                    Managed::Legacy(managed) => {
                        if let Some(deleter) = managed.as_ref().deleter {
                            deleter(managed.as_ptr());
                        }
                    }
                    Managed::Versioned(managed) => {
                        if let Some(deleter) = managed.as_ref().deleter {
                            deleter(managed.as_ptr());
                        }
                    }
                }
            }
        });
    }
}

/// A CPU tensor another library exported, owned until dropped and viewed in place.
#[derive(Debug)]
pub(crate) struct ForeignTensor {
    data: *mut u8,
    len: usize,
    shape: Vec<usize>,
    dtype: DataType,
    read_only: bool,
    // Last: the bytes go (the producer's deleter runs) only after nothing here can refer to them.
    _managed: Managed,
}

// SAFETY: a ForeignTensor is the sole owner of the managed tensor (the capsule was renamed), and
// its deleter is called with the GIL held (see `Managed`'s Drop), whichever thread drops it.
unsafe impl Send for ForeignTensor {}
// SAFETY: `&ForeignTensor` only gives out a shared slice of the bytes and plain metadata.
unsafe impl Sync for ForeignTensor {}

impl ForeignTensor {
    /// Takes ownership of the DLPack capsule `capsule` and checks that it is a C-contiguous CPU
    /// tensor of a supported dtype.
    pub(crate) fn consume(capsule: &Bound<'_, PyAny>) -> PyResult<Self> {
        // From here, dropping `managed` calls the deleter exactly once, whether the checks below
        // pass or not.
        let managed = Managed::take(capsule)?;
        let tensor = managed.dl_tensor();
        let device = tensor.device;
        if device.device_type != CPU_DEVICE_TYPE {
            return Err(errors::raise(
                Kind::Tensor,
                format!(
                    "failed to import tensor: it is on DLPack device {}:{}, and only CPU tensors are supported",
                    device.device_type, device.device_id
                ),
            ));
        }
        let dtype = from_dl_dtype(tensor.dtype).ok_or_else(|| {
            let DLDataType { code, bits, lanes } = tensor.dtype;
            let supported: Vec<String> = DataType::ALL.iter().map(ToString::to_string).collect();
            errors::raise(
                Kind::Tensor,
                format!(
                    "failed to import tensor: unsupported dtype (DLPack code {code}, {bits} bits, {lanes} lanes); supported: {}",
                    supported.join(", ")
                ),
            )
        })?;
        let ndim = usize::try_from(tensor.ndim).map_err(|_| invalid("a negative ndim"))?;
        let dims = if ndim == 0 {
            &[][..]
        } else if tensor.shape.is_null() {
            return Err(invalid("no shape"));
        } else {
            // SAFETY: DLPack's shape points to `ndim` integers, valid while the tensor is.
            unsafe { std::slice::from_raw_parts(tensor.shape, ndim) }
        };
        let shape = dims
            .iter()
            .map(|&dim| usize::try_from(dim).map_err(|_| invalid("a negative dimension")))
            .collect::<PyResult<Vec<usize>>>()?;
        let len = byte_size(&shape, dtype).map_err(errors::tensor_error)?;
        if !tensor.strides.is_null() && len > 0 {
            // SAFETY: non-null strides point to `ndim` integers, valid while the tensor is.
            let strides = unsafe { std::slice::from_raw_parts(tensor.strides, ndim) };
            let contiguous = contiguous_strides(&shape).map_err(errors::tensor_error)?;
            // A dimension of size 1 is never stepped over, so its stride does not matter.
            let is_contiguous = shape.iter().zip(strides.iter().zip(&contiguous)).all(
                |(&dim, (&stride, &expected))| dim == 1 || usize::try_from(stride) == Ok(expected),
            );
            if !is_contiguous {
                return Err(errors::raise(
                    Kind::Tensor,
                    format!(
                        "failed to import tensor: strides {strides:?} of shape {shape:?} are not C-contiguous; make a contiguous copy first"
                    ),
                ));
            }
        }
        let offset = usize::try_from(tensor.byte_offset).map_err(|_| invalid("a huge offset"))?;
        let data = tensor.data.cast::<u8>().wrapping_add(offset);
        if data.is_null() && len > 0 {
            return Err(invalid("a null data pointer"));
        }
        Ok(Self {
            data,
            len,
            shape,
            dtype,
            read_only: managed.read_only(),
            _managed: managed,
        })
    }

    /// True when the producer marked the memory read-only.
    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub(crate) fn dtype(&self) -> DataType {
        self.dtype
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn data_ptr(&self) -> *mut u8 {
        self.data
    }

    /// The tensor's bytes, in place.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `consume` checked that `data` points to `len` bytes of a CPU tensor, which the
        // producer keeps valid until we call its deleter (in Drop, after every borrow of self).
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }

    /// The tensor's bytes, in place and writable.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `bytes`; `&mut self` makes this the only borrow made through us. Callers
        // keep only tensors that are not `read_only` (see tensor.rs), so the memory is writable.
        unsafe { std::slice::from_raw_parts_mut(self.data, self.len) }
    }

    /// Views the same bytes as another shape and dtype.
    pub(crate) fn set_layout(
        &mut self,
        shape: Vec<usize>,
        dtype: DataType,
    ) -> Result<(), TensorError> {
        remotemedia_runtime_core::tensor::check_size(&shape, dtype, self.len)?;
        self.shape = shape;
        self.dtype = dtype;
        Ok(())
    }
}

fn invalid(what: &str) -> PyErr {
    errors::raise(
        Kind::Tensor,
        format!("failed to import tensor: the DLPack tensor has {what}"),
    )
}
