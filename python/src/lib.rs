//! `remotemedia.core`: Python bindings over `remotemedia-runtime-core`.
//!
//! Every behaviour lives in core — the model registry's single-flight loads and eviction, the
//! shared-memory allocator, tensor shape and dtype checks; this crate converts between Python and
//! those types, and adds what only a Python binding needs: Python loaders, NumPy and DLPack views
//! of tensor bytes, and Python exceptions.
//!
//! The registry's loads and its TTL sweeper, and the model-worker client's calls, run on a tokio
//! runtime. Python has none, so the extension owns one: a multi-thread runtime with one worker
//! thread, started on the first registry or client call and kept for the life of the process
//! (see [`runtime`]).

mod client;
mod dlpack;
mod errors;
mod registry;
mod tensor;

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};

use pyo3::prelude::*;

/// The extension's tokio runtime, shared by every registry and client in the process.
///
/// One worker thread is enough: it runs the TTL sweeper, wakes waiting callers and drives the
/// clients' gRPC connections (I/O bound; tensors go by reference or as shared bytes); Python
/// loaders run on the runtime's blocking pool (one thread per concurrent load), and callers wait
/// in `block_on` on their own threads with the GIL released. A runtime does not survive `fork`:
/// a child process forked after the first registry or client call must not use either (use the
/// `spawn` start method of `multiprocessing`).
fn runtime() -> std::io::Result<Handle> {
    let mut state = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    match &*state {
        RuntimeState::Running(runtime) => Ok(runtime.handle().clone()),
        RuntimeState::Stopped => Err(std::io::Error::other(
            "the interpreter is exiting and the runtime has stopped",
        )),
        RuntimeState::NotStarted => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("remotemedia-runtime")
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            *state = RuntimeState::Running(runtime);
            Ok(handle)
        }
    }
}

enum RuntimeState {
    NotStarted,
    Running(Runtime),
    Stopped,
}

static RUNTIME: Mutex<RuntimeState> = Mutex::new(RuntimeState::NotStarted);

/// Registered with `atexit`: stops the runtime before the interpreter finalizes, so that none of
/// its threads (completing an asyncio future, running a loader) takes the GIL of an interpreter
/// that is going away. CPython ends such a thread with `pthread_exit`, whose unwinding through
/// Rust frames aborts the process: a script that had printed all its output died with SIGABRT.
#[pyfunction]
fn stop_runtime(py: Python<'_>) {
    let state = std::mem::replace(
        &mut *RUNTIME.lock().unwrap_or_else(PoisonError::into_inner),
        RuntimeState::Stopped,
    );
    if let RuntimeState::Running(runtime) = state {
        // Tasks that need the GIL to finish can take it meanwhile.
        py.detach(|| runtime.shutdown_timeout(Duration::from_secs(2)));
    }
}

/// Process-wide model registry and zero-copy shared-memory tensors.
#[pymodule]
#[pyo3(name = "core")]
fn remotemedia_core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(module)?;
    client::register(module)?;
    registry::register(module)?;
    tensor::register(module)?;
    let stop = wrap_pyfunction!(stop_runtime, module)?;
    module
        .py()
        .import("atexit")?
        .call_method1("register", (stop,))?;
    Ok(())
}
