//! `remotemedia-sidecar`: parses flags, starts tracing, hands over to the library's `run`.

use clap::Parser;
use remotemedia_sidecar::Args;

/// Inline tensors pass through buffers as large as the message (decoded from the client,
/// encoded again for the worker); mimalloc reuses their pages where glibc maps and unmaps each
/// one (see the worker's `main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Bad configuration is one line and a non-zero exit, before any socket is bound.
    let config = match args.validate() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("remotemedia-sidecar: {error}");
            std::process::exit(2);
        }
    };
    remotemedia_sidecar::run(config).await?;
    Ok(())
}
