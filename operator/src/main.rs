//! `remotemedia-operator`: parses flags, starts tracing, hands over to the library's `run`.

use clap::Parser;
use remotemedia_operator::{Args, config::defaults};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Bad configuration is one line and a non-zero exit, before any port is bound.
    let config = match args.validate(std::path::Path::new(defaults::NAMESPACE_FILE)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("remotemedia-operator: {error}");
            std::process::exit(2);
        }
    };
    remotemedia_operator::run(config).await?;
    Ok(())
}
