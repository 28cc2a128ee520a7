//! The exceptions `remotemedia.core` raises, and the one place core's errors become them.
//!
//! Each exception derives from `RemoteMediaError` and from the builtins a caller would catch
//! without knowing this package: `ValueError` for bad arguments, `KeyError` and `ValueError` for
//! an unknown region, `MemoryError` for quotas, `OSError` for the system, `RuntimeError` for the
//! registry; for the model-worker client, `ConnectionError` when nothing answered or the
//! connection broke, `TimeoutError` for deadlines, `ValueError` for a bad endpoint. Client
//! exceptions carry `code` (the gRPC status code's name, e.g. "INVALID_ARGUMENT", or None for a
//! failure on this side) and `message` (the server's message, or ours). PyO3's `create_exception!` takes a single base, so the types are built with `type()`.

use std::error::Error;

use pyo3::exceptions::{
    PyBaseException, PyConnectionError, PyKeyError, PyMemoryError, PyOSError, PyRuntimeError,
    PyTimeoutError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use remotemedia_runtime_core::model_registry::RegistryError;
use remotemedia_runtime_core::model_worker::ClientError;
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
    /// A model-worker call failed on this side (not connected, a bad answer, a bad request).
    Client,
    /// The server answered a call with an error status.
    Server,
    /// Nothing answered at the endpoint, after the client's retries.
    WorkerUnavailable,
    /// The connection broke with a request in flight.
    ConnectionLost,
    /// The call's deadline passed.
    DeadlineExceeded,
    /// The endpoint string is not one the client understands.
    InvalidEndpoint,
}

struct Types {
    base: Py<PyType>,
    tensor: Py<PyType>,
    region_not_found: Py<PyType>,
    allocation: Py<PyType>,
    shared_memory: Py<PyType>,
    registry: Py<PyType>,
    client: Py<PyType>,
    server: Py<PyType>,
    worker_unavailable: Py<PyType>,
    connection_lost: Py<PyType>,
    deadline_exceeded: Py<PyType>,
    invalid_endpoint: Py<PyType>,
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
        let client = derived(
            "ModelWorkerError",
            "A model-worker client call failed; `code` is the gRPC status code's name (None for a failure on this side), `message` the reason.",
            py.get_type::<pyo3::exceptions::PyException>(),
        )?;
        let client_derived = |name: &str, doc: &str, builtin: Option<Bound<'_, PyType>>| {
            let mut bases = vec![client.bind(py).clone()];
            bases.extend(builtin);
            new_type(py, name, doc, &bases)
        };
        Ok::<_, PyErr>(Types {
            server: client_derived(
                "ServerError",
                "The server answered with an error status (`code`, `message`).",
                None,
            )?,
            worker_unavailable: client_derived(
                "WorkerUnavailableError",
                "Nothing answered at the endpoint: every attempt to connect failed, so no request reached a server.",
                Some(py.get_type::<PyConnectionError>()),
            )?,
            connection_lost: client_derived(
                "ConnectionLostError",
                "The connection broke with the request in flight: the server may have run it, so it was not sent again.",
                Some(py.get_type::<PyConnectionError>()),
            )?,
            deadline_exceeded: client_derived(
                "DeadlineExceededError",
                "The call's deadline passed (measured here or reported by the server).",
                Some(py.get_type::<PyTimeoutError>()),
            )?,
            invalid_endpoint: client_derived(
                "InvalidEndpointError",
                "The endpoint is not grpc://host[:port] or unix:///path, or none was given and REMOTEMEDIA_SIDECAR is unset.",
                Some(py.get_type::<PyValueError>()),
            )?,
            client,
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
        &types.client,
        &types.server,
        &types.worker_unavailable,
        &types.connection_lost,
        &types.deadline_exceeded,
        &types.invalid_endpoint,
    ] {
        let ty = ty.bind(py);
        module.add(ty.name()?, ty)?;
    }
    Ok(())
}

/// An exception of `kind` carrying `message`.
pub(crate) fn raise(kind: Kind, message: impl Into<String>) -> PyErr {
    let message = message.into();
    raise_with_code(kind, message.clone(), None, message)
}

/// An exception of `kind` reading `text`; client exceptions also get the attributes `code` and
/// `message` (the server's own message when it sent one).
fn raise_with_code(kind: Kind, text: String, code: Option<&str>, message: String) -> PyErr {
    Python::attach(|py| match types(py) {
        Ok(types) => {
            let ty = match kind {
                Kind::Tensor => &types.tensor,
                Kind::RegionNotFound => &types.region_not_found,
                Kind::Allocation => &types.allocation,
                Kind::SharedMemory => &types.shared_memory,
                Kind::Registry => &types.registry,
                Kind::Client => &types.client,
                Kind::Server => &types.server,
                Kind::WorkerUnavailable => &types.worker_unavailable,
                Kind::ConnectionLost => &types.connection_lost,
                Kind::DeadlineExceeded => &types.deadline_exceeded,
                Kind::InvalidEndpoint => &types.invalid_endpoint,
            };
            let error = PyErr::from_type(ty.bind(py).clone(), text);
            let is_client = matches!(
                kind,
                Kind::Client
                    | Kind::Server
                    | Kind::WorkerUnavailable
                    | Kind::ConnectionLost
                    | Kind::DeadlineExceeded
                    | Kind::InvalidEndpoint
            );
            if is_client {
                let value = error.value(py);
                if let Err(error) = value
                    .setattr("code", code)
                    .and_then(|()| value.setattr("message", message))
                {
                    return error;
                }
            }
            error
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

/// A model-worker client error as the Python exception of its kind, with the gRPC status code's
/// canonical name as `code` when the server sent one.
pub(crate) fn client_error(error: ClientError) -> PyErr {
    let error = match error {
        ClientError::Tensor(error) => return tensor_error(error),
        ClientError::Shm(error) => return shm_error(error),
        error => error,
    };
    let (kind, code) = match &error {
        ClientError::InvalidEndpoint { .. } => (Kind::InvalidEndpoint, None),
        ClientError::WorkerUnavailable { .. } => (Kind::WorkerUnavailable, Some("UNAVAILABLE")),
        ClientError::ConnectionLost { .. } => (Kind::ConnectionLost, Some("UNAVAILABLE")),
        ClientError::DeadlineExceeded { .. } => (Kind::DeadlineExceeded, Some("DEADLINE_EXCEEDED")),
        ClientError::InvalidArgument { .. } => (Kind::Server, Some("INVALID_ARGUMENT")),
        ClientError::NotFound { .. } => (Kind::Server, Some("NOT_FOUND")),
        ClientError::AlreadyExists { .. } => (Kind::Server, Some("ALREADY_EXISTS")),
        ClientError::ResourceExhausted { .. } => (Kind::Server, Some("RESOURCE_EXHAUSTED")),
        ClientError::Unavailable { .. } => (Kind::Server, Some("UNAVAILABLE")),
        ClientError::Unimplemented { .. } => (Kind::Server, Some("UNIMPLEMENTED")),
        ClientError::Internal { .. } => (Kind::Server, Some("INTERNAL")),
        ClientError::Cancelled { .. } => (Kind::Server, Some("CANCELLED")),
        ClientError::PermissionDenied { .. } => (Kind::Server, Some("PERMISSION_DENIED")),
        ClientError::FailedPrecondition { .. } => (Kind::Server, Some("FAILED_PRECONDITION")),
        ClientError::Server { code, .. } => (Kind::Server, Some(grpc_code_name(i32::from(*code)))),
        // A stream's request failed: the server reports it without a status code.
        ClientError::Rejected { .. } => (Kind::Server, None),
        _ => (Kind::Client, None),
    };
    let message = match &error {
        ClientError::InvalidArgument { message }
        | ClientError::NotFound { message }
        | ClientError::AlreadyExists { message }
        | ClientError::ResourceExhausted { message }
        | ClientError::Unavailable { message }
        | ClientError::Unimplemented { message }
        | ClientError::Internal { message }
        | ClientError::Cancelled { message }
        | ClientError::PermissionDenied { message }
        | ClientError::FailedPrecondition { message }
        | ClientError::Server { message, .. }
        | ClientError::Rejected { message } => message.clone(),
        _ => describe(&error),
    };
    raise_with_code(kind, describe(&error), code, message)
}

/// gRPC's canonical name of a status code (the codes the typed variants do not cover).
fn grpc_code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        2 => "UNKNOWN",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}
