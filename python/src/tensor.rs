//! `TensorBuffer`, `DataType`, `SharedMemoryAllocator` and `AllocatorConfig` for Python.
//!
//! A Python `TensorBuffer` holds its bytes behind an `Arc`: each NumPy array or torch tensor
//! exported from it (through DLPack) holds a clone, so the heap buffer or shared-memory mapping
//! lives as long as the last view of it, whatever happens to the Python `TensorBuffer`.

use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use remotemedia_runtime_core::shm::AllocatorConfig as AllocatorConfigCore;
use remotemedia_runtime_core::tensor::{self as core, TensorError, check_size};

use crate::dlpack::{self, CPU_DEVICE_TYPE, ForeignTensor};
use crate::errors::{self, Kind};
use crate::registry::seconds;

/// The element type of a tensor.
#[pyclass(
    name = "DataType",
    module = "remotemedia.core",
    eq,
    eq_int,
    frozen,
    hash,
    from_py_object
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum DataType {
    F64,
    F32,
    F16,
    BF16,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    #[pyo3(name = "BOOL")]
    Bool,
}

impl From<DataType> for core::DataType {
    fn from(dtype: DataType) -> Self {
        match dtype {
            DataType::F64 => Self::F64,
            DataType::F32 => Self::F32,
            DataType::F16 => Self::F16,
            DataType::BF16 => Self::BF16,
            DataType::I8 => Self::I8,
            DataType::I16 => Self::I16,
            DataType::I32 => Self::I32,
            DataType::I64 => Self::I64,
            DataType::U8 => Self::U8,
            DataType::U16 => Self::U16,
            DataType::U32 => Self::U32,
            DataType::U64 => Self::U64,
            DataType::Bool => Self::Bool,
        }
    }
}

impl From<core::DataType> for DataType {
    fn from(dtype: core::DataType) -> Self {
        match dtype {
            core::DataType::F64 => Self::F64,
            core::DataType::F32 => Self::F32,
            core::DataType::F16 => Self::F16,
            core::DataType::BF16 => Self::BF16,
            core::DataType::I8 => Self::I8,
            core::DataType::I16 => Self::I16,
            core::DataType::I32 => Self::I32,
            core::DataType::I64 => Self::I64,
            core::DataType::U8 => Self::U8,
            core::DataType::U16 => Self::U16,
            core::DataType::U32 => Self::U32,
            core::DataType::U64 => Self::U64,
            core::DataType::Bool => Self::Bool,
        }
    }
}

#[pymethods]
impl DataType {
    /// Bytes per element.
    #[getter]
    fn size_bytes(&self) -> usize {
        core::DataType::from(*self).size_bytes()
    }

    /// Triton's (KServe v2's) name of the type, e.g. "FP32".
    #[getter]
    fn triton_name(&self) -> &'static str {
        core::DataType::from(*self).triton_name()
    }
}

/// The bytes a Python `TensorBuffer` stands for.
enum Bytes {
    /// core's tensor: on the heap, or in shared memory (allocated here or opened by id).
    Core(core::TensorBuffer),
    /// Another library's CPU tensor, viewed in place.
    Foreign(ForeignTensor),
}

impl Bytes {
    fn shape(&self) -> &[usize] {
        match self {
            Bytes::Core(tensor) => tensor.shape(),
            Bytes::Foreign(tensor) => tensor.shape(),
        }
    }

    fn dtype(&self) -> core::DataType {
        match self {
            Bytes::Core(tensor) => tensor.dtype(),
            Bytes::Foreign(tensor) => tensor.dtype(),
        }
    }

    fn byte_len(&self) -> usize {
        match self {
            Bytes::Core(tensor) => tensor.byte_len(),
            Bytes::Foreign(tensor) => tensor.len(),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Bytes::Core(tensor) => tensor.as_bytes(),
            Bytes::Foreign(tensor) => tensor.bytes(),
        }
    }

    fn as_mut_bytes(&mut self) -> &mut [u8] {
        match self {
            Bytes::Core(tensor) => tensor.as_mut_slice(),
            Bytes::Foreign(tensor) => tensor.bytes_mut(),
        }
    }

    /// Where the bytes start, for writing through a view; it never changes for one `Bytes`.
    fn data_ptr(&mut self) -> *mut u8 {
        match self {
            Bytes::Core(tensor) => tensor.as_mut_slice().as_mut_ptr(),
            Bytes::Foreign(tensor) => tensor.data_ptr(),
        }
    }

    fn shared(&self) -> Option<&core::TensorStorage> {
        match self {
            Bytes::Core(tensor) if tensor.storage().is_shared() => Some(tensor.storage()),
            Bytes::Core(_) | Bytes::Foreign(_) => None,
        }
    }

    /// Views the same bytes as `shape` and `dtype`; the sizes must match.
    fn set_layout(&mut self, shape: Vec<usize>, dtype: core::DataType) -> Result<(), TensorError> {
        check_size(&shape, dtype, self.byte_len())?;
        match self {
            Bytes::Core(tensor) => {
                // core's reshape consumes the tensor; the placeholder is an empty heap tensor.
                let placeholder = core::TensorBuffer::from_bytes(Vec::new(), vec![0], dtype)?;
                let tensor_now = std::mem::replace(tensor, placeholder);
                *tensor = tensor_now.reshape(shape, dtype)?;
                Ok(())
            }
            Bytes::Foreign(tensor) => tensor.set_layout(shape, dtype),
        }
    }
}

type Held = Arc<Mutex<Bytes>>;

fn lock(held: &Held) -> MutexGuard<'_, Bytes> {
    // Nothing that can panic runs under this lock; a poisoned lock still guards valid bytes.
    held.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Imports any object with `__dlpack__` as a view of its bytes, checking that it is on the CPU.
fn import_dlpack(object: &Bound<'_, PyAny>) -> PyResult<ForeignTensor> {
    let py = object.py();
    if !object.hasattr("__dlpack__")? {
        return Err(errors::raise(
            Kind::Tensor,
            format!(
                "failed to import tensor: a {} does not implement __dlpack__",
                object.get_type().name()?
            ),
        ));
    }
    let (device_type, device_id): (i32, i32) =
        object.call_method0("__dlpack_device__")?.extract()?;
    if device_type != CPU_DEVICE_TYPE {
        return Err(errors::raise(
            Kind::Tensor,
            format!(
                "failed to import tensor: it is on DLPack device {device_type}:{device_id}, and only CPU tensors are supported; move it to the CPU first"
            ),
        ));
    }
    // DLPack 1.0 first (it can say "read-only", so NumPy exports read-only arrays through it);
    // producers older than the keyword answer TypeError, and get the unversioned request.
    let kwargs = PyDict::new(py);
    kwargs.set_item("max_version", dlpack::DLPACK_VERSION)?;
    let capsule = match object.call_method("__dlpack__", (), Some(&kwargs)) {
        Ok(capsule) => capsule,
        Err(error) if error.is_instance_of::<PyTypeError>(py) => {
            object.call_method0("__dlpack__")?
        }
        Err(error) => return Err(error),
    };
    ForeignTensor::consume(&capsule)
}

/// [`import_dlpack`] for a view kept in a `TensorBuffer`, which needs writable memory.
fn import_view(object: &Bound<'_, PyAny>, hint: &str) -> PyResult<ForeignTensor> {
    let view = import_dlpack(object)?;
    if view.read_only() {
        return Err(errors::raise(
            Kind::Tensor,
            format!("failed to view the tensor in place: it is read-only; {hint}"),
        ));
    }
    Ok(view)
}

/// The default allocator of `to_shared_memory()` without one: core's default limits.
static DEFAULT_ALLOCATOR: LazyLock<core::SharedMemoryAllocator> =
    LazyLock::new(|| core::SharedMemoryAllocator::new(Default::default()));

/// A dense, C-contiguous tensor on the heap, in shared memory, or viewed in place from NumPy or
/// torch.
#[pyclass(name = "TensorBuffer", module = "remotemedia.core")]
pub(crate) struct TensorBuffer {
    /// `None` once freed.
    held: Option<Held>,
}

impl TensorBuffer {
    fn new(bytes: Bytes) -> Self {
        Self {
            held: Some(Arc::new(Mutex::new(bytes))),
        }
    }

    /// A Python tensor over core's tensor (a client's answer).
    pub(crate) fn from_core(tensor: core::TensorBuffer) -> Self {
        Self::new(Bytes::Core(tensor))
    }

    fn held(&self) -> PyResult<&Held> {
        self.held
            .as_ref()
            .ok_or_else(|| errors::raise(Kind::Tensor, "failed to use tensor: it was freed"))
    }
}

/// core's tensor of the same bytes, for the model-worker client, which takes its inputs by value:
/// a tensor in shared memory is opened again by region id (a second mapping of the same pages, so
/// the client can send it by reference); any other tensor, and any array NumPy accepts, is copied
/// once to the heap, as the bytes it sends inline.
pub(crate) fn to_core(object: &Bound<'_, PyAny>) -> PyResult<core::TensorBuffer> {
    if let Ok(tensor) = object.cast::<TensorBuffer>() {
        let tensor = tensor.borrow();
        let bytes = lock(tensor.held()?);
        let shape = bytes.shape().to_vec();
        let dtype = bytes.dtype();
        return match bytes.shared() {
            Some(storage) => {
                let region_id = storage.region_id().map_err(errors::tensor_error)?;
                core::TensorBuffer::from_shared_memory(
                    region_id.as_str(),
                    storage.offset(),
                    bytes.byte_len(),
                    shape,
                    dtype,
                )
            }
            None => core::TensorBuffer::copy_from_bytes(bytes.as_bytes(), shape, dtype),
        }
        .map_err(errors::tensor_error);
    }
    let view = import_dlpack(&contiguous_numpy(object)?)?;
    core::TensorBuffer::copy_from_bytes(view.bytes(), view.shape().to_vec(), view.dtype())
        .map_err(errors::tensor_error)
}

/// Makes `data` a C-contiguous NumPy array (a copy only if it was not), for copying from.
fn contiguous_numpy<'py>(data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    data.py()
        .import("numpy")?
        .call_method1("ascontiguousarray", (data,))
}

#[pymethods]
impl TensorBuffer {
    /// `TensorBuffer.from_numpy(array, zero_copy=True)` builds a tensor from an array;
    /// `tensor.from_numpy(array)` copies an array into an existing tensor.
    #[classattr]
    fn from_numpy() -> FromNumpy {
        FromNumpy
    }

    /// A tensor of the array's shape and dtype: a view of its memory (`zero_copy=True`, which
    /// needs a writable C-contiguous array), or a copy on the heap.
    #[staticmethod]
    #[pyo3(signature = (data, zero_copy = true))]
    fn _new_from_numpy(data: &Bound<'_, PyAny>, zero_copy: bool) -> PyResult<Self> {
        if zero_copy {
            let view = import_view(data, "pass zero_copy=False to copy it")?;
            return Ok(Self::new(Bytes::Foreign(view)));
        }
        let view = import_dlpack(&contiguous_numpy(data)?)?;
        let copy =
            core::TensorBuffer::copy_from_bytes(view.bytes(), view.shape().to_vec(), view.dtype())
                .map_err(errors::tensor_error)?;
        Ok(Self::new(Bytes::Core(copy)))
    }

    /// Copies `data` into this tensor's memory (one copy) and takes on its shape and dtype; the
    /// array must have exactly as many bytes as the tensor.
    fn copy_from_numpy(&mut self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let source = import_dlpack(&contiguous_numpy(data)?)?;
        let mut target = lock(self.held()?);
        let (have, need) = (target.byte_len(), source.len());
        if need > have {
            return Err(errors::raise(
                Kind::Tensor,
                format!(
                    "failed to copy array into tensor: the array has {need} bytes, more than the tensor's {have}"
                ),
            ));
        }
        if need < have {
            return Err(errors::raise(
                Kind::Tensor,
                format!(
                    "failed to copy array into tensor: the array has {need} bytes, fewer than the tensor's {have}; allocate a tensor of the array's size"
                ),
            ));
        }
        target.as_mut_bytes().copy_from_slice(source.bytes());
        target
            .set_layout(source.shape().to_vec(), source.dtype())
            .map_err(errors::tensor_error)
    }

    /// A view of another library's CPU tensor (torch, NumPy, anything with `__dlpack__`),
    /// without copying.
    #[staticmethod]
    fn from_dlpack(tensor: &Bound<'_, PyAny>) -> PyResult<Self> {
        let view = import_view(tensor, "copy it first")?;
        Ok(Self::new(Bytes::Foreign(view)))
    }

    /// Maps `size` bytes at `offset` of the shared-memory region `region_id` (from this or
    /// another process) as a tensor of `shape` and `dtype`, without copying.
    #[staticmethod]
    #[pyo3(signature = (region_id, offset, size, shape, dtype))]
    fn from_shared_memory(
        region_id: &str,
        offset: usize,
        size: usize,
        shape: Vec<usize>,
        dtype: DataType,
    ) -> PyResult<Self> {
        core::TensorBuffer::from_shared_memory(region_id, offset, size, shape, dtype.into())
            .map(|tensor| Self::new(Bytes::Core(tensor)))
            .map_err(errors::tensor_error)
    }

    /// A NumPy array over the tensor's memory (no copy); it keeps the memory alive.
    fn to_numpy<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.py()
            .import("numpy")?
            .call_method1("from_dlpack", (slf,))
    }

    /// The DLPack export: a capsule over the tensor's memory that keeps it alive. Accepts the
    /// keywords NumPy 2 and torch pass; `copy=True` exports a copy.
    #[pyo3(signature = (stream = None, *, max_version = None, dl_device = None, copy = None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        // DLPack 1.0's capsule for those who accept it: NumPy views unversioned ones read-only.
        let versioned = max_version.is_some_and(|(major, _)| major >= dlpack::DLPACK_VERSION.0);
        if let Some(stream) = stream
            && !stream.is_none()
        {
            return Err(PyBufferError::new_err(
                "failed to export tensor: stream must be None for a CPU tensor",
            ));
        }
        if let Some(device) = dl_device
            && device != (CPU_DEVICE_TYPE, 0)
        {
            return Err(PyBufferError::new_err(format!(
                "failed to export tensor to DLPack device {}:{}: it is on the CPU",
                device.0, device.1
            )));
        }
        let held = self.held()?;
        let mut bytes = lock(held);
        let shape = bytes.shape().to_vec();
        let dtype = bytes.dtype();
        if copy == Some(true) {
            let copy = core::TensorBuffer::copy_from_bytes(bytes.as_bytes(), shape.clone(), dtype)
                .map_err(errors::tensor_error)?;
            drop(bytes);
            let copy: Held = Arc::new(Mutex::new(Bytes::Core(copy)));
            let data = lock(&copy).data_ptr();
            return dlpack::export(py, data, &shape, dtype, Box::new(copy), versioned);
        }
        let data = bytes.data_ptr();
        drop(bytes);
        dlpack::export(
            py,
            data,
            &shape,
            dtype,
            Box::new(Arc::clone(held)),
            versioned,
        )
    }

    /// `(kDLCPU, 0)`: tensors live in CPU memory.
    fn __dlpack_device__(&self) -> (i32, i32) {
        (CPU_DEVICE_TYPE, 0)
    }

    /// Moves the tensor into shared memory (one copy, unless it is there already) and returns
    /// the region id another process passes to `from_shared_memory`. The region lives as long
    /// as this tensor (or a view of it).
    #[pyo3(signature = (allocator = None, session_id = None))]
    // The Python name: it converts the tensor in place, hence `&mut self`.
    #[allow(clippy::wrong_self_convention)]
    fn to_shared_memory(
        &mut self,
        allocator: Option<PyRef<'_, SharedMemoryAllocator>>,
        session_id: Option<&str>,
    ) -> PyResult<String> {
        let held = self.held()?;
        let bytes = lock(held);
        if let Some(storage) = bytes.shared() {
            return Ok(storage.region_id().map_err(errors::tensor_error)?.into());
        }
        let allocator = match &allocator {
            Some(allocator) => &allocator.allocator,
            None => &*DEFAULT_ALLOCATOR,
        };
        let mut shared = allocator
            .allocate_tensor(bytes.byte_len(), session_id)
            .map_err(errors::shm_error)?;
        shared.as_mut_slice().copy_from_slice(bytes.as_bytes());
        let shared = shared
            .reshape(bytes.shape().to_vec(), bytes.dtype())
            .map_err(errors::tensor_error)?;
        let region_id = shared.storage().region_id().map_err(errors::tensor_error)?;
        drop(bytes);
        self.held = Some(Arc::new(Mutex::new(Bytes::Core(shared))));
        Ok(region_id.into())
    }

    /// Dimensions, outermost first.
    #[getter]
    fn shape<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, lock(self.held()?).shape())
    }

    /// The element type.
    #[getter]
    fn dtype(&self) -> PyResult<DataType> {
        Ok(lock(self.held()?).dtype().into())
    }

    /// Size in bytes.
    #[getter]
    fn nbytes(&self) -> PyResult<usize> {
        Ok(lock(self.held()?).byte_len())
    }

    /// Number of dimensions.
    #[getter]
    fn ndim(&self) -> PyResult<usize> {
        Ok(lock(self.held()?).shape().len())
    }

    /// True when the bytes are in shared memory.
    #[getter]
    fn is_shared(&self) -> PyResult<bool> {
        Ok(lock(self.held()?).shared().is_some())
    }

    /// The shared-memory region's id, or None for a tensor not in shared memory.
    #[getter]
    fn region_id(&self) -> PyResult<Option<String>> {
        lock(self.held()?)
            .shared()
            .map(|storage| storage.region_id().map(String::from))
            .transpose()
            .map_err(errors::tensor_error)
    }

    /// Where the bytes start inside the region (0 when not opened at an offset).
    #[getter]
    fn offset(&self) -> PyResult<usize> {
        Ok(lock(self.held()?)
            .shared()
            .map_or(0, core::TensorStorage::offset))
    }

    /// True once `free()` ran (or the `with` block ended).
    #[getter]
    fn freed(&self) -> bool {
        self.held.is_none()
    }

    /// Lets go of the memory now: an allocator's region goes back to its pool once no NumPy
    /// array or torch tensor exported from this tensor still uses it. Using the tensor afterwards
    /// raises TensorError; freeing twice does nothing.
    fn free(&mut self) {
        self.held = None;
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&mut self, _exc: &Bound<'_, PyTuple>) {
        self.free();
    }

    fn __repr__(&self) -> String {
        match &self.held {
            None => "TensorBuffer(freed)".to_owned(),
            Some(held) => {
                let bytes = lock(held);
                let place = match bytes.shared() {
                    Some(_) => "shared",
                    None if matches!(*bytes, Bytes::Foreign(_)) => "view",
                    None => "heap",
                };
                format!(
                    "TensorBuffer(shape={:?}, dtype={}, nbytes={}, {place})",
                    bytes.shape(),
                    bytes.dtype(),
                    bytes.byte_len()
                )
            }
        }
    }
}

/// `TensorBuffer.from_numpy`: a constructor on the class, a copy into the tensor on an instance.
#[pyclass(name = "_FromNumpy", module = "remotemedia.core", frozen)]
struct FromNumpy;

#[pymethods]
impl FromNumpy {
    fn __get__<'py>(
        &self,
        instance: Option<Bound<'py, PyAny>>,
        owner: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match (instance, owner) {
            (Some(instance), _) if !instance.is_none() => instance.getattr("copy_from_numpy"),
            (_, Some(owner)) => owner.getattr("_new_from_numpy"),
            _ => Err(pyo3::exceptions::PyTypeError::new_err(
                "failed to bind from_numpy: neither an instance nor a class was given",
            )),
        }
    }
}

/// Limits and housekeeping of a `SharedMemoryAllocator`.
#[pyclass(name = "AllocatorConfig", module = "remotemedia.core", frozen)]
pub(crate) struct AllocatorConfig {
    config: AllocatorConfigCore,
}

#[pymethods]
impl AllocatorConfig {
    #[new]
    #[pyo3(signature = (
        max_memory_bytes = 1 << 30,
        per_session_quota = 256 << 20,
        cleanup_interval_seconds = 60.0,
        allow_heap_fallback = false,
    ))]
    fn new(
        max_memory_bytes: u64,
        per_session_quota: u64,
        cleanup_interval_seconds: f64,
        allow_heap_fallback: bool,
    ) -> PyResult<Self> {
        Ok(Self {
            config: AllocatorConfigCore {
                max_memory_bytes,
                per_session_quota,
                cleanup_interval: seconds("cleanup_interval_seconds", cleanup_interval_seconds)?,
                allow_heap_fallback,
            },
        })
    }

    #[getter]
    fn max_memory_bytes(&self) -> u64 {
        self.config.max_memory_bytes
    }

    #[getter]
    fn per_session_quota(&self) -> u64 {
        self.config.per_session_quota
    }

    #[getter]
    fn cleanup_interval_seconds(&self) -> f64 {
        self.config.cleanup_interval.as_secs_f64()
    }

    #[getter]
    fn allow_heap_fallback(&self) -> bool {
        self.config.allow_heap_fallback
    }

    fn __repr__(&self) -> String {
        format!(
            "AllocatorConfig(max_memory_bytes={}, per_session_quota={}, cleanup_interval_seconds={}, allow_heap_fallback={})",
            self.config.max_memory_bytes,
            self.config.per_session_quota,
            self.config.cleanup_interval.as_secs_f64(),
            if self.config.allow_heap_fallback {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// A snapshot of an allocator's books.
#[pyclass(name = "AllocatorStats", module = "remotemedia.core", frozen, get_all)]
pub(crate) struct AllocatorStats {
    in_use_bytes: u64,
    regions_created: u64,
    pool_hits: u64,
    pooled_regions: usize,
}

/// Hands out shared-memory tensors, one region each, within a total limit and per-session
/// quotas.
#[pyclass(name = "SharedMemoryAllocator", module = "remotemedia.core", frozen)]
pub(crate) struct SharedMemoryAllocator {
    allocator: core::SharedMemoryAllocator,
}

#[pymethods]
impl SharedMemoryAllocator {
    #[new]
    #[pyo3(signature = (config = None))]
    fn new(config: Option<PyRef<'_, AllocatorConfig>>) -> Self {
        let config = config.map_or_else(Default::default, |config| config.config.clone());
        Self {
            allocator: core::SharedMemoryAllocator::new(config),
        }
    }

    /// A zeroed shared-memory tensor of `size` bytes (shape `(size,)`, `DataType.U8`), charged
    /// to `session_id` if given. `tensor.from_numpy(array)` fills it and takes the array's shape.
    #[pyo3(signature = (size, session_id = None))]
    fn allocate_tensor(&self, size: usize, session_id: Option<&str>) -> PyResult<TensorBuffer> {
        self.allocator
            .allocate_tensor(size, session_id)
            .map(|tensor| TensorBuffer::new(Bytes::Core(tensor)))
            .map_err(errors::shm_error)
    }

    /// `allocate_tensor` for a `with` block, which frees the tensor when it ends.
    #[pyo3(signature = (size, session_id = None))]
    fn tensor(&self, size: usize, session_id: Option<&str>) -> PyResult<TensorBuffer> {
        self.allocate_tensor(size, session_id)
    }

    /// Bytes held now by `session_id`'s live tensors.
    fn session_usage(&self, session_id: &str) -> u64 {
        self.allocator.session_usage(session_id)
    }

    /// The allocator's books.
    fn stats(&self) -> AllocatorStats {
        let stats = self.allocator.stats();
        AllocatorStats {
            in_use_bytes: stats.in_use_bytes,
            regions_created: stats.regions_created,
            pool_hits: stats.pool_hits,
            pooled_regions: stats.pooled_regions,
        }
    }
}

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<DataType>()?;
    module.add_class::<TensorBuffer>()?;
    module.add_class::<AllocatorConfig>()?;
    module.add_class::<AllocatorStats>()?;
    module.add_class::<SharedMemoryAllocator>()?;
    Ok(())
}
