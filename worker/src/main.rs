//! The model worker's command line: parse flags, start tracing, run.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser as _, error::ErrorKind};
use remotemedia_model_worker::{Config, run, write_termination_log};
use tracing_subscriber::EnvFilter;

/// Inline tensors arrive in buffers as large as the message (h2's read buffer, tonic's decode
/// buffer). glibc maps each allocation above its mmap threshold fresh and unmaps it when freed,
/// so every request faulted in and cleared its whole size again (a third of the worker's time
/// at 64 MiB); mimalloc keeps freed pages for the next request and returns them to the system
/// after a second unused.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            error.exit()
        }
        Err(error) => {
            // clap adds usage hints below; the first line says what is wrong.
            let text = error.to_string();
            eprintln!(
                "{}",
                text.lines().next().unwrap_or("error: invalid arguments")
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let termination_log = config.termination_log.clone();
    match start(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let line = format!("error: {error:#}");
            eprintln!("{line}");
            if let Err(write_error) = write_termination_log(&termination_log, &line) {
                eprintln!(
                    "error: failed to write the termination log {}: {write_error}",
                    termination_log.display()
                );
            }
            ExitCode::FAILURE
        }
    }
}

fn start(config: Config) -> anyhow::Result<()> {
    let settings = config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let result = runtime.block_on(run(settings));
    // A forward pass still running after the drain timeout must not hold the exit.
    runtime.shutdown_background();
    Ok(result?)
}
