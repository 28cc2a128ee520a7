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

use std::sync::OnceLock;

use pyo3::prelude::*;

/// The extension's tokio runtime, shared by every registry and client in the process.
///
/// One worker thread is enough: it runs the TTL sweeper, wakes waiting callers and drives the
/// clients' gRPC connections (I/O bound; tensors go by reference or as shared bytes); Python
/// loaders run on the runtime's blocking pool (one thread per concurrent load), and callers wait
/// in `block_on` on their own threads with the GIL released. A runtime does not survive `fork`:
/// a child process forked after the first registry or client call must not use either (use the
/// `spawn` start method of `multiprocessing`).
fn runtime() -> std::io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("remotemedia-runtime")
        .enable_all()
        .build()?;
    // Two first calls racing both build one; the loser's runtime, never used, is dropped here.
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// Process-wide model registry and zero-copy shared-memory tensors.
#[pymodule]
#[pyo3(name = "core")]
fn remotemedia_core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(module)?;
    client::register(module)?;
    registry::register(module)?;
    tensor::register(module)?;
    Ok(())
}
