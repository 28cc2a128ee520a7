//! Programs Cargo built beside the test binary (examples, and the workspace's binaries), for
//! integration tests that run them as processes. One copy, included by `#[path]` from the tests
//! of several crates.

use std::path::{Path, PathBuf};

/// `relative` under target/<profile> (test binaries run from target/<profile>/deps): e.g.
/// `examples/shm_peer`, `remotemedia-model-worker`, or `quickstart-producer` (the quickstart
/// project builds into the same target directory).
pub fn built(relative: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join(relative);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins --examples` and `cargo build \\
         --manifest-path examples/quickstart/Cargo.toml`",
        path.display()
    );
    path
}
