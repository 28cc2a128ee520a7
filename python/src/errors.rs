//! The exceptions `remotemedia.core` raises, and the one place core's errors become them.
//!
//! Each exception derives from `RemoteMediaError` and from the builtins a caller would catch
//! without knowing this package: `ValueError` for bad arguments, `KeyError` and `ValueError` for
//! an unknown region, `MemoryError` for quotas, `OSError` for the system, `RuntimeError` for the
//! registry. PyO3's `create_exception!` takes a single base, so the types are built with `type()`.

use std::error::Error;

use pyo3::exceptions::{
    PyBaseException, PyKeyError, PyMemoryError, PyOSError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use remotemedia_runtime_core::model_registry::RegistryError;
use remotemedia_runtime_core::shm::broker::ErrorCode;
use remotemedia_runtime_core::tensor::{ShmError, TensorError};

/// Which exception to raise.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    /// Bad shape, dtype, size or offset; a freed tensor; an array that cannot be viewed.
    Tensor,
    /// A region id that names no region.
    RegionNotFound,
    /// A quota, the allocator's limit, or a size no region can have.
    Allocation,
    /// The system refused a shared-memory operation.
    SharedMemory,
    /// The registry could not give a model for another reason than the loader's exception.
    Registry,
}

struct Types {
    base: Py<PyType>,
    tensor: Py<PyType>,
    region_not_found: Py<PyType>,
    allocation: Py<PyType>,
    shared_memory: Py<PyType>,
    registry: Py<PyType>,
}

static TYPES: PyOnceLock<Types> = PyOnceLock::new();

fn types(py: Python<'_>) -> PyResult<&Types> {
    TYPES.get_or_try_init(py, || {
        let base = new_type(
            py,
            "RemoteMediaError",
            "Base of every exception remotemedia.core raises.",
            &[py.get_type::<pyo3::exceptions::PyException>()],
        )?;
        let derived = |name: &str, doc: &str, builtin: Bound<'_, PyType>| {
            new_type(py, name, doc, &[base.bind(py).clone(), builtin])
        };
        Ok::<_, PyErr>(Types {
            tensor: derived(
                "TensorError",
                "A tensor's shape, dtype, size or offset does not fit, or the tensor was freed.",
                py.get_type::<PyValueError>(),
            )?,
            // A KeyError (lookup by id) and a ValueError (a bad argument), so that either
            // `except` a caller might write catches it; KeyError's quoting `__str__` is undone.
            region_not_found: {
                let ty = new_type(
                    py,
                    "RegionNotFoundError",
                    "No shared-memory region has this id (it was freed, or never existed).",
                    &[
                        base.bind(py).clone(),
                        py.get_type::<PyKeyError>(),
                        py.get_type::<PyValueError>(),
                    ],
                )?;
                let plain_str = py.get_type::<PyBaseException>().getattr("__str__")?;
                ty.bind(py).setattr("__str__", plain_str)?;
                ty
            },
            allocation: derived(
                "AllocationError",
                "An allocation would exceed a session quota or the allocator's limit.",
                py.get_type::<PyMemoryError>(),
            )?,
            shared_memory: derived(
                "SharedMemoryError",
                "The system refused a shared-memory operation.",
                py.get_type::<PyOSError>(),
            )?,
            registry: derived(
                "RegistryError",
                "The model registry could not give a model (other than the loader raising).",
                py.get_type::<PyRuntimeError>(),
            )?,
            base,
        })
    })
}

fn new_type(
    py: Python<'_>,
    name: &str,
    doc: &str,
    bases: &[Bound<'_, PyType>],
) -> PyResult<Py<PyType>> {
    let namespace = PyDict::new(py);
    namespace.set_item("__module__", "remotemedia.core")?;
    namespace.set_item("__doc__", doc)?;
    let created = py
        .get_type::<PyType>()
        .call1((name, PyTuple::new(py, bases)?, namespace))?;
    Ok(created.cast_into::<PyType>()?.unbind())
}

/// Adds the exception types to the module.
pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    let types = types(py)?;
    for ty in [
        &types.base,
        &types.tensor,
        &types.region_not_found,
        &types.allocation,
        &types.shared_memory,
        &types.registry,
    ] {
        let ty = ty.bind(py);
        module.add(ty.name()?, ty)?;
    }
    Ok(())
}

/// An exception of `kind` carrying `message`.
pub(crate) fn raise(kind: Kind, message: impl Into<String>) -> PyErr {
    let message = message.into();
    Python::attach(|py| match types(py) {
        Ok(types) => {
            let ty = match kind {
                Kind::Tensor => &types.tensor,
                Kind::RegionNotFound => &types.region_not_found,
                Kind::Allocation => &types.allocation,
                Kind::SharedMemory => &types.shared_memory,
                Kind::Registry => &types.registry,
            };
            PyErr::from_type(ty.bind(py).clone(), message)
        }
        // Only a broken interpreter fails to build the types; keep the message regardless.
        Err(error) => error,
    })
}

/// The message of `error` followed by its sources, so the root cause (an errno) is not lost.
pub(crate) fn describe(error: &dyn Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

pub(crate) fn shm_error(error: ShmError) -> PyErr {
    let kind = match &error {
        ShmError::NotFound { .. } | ShmError::InvalidRegionId { .. } => Kind::RegionNotFound,
        ShmError::QuotaExceeded { .. }
        | ShmError::MemoryLimitExceeded { .. }
        | ShmError::TooLarge { .. } => Kind::Allocation,
        ShmError::EmptyAllocation => Kind::Tensor,
        // With REMOTEMEDIA_SIDECAR set, the node broker answers: same kinds as the named backend.
        ShmError::Broker(broker) => match broker.code() {
            Some(ErrorCode::NotFound) => Kind::RegionNotFound,
            Some(ErrorCode::ResourceExhausted) => Kind::Allocation,
            _ => Kind::SharedMemory,
        },
        _ => Kind::SharedMemory,
    };
    raise(kind, describe(&error))
}

pub(crate) fn tensor_error(error: TensorError) -> PyErr {
    match error {
        TensorError::Shm(error) => shm_error(error),
        error => raise(Kind::Tensor, describe(&error)),
    }
}

/// A registry error as Python sees it: a loader's own exception is re-raised as the very same
/// exception object, so `except MyLoaderError` works in every caller that waited for the load.
pub(crate) fn registry_error(py: Python<'_>, error: RegistryError) -> PyErr {
    if let RegistryError::LoadFailed { source, .. } = &error
        && let Some(loader_error) = source.downcast_ref::<PyErr>()
    {
        return loader_error.clone_ref(py);
    }
    raise(Kind::Registry, describe(&error))
}
