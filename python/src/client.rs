//! `ModelWorkerClient` (asyncio) and `BlockingModelWorkerClient` for Python: thin bindings over
//! core's `ModelWorkerClient`, which chooses each tensor's transport, retries connecting and maps
//! gRPC statuses. Nothing of the protocol is reimplemented here.
//!
//! Calls run on the extension's tokio runtime. The async classes return an `asyncio.Future` of
//! the running loop, completed from the runtime with `call_soon_threadsafe` (cancelling it aborts
//! the call); the blocking classes wait in `block_on` with the GIL released. Both share one
//! implementation ([`Shared`], [`StreamState`]) and differ only in [`Mode`].

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use remotemedia_proto::inference::model_metadata_response::TensorMetadata;
use remotemedia_runtime_core::model_worker::{
    ClientConfig, ClientError, InferOptions, InferOutputs, InferStream, ModelStatus,
    ModelWorkerClient as CoreClient, StreamResponse,
};
use remotemedia_runtime_core::tensor as core;
use tokio::task::AbortHandle;

use crate::errors::{self, client_error};
use crate::registry::seconds;
use crate::tensor::{TensorBuffer, to_core};

/// What a call was given as input: one tensor, or named tensors (a dict).
enum Inputs {
    One(core::TensorBuffer),
    Named(Vec<(String, core::TensorBuffer)>),
}

impl Inputs {
    /// A `TensorBuffer`, anything NumPy can turn into an array, or a dict of those by name.
    fn extract(input: &Bound<'_, PyAny>) -> PyResult<Self> {
        match input.cast::<PyDict>() {
            Ok(named) => named
                .iter()
                .map(|(name, tensor)| Ok((name.extract::<String>()?, to_core(&tensor)?)))
                .collect::<PyResult<_>>()
                .map(Inputs::Named),
            Err(_) => to_core(input).map(Inputs::One),
        }
    }
}

/// What a call answers, before it becomes a Python object (under the GIL).
enum Answer {
    Nothing,
    Healthy(bool),
    One(core::TensorBuffer),
    Named(InferOutputs),
    Status(Box<ModelStatus>),
    Stream(Box<InferStream>, Mode),
    Response(Option<StreamResponse>),
    Sent(u64),
}

impl Answer {
    fn into_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(match self {
            Answer::Nothing | Answer::Response(None) => py.None(),
            Answer::Healthy(ready) => ready.into_pyobject(py)?.to_owned().into_any().unbind(),
            Answer::One(tensor) => Py::new(py, TensorBuffer::from_core(tensor))?.into_any(),
            Answer::Named(outputs) => named_outputs(py, outputs)?.into_any().unbind(),
            Answer::Status(status) => status_dict(py, &status)?.into_any().unbind(),
            Answer::Stream(stream, Mode::Async) => {
                Py::new(py, PyInferStream(StreamState::new(*stream)))?.into_any()
            }
            Answer::Stream(stream, Mode::Blocking) => {
                Py::new(py, BlockingInferStream(StreamState::new(*stream)))?.into_any()
            }
            Answer::Response(Some(StreamResponse { id, result })) => {
                // A request's own failure is raised by the call that returns its answer.
                let outputs = result.map_err(client_error)?;
                let outputs = if outputs.len() == 1 {
                    let (_, tensor) = outputs.into_vec().remove(0);
                    Py::new(py, TensorBuffer::from_core(tensor))?.into_any()
                } else {
                    named_outputs(py, outputs)?.into_any().unbind()
                };
                PyTuple::new(py, [id.into_pyobject(py)?.into_any().unbind(), outputs])?
                    .into_any()
                    .unbind()
            }
            Answer::Sent(id) => id.into_pyobject(py)?.into_any().unbind(),
        })
    }
}

fn named_outputs(py: Python<'_>, outputs: InferOutputs) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    for (name, tensor) in outputs.into_vec() {
        dict.set_item(name, Py::new(py, TensorBuffer::from_core(tensor))?)?;
    }
    Ok(dict)
}

/// The model's metadata and statistics as plain Python values.
fn status_dict<'py>(py: Python<'py>, status: &ModelStatus) -> PyResult<Bound<'py, PyDict>> {
    let tensors = |list: &[TensorMetadata]| -> PyResult<Bound<'py, PyList>> {
        let items = PyList::empty(py);
        for tensor in list {
            let item = PyDict::new(py);
            item.set_item("name", &tensor.name)?;
            item.set_item("datatype", &tensor.datatype)?;
            item.set_item("shape", &tensor.shape)?;
            items.append(item)?;
        }
        Ok(items)
    };
    let metadata = &status.metadata;
    let dict = PyDict::new(py);
    dict.set_item("name", &metadata.name)?;
    dict.set_item("versions", &metadata.versions)?;
    dict.set_item("platform", &metadata.platform)?;
    dict.set_item("inputs", tensors(&metadata.inputs)?)?;
    dict.set_item("outputs", tensors(&metadata.outputs)?)?;
    let statistics = match &status.statistics {
        None => None,
        Some(stats) => {
            let item = PyDict::new(py);
            item.set_item("inference_count", stats.inference_count)?;
            item.set_item("execution_count", stats.execution_count)?;
            item.set_item("last_inference_ms", stats.last_inference)?;
            let infer = stats.inference_stats.unwrap_or_default();
            for (key, duration) in [("success", infer.success), ("fail", infer.fail)] {
                let duration = duration.unwrap_or_default();
                item.set_item(format!("{key}_count"), duration.count)?;
                item.set_item(format!("{key}_ns"), duration.ns)?;
            }
            Some(item)
        }
    };
    dict.set_item("statistics", statistics)?;
    Ok(dict)
}

/// How a call's result reaches Python.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// An `asyncio.Future` of the running event loop.
    Async,
    /// The value itself, after waiting with the GIL released.
    Blocking,
}

impl Mode {
    fn run<F>(self, py: Python<'_>, call: F) -> PyResult<Py<PyAny>>
    where
        F: Future<Output = PyResult<Answer>> + Send + 'static,
    {
        let runtime = crate::runtime().map_err(|error| {
            errors::raise(
                errors::Kind::Client,
                format!("failed to start the extension's tokio runtime: {error}"),
            )
        })?;
        match self {
            Mode::Blocking => py.detach(|| runtime.block_on(call))?.into_py(py),
            Mode::Async => {
                let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
                let future = event_loop.call_method0("create_future")?.unbind();
                let loop_ = event_loop.unbind();
                let target = future.clone_ref(py);
                let task = runtime.spawn(async move {
                    let result = call.await;
                    Python::attach(|py| {
                        let (ok, value) = match result.and_then(|answer| answer.into_py(py)) {
                            Ok(value) => (true, value),
                            Err(error) => (false, error.into_value(py).into_any()),
                        };
                        let resolve = wrap_pyfunction!(resolve, py)?;
                        // The loop may be closed by now; nobody is left to tell.
                        let _ = loop_.call_method1(
                            py,
                            "call_soon_threadsafe",
                            (resolve, target, ok, value),
                        );
                        PyResult::Ok(())
                    })
                });
                future.call_method1(py, "add_done_callback", (Abort(task.abort_handle()),))?;
                Ok(future)
            }
        }
    }
}

/// Completes `future` on its loop, unless it was cancelled meanwhile.
#[pyfunction]
fn resolve(future: &Bound<'_, PyAny>, ok: bool, value: &Bound<'_, PyAny>) -> PyResult<()> {
    if future.call_method0("done")?.is_truthy()? {
        return Ok(());
    }
    let method = if ok { "set_result" } else { "set_exception" };
    future.call_method1(method, (value,))?;
    Ok(())
}

/// An `asyncio.Future` done-callback that stops the call when the future was cancelled.
#[pyclass(module = "remotemedia.core", frozen)]
struct Abort(AbortHandle);

#[pymethods]
impl Abort {
    fn __call__(&self, future: &Bound<'_, PyAny>) -> PyResult<()> {
        if future.call_method0("cancelled")?.is_truthy()? {
            self.0.abort();
        }
        Ok(())
    }
}

fn optional_seconds(name: &str, value: Option<f64>) -> PyResult<Option<Duration>> {
    value.map(|value| seconds(name, value)).transpose()
}

/// The state both client classes share: where to connect, and the connection once made.
struct Shared {
    endpoint: Option<String>,
    config: ClientConfig,
    client: Arc<Mutex<Option<CoreClient>>>,
}

impl Shared {
    fn new(
        endpoint: Option<String>,
        timeout: Option<f64>,
        inline_threshold: Option<usize>,
    ) -> PyResult<Self> {
        let mut config = ClientConfig {
            default_timeout: optional_seconds("timeout", timeout)?,
            ..Default::default()
        };
        if let Some(threshold) = inline_threshold {
            config.inline_threshold = threshold;
        }
        Ok(Self {
            endpoint,
            config,
            client: Arc::default(),
        })
    }

    fn slot(&self) -> MutexGuard<'_, Option<CoreClient>> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connected client, or the error a call before `connect()` gets.
    fn connected(&self) -> PyResult<CoreClient> {
        self.slot().clone().ok_or_else(|| {
            errors::raise(
                errors::Kind::Client,
                "failed to call the model worker: the client is not connected; call connect() first",
            )
        })
    }

    fn connect(&self, py: Python<'_>, mode: Mode) -> PyResult<Py<PyAny>> {
        let endpoint = self.endpoint.clone();
        let config = self.config.clone();
        let slot = self.client.clone();
        mode.run(py, async move {
            let client = match endpoint {
                Some(endpoint) => CoreClient::connect_with(&endpoint, config).await,
                None => sidecar_from_env(config).await,
            }
            .map_err(client_error)?;
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(client);
            Ok(Answer::Nothing)
        })
    }

    fn infer(
        &self,
        py: Python<'_>,
        mode: Mode,
        input: &Bound<'_, PyAny>,
        model: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.connected()?;
        let inputs = Inputs::extract(input)?;
        let options = InferOptions {
            model,
            timeout: optional_seconds("timeout", timeout)?,
            output: None,
        };
        mode.run(py, async move {
            match inputs {
                Inputs::One(tensor) => client.infer(tensor, options).await.map(Answer::One),
                Inputs::Named(tensors) => client
                    .infer_many(tensors, Vec::new(), options)
                    .await
                    .map(Answer::Named),
            }
            .map_err(client_error)
        })
    }

    fn infer_stream(
        &self,
        py: Python<'_>,
        mode: Mode,
        model: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let client = self.connected()?;
        let options = InferOptions {
            model,
            ..Default::default()
        };
        mode.run(py, async move {
            let stream = client.infer_stream(options).await.map_err(client_error)?;
            Ok(Answer::Stream(Box::new(stream), mode))
        })
    }

    fn health_check(&self, py: Python<'_>, mode: Mode) -> PyResult<Py<PyAny>> {
        let client = self.connected()?;
        mode.run(py, async move {
            client
                .health_check()
                .await
                .map(Answer::Healthy)
                .map_err(client_error)
        })
    }

    fn status(&self, py: Python<'_>, mode: Mode, model: Option<String>) -> PyResult<Py<PyAny>> {
        let client = self.connected()?;
        mode.run(py, async move {
            client
                .status(model.as_deref())
                .await
                .map(|status| Answer::Status(Box::new(status)))
                .map_err(client_error)
        })
    }

    /// Unregisters the client's shared-memory registrations; closing twice, or a client never
    /// connected, does nothing.
    fn close(&self, py: Python<'_>, mode: Mode) -> PyResult<Py<PyAny>> {
        let client = self.slot().take();
        mode.run(py, async move {
            if let Some(client) = client {
                client.close().await.map_err(client_error)?;
            }
            Ok(Answer::Nothing)
        })
    }

    fn repr(&self, class: &str) -> String {
        let state = if self.slot().is_some() {
            "connected"
        } else {
            "not connected"
        };
        match &self.endpoint {
            Some(endpoint) => format!("{class}({endpoint:?}, {state})"),
            None => format!("{class}(REMOTEMEDIA_SIDECAR, {state})"),
        }
    }
}

impl Drop for Shared {
    /// A client garbage-collected without `close()` still unregisters its shared-memory
    /// registrations: core does so only when dropped inside a tokio runtime, which a Python
    /// thread is not.
    fn drop(&mut self) {
        let client = self.slot().take();
        if let (Some(client), Ok(runtime)) = (client, crate::runtime()) {
            // Nobody is left to tell of a failure: the server drops the registrations when
            // it restarts.
            runtime.spawn(async move {
                let _ = client.close().await;
            });
        }
    }
}

/// The node sidecar `REMOTEMEDIA_SIDECAR` names, which must be set when no endpoint is given.
async fn sidecar_from_env(config: ClientConfig) -> Result<CoreClient, ClientError> {
    match CoreClient::from_env_with(config).await? {
        Some(client) => Ok(client),
        None => Err(ClientError::InvalidEndpoint {
            endpoint: String::new(),
            reason: "no endpoint was given and REMOTEMEDIA_SIDECAR is not set",
        }),
    }
}

/// An asyncio client of a model worker, or of the node sidecar.
#[pyclass(name = "ModelWorkerClient", module = "remotemedia.core", frozen)]
struct PyModelWorkerClient(Shared);

#[pymethods]
impl PyModelWorkerClient {
    #[new]
    #[pyo3(signature = (endpoint = None, *, timeout = None, inline_threshold = None))]
    fn new(
        endpoint: Option<String>,
        timeout: Option<f64>,
        inline_threshold: Option<usize>,
    ) -> PyResult<Self> {
        Shared::new(endpoint, timeout, inline_threshold).map(Self)
    }

    /// The endpoint given, or None for the sidecar named by REMOTEMEDIA_SIDECAR.
    #[getter]
    fn endpoint(&self) -> Option<String> {
        self.0.endpoint.clone()
    }

    fn connect(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.connect(py, Mode::Async)
    }

    #[pyo3(signature = (input, *, model = None, timeout = None))]
    fn infer(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        model: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        self.0.infer(py, Mode::Async, input, model, timeout)
    }

    #[pyo3(signature = (*, model = None))]
    fn infer_stream(&self, py: Python<'_>, model: Option<String>) -> PyResult<Py<PyAny>> {
        self.0.infer_stream(py, Mode::Async, model)
    }

    fn health_check(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.health_check(py, Mode::Async)
    }

    #[pyo3(signature = (model = None))]
    fn status(&self, py: Python<'_>, model: Option<String>) -> PyResult<Py<PyAny>> {
        self.0.status(py, Mode::Async, model)
    }

    fn close(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.close(py, Mode::Async)
    }

    /// `async with ModelWorkerClient(...) as client`: connects, and closes at the end.
    fn __aenter__(slf: Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let connected = slf.get().0.connect(py, Mode::Async)?;
        // The awaited value is the client itself.
        let this = slf.unbind().into_any();
        let future = py
            .import("asyncio")?
            .call_method0("get_running_loop")?
            .call_method0("create_future")?;
        let then = ThenReturn(this, future.clone().unbind());
        connected.call_method1(py, "add_done_callback", (then,))?;
        Ok(future.unbind())
    }

    #[pyo3(signature = (*_exc))]
    fn __aexit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<Py<PyAny>> {
        self.0.close(py, Mode::Async)
    }

    fn __repr__(&self) -> String {
        self.0.repr("ModelWorkerClient")
    }
}

/// Completes `.1` with `.0` when the future it is attached to succeeded, or with its error.
#[pyclass(module = "remotemedia.core", frozen)]
struct ThenReturn(Py<PyAny>, Py<PyAny>);

#[pymethods]
impl ThenReturn {
    fn __call__(&self, py: Python<'_>, done: &Bound<'_, PyAny>) -> PyResult<()> {
        let target = self.1.bind(py);
        if target.call_method0("done")?.is_truthy()? {
            return Ok(());
        }
        if done.call_method0("cancelled")?.is_truthy()? {
            target.call_method0("cancel")?;
            return Ok(());
        }
        match done.call_method0("exception")? {
            error if error.is_none() => target.call_method1("set_result", (self.0.bind(py),))?,
            error => target.call_method1("set_exception", (error,))?,
        };
        Ok(())
    }
}

/// The same client, with calls that block (the GIL released while they wait).
#[pyclass(
    name = "BlockingModelWorkerClient",
    module = "remotemedia.core",
    frozen
)]
struct BlockingModelWorkerClient(Shared);

#[pymethods]
impl BlockingModelWorkerClient {
    #[new]
    #[pyo3(signature = (endpoint = None, *, timeout = None, inline_threshold = None))]
    fn new(
        endpoint: Option<String>,
        timeout: Option<f64>,
        inline_threshold: Option<usize>,
    ) -> PyResult<Self> {
        Shared::new(endpoint, timeout, inline_threshold).map(Self)
    }

    #[getter]
    fn endpoint(&self) -> Option<String> {
        self.0.endpoint.clone()
    }

    fn connect(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.connect(py, Mode::Blocking)
    }

    #[pyo3(signature = (input, *, model = None, timeout = None))]
    fn infer(
        &self,
        py: Python<'_>,
        input: &Bound<'_, PyAny>,
        model: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<Py<PyAny>> {
        self.0.infer(py, Mode::Blocking, input, model, timeout)
    }

    #[pyo3(signature = (*, model = None))]
    fn infer_stream(&self, py: Python<'_>, model: Option<String>) -> PyResult<Py<PyAny>> {
        self.0.infer_stream(py, Mode::Blocking, model)
    }

    fn health_check(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.health_check(py, Mode::Blocking)
    }

    #[pyo3(signature = (model = None))]
    fn status(&self, py: Python<'_>, model: Option<String>) -> PyResult<Py<PyAny>> {
        self.0.status(py, Mode::Blocking, model)
    }

    fn close(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.close(py, Mode::Blocking)
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().0.connect(slf.py(), Mode::Blocking)?;
        Ok(slf)
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.0.close(py, Mode::Blocking).map(drop)
    }

    fn __repr__(&self) -> String {
        self.0.repr("BlockingModelWorkerClient")
    }
}

/// An open stream, shared by the calls on it: one call uses it at a time, so a `next()` waiting
/// for an answer delays a `send()` until that answer came.
struct StreamState(Arc<tokio::sync::Mutex<InferStream>>);

impl StreamState {
    fn new(stream: InferStream) -> Self {
        Self(Arc::new(tokio::sync::Mutex::new(stream)))
    }

    fn send(&self, py: Python<'_>, mode: Mode, input: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let inputs = Inputs::extract(input)?;
        let stream = self.0.clone();
        mode.run(py, async move {
            let mut stream = stream.lock().await;
            match inputs {
                Inputs::One(tensor) => stream.send(tensor).await,
                Inputs::Named(tensors) => stream.send_many(tensors, Vec::new()).await,
            }
            .map(Answer::Sent)
            .map_err(client_error)
        })
    }

    fn next(&self, py: Python<'_>, mode: Mode) -> PyResult<Py<PyAny>> {
        let stream = self.0.clone();
        mode.run(py, async move {
            Ok(Answer::Response(stream.lock().await.next().await))
        })
    }

    fn close_send(&self, py: Python<'_>, mode: Mode) -> PyResult<Py<PyAny>> {
        let stream = self.0.clone();
        mode.run(py, async move {
            stream.lock().await.close_send();
            Ok(Answer::Nothing)
        })
    }
}

/// A `ModelStreamInfer` stream of the asyncio client: `await send(x)` returns the request's id,
/// `await next()` an `(id, output)` answer in the server's order (None at the end), and
/// `async for id, output in stream` reads answers until the end.
#[pyclass(name = "InferStream", module = "remotemedia.core", frozen)]
struct PyInferStream(StreamState);

#[pymethods]
impl PyInferStream {
    fn send(&self, py: Python<'_>, input: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.0.send(py, Mode::Async, input)
    }

    fn next(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.next(py, Mode::Async)
    }

    fn close_send(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.close_send(py, Mode::Async)
    }

    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next answer; StopAsyncIteration at the end (the awaited `next()` gives None).
    fn __anext__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let answer = self.0.next(py, Mode::Async)?;
        let target = py
            .import("asyncio")?
            .call_method0("get_running_loop")?
            .call_method0("create_future")?;
        answer.call_method1(
            py,
            "add_done_callback",
            (EndAtNone(target.clone().unbind()),),
        )?;
        Ok(target.unbind())
    }
}

/// Passes an answer on to `.0`, turning None (the stream's end) into StopAsyncIteration.
#[pyclass(module = "remotemedia.core", frozen)]
struct EndAtNone(Py<PyAny>);

#[pymethods]
impl EndAtNone {
    fn __call__(&self, py: Python<'_>, done: &Bound<'_, PyAny>) -> PyResult<()> {
        let target = self.0.bind(py);
        if target.call_method0("done")?.is_truthy()? {
            return Ok(());
        }
        if done.call_method0("cancelled")?.is_truthy()? {
            target.call_method0("cancel")?;
            return Ok(());
        }
        let error = done.call_method0("exception")?;
        if !error.is_none() {
            target.call_method1("set_exception", (error,))?;
            return Ok(());
        }
        let answer = done.call_method0("result")?;
        if answer.is_none() {
            let stop = pyo3::exceptions::PyStopAsyncIteration::new_err(());
            target.call_method1("set_exception", (stop.into_value(py),))?;
        } else {
            target.call_method1("set_result", (answer,))?;
        }
        Ok(())
    }
}

/// A stream of the blocking client: `send(x)` returns the id, `next()` an `(id, output)` answer
/// (None at the end), and `for id, output in stream` reads answers until the end.
#[pyclass(name = "BlockingInferStream", module = "remotemedia.core", frozen)]
struct BlockingInferStream(StreamState);

#[pymethods]
impl BlockingInferStream {
    fn send(&self, py: Python<'_>, input: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.0.send(py, Mode::Blocking, input)
    }

    fn next(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.0.next(py, Mode::Blocking)
    }

    fn close_send(&self, py: Python<'_>) -> PyResult<()> {
        self.0.close_send(py, Mode::Blocking).map(drop)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let answer = self.0.next(py, Mode::Blocking)?;
        Ok((!answer.is_none(py)).then_some(answer))
    }
}

pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<PyModelWorkerClient>()?;
    module.add_class::<BlockingModelWorkerClient>()?;
    module.add_class::<PyInferStream>()?;
    module.add_class::<BlockingInferStream>()?;
    Ok(())
}
