//! Integration tests: the real `remotemedia-model-worker` binary as a process, driven over TCP,
//! a Unix socket and plain HTTP. One test binary (its modules below) keeps linking cheap.

mod batching;
#[cfg(feature = "torch")]
mod cases;
mod errors;
mod lifecycle;
mod load;
#[path = "../../../core/tests/support/ports.rs"]
mod ports;
mod rpcs;
mod startup;
mod support;
#[cfg(feature = "torch")]
mod torchscript;
