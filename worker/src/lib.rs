//! `remotemedia-model-worker`: loads one model and serves it over Triton's gRPC inference
//! protocol (KServe v2 / Open Inference Protocol), with health, metrics and graceful drain.
//!
//! [`run`] wires everything: it binds every listener before serving anything, serves gRPC and
//! plain HTTP health on one port (and optionally a Unix socket), the admin endpoints on another,
//! loads and warms up the model while already answering probes, then waits for SIGTERM and
//! drains as DESIGN §6 describes.

pub mod backend;
mod batcher;
pub mod config;
pub mod decode;
pub mod defaults;
mod error;
mod executor;
mod granted;
mod http;
mod lifecycle;
mod metrics;
pub mod model;
pub mod pbtxt;
mod service;
pub mod shm;
pub mod tensor;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::serve::ListenerExt;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use prometheus_client::registry::Registry;
use remotemedia_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use tokio::{
    net::{TcpListener, UnixListener},
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinSet,
};

pub use crate::config::{Config, ConfigError, Settings};
use crate::{
    backend::LoadError,
    executor::{Executor, Limits, ModelStats},
    granted::Granted,
    http::Health,
    lifecycle::Lifecycle,
    metrics::Metrics,
    service::InferenceService,
    shm::SharedMemoryRegistry,
};

/// A fatal error after configuration was accepted.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("failed to bind the {what} port {port}")]
    Bind {
        what: &'static str,
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("failed to bind the unix socket {path}")]
    BindUnix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to bind the unix socket {0}: another process is listening on it")]
    UnixSocketInUse(PathBuf),
    #[error("failed to listen for signals")]
    Signals(#[source] io::Error),
    #[error("failed to open a session at the node broker in {}", dir.display())]
    Broker {
        dir: PathBuf,
        #[source]
        source: remotemedia_runtime_core::shm::broker::BrokerError,
    },
    #[error("failed to start the thread that returns released regions to the node broker")]
    Sweeper(#[source] io::Error),
    #[error("failed to load model '{model}'")]
    Load {
        model: String,
        #[source]
        source: LoadError,
    },
    #[error("failed to load model '{0}': the loader panicked")]
    LoadPanicked(String),
    #[error("failed to start the executor threads")]
    Executors(#[source] io::Error),
}

/// Runs the worker until SIGTERM (or SIGINT) and a completed drain.
pub async fn run(settings: Settings) -> Result<(), RunError> {
    let Settings {
        model_id,
        source,
        device,
        intra_op_threads,
        listen_address,
        port,
        admin_port,
        uds,
        broker,
        orphan_sweep_interval,
        instances,
        max_concurrency,
        max_queue,
        batching,
        max_message_bytes,
        drain_delay,
        drain_timeout,
        allow_named_shm,
    } = settings;

    // Every listener is bound before anything is served: a port in use is a start-up error.
    let grpc_listener = bind_tcp("gRPC", listen_address, port).await?;
    let admin_listener = bind_tcp("admin", listen_address, admin_port).await?;
    let uds_listener = uds.as_deref().map(bind_unix).transpose()?;
    let _socket_file = uds.clone().map(SocketFile);
    let mut terminate = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;

    let mut registry = Registry::with_prefix("remotemedia_worker");
    let metrics = Metrics::register(&mut registry);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let lifecycle = Arc::new(Lifecycle::new(health_reporter).await);
    let stats = Arc::new(ModelStats::default());
    let shared_memory = allow_named_shm.then(|| {
        Arc::new(SharedMemoryRegistry::new(
            metrics.shm_misaligned_copies.clone(),
            metrics.shm_regions.clone(),
        ))
    });
    let granted = match &broker {
        Some(dir) => {
            let label = format!("worker:{model_id}");
            let granted = Granted::connect(dir, &label, metrics.shm_misaligned_copies.clone())
                .map_err(|source| RunError::Broker {
                    dir: dir.clone(),
                    source,
                })?;
            let granted = Arc::new(granted);
            if let Some(interval) = orphan_sweep_interval {
                granted.start_sweeper(interval).map_err(RunError::Sweeper)?;
            }
            Some(granted)
        }
        None => None,
    };
    let mut description = source.describe(&model_id);
    // ModelConfig shows the batching the worker does, whether config.pbtxt or a flag set it.
    description.dynamic_batching =
        (batching.max_batch_size > 1).then_some(batching.max_queue_delay);
    let service = InferenceService::new(
        description,
        stats.clone(),
        lifecycle.clone(),
        metrics.clone(),
        shared_memory,
        granted,
    );
    let health = Health {
        lifecycle: lifecycle.clone(),
        model_id: model_id.as_str().into(),
    };
    let grpc = GrpcInferenceServiceServer::new(service.clone())
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let router = http::with_health_routes(
        tonic::service::Routes::new(grpc)
            .add_service(health_service)
            .into_axum_router()
            .layer(axum::middleware::map_response(http::size_limit_status)),
        health.clone(),
    );

    let (stop, stopped) = watch::channel(false);
    let mut servers = JoinSet::new();
    // Without TCP_NODELAY, Nagle's algorithm holds HTTP/2's small frames (window updates,
    // headers) behind unacknowledged data, and a large inline tensor crawls in stalls (tonic's
    // own server sets it too).
    let grpc_listener = grpc_listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "failed to set TCP_NODELAY");
        }
    });
    let window = remotemedia_proto::http2::window(max_message_bytes);
    servers.spawn(serve(
        grpc_listener,
        router.clone(),
        window,
        stopped.clone(),
    ));
    if let Some(listener) = uds_listener {
        servers.spawn(serve(listener, router, window, stopped.clone()));
    }
    let (stop_admin, admin_stopped) = watch::channel(false);
    let admin = tokio::spawn(serve(
        admin_listener,
        http::admin_router(health, Arc::new(registry)),
        window,
        admin_stopped,
    ));
    tracing::info!(
        model = %model_id, %device, %listen_address, port, admin_port, uds = ?uds, allow_named_shm, instances,
        max_batch_size = batching.max_batch_size, batch_delay = ?batching.max_queue_delay,
        "serving; loading the model"
    );

    let load = tokio::task::spawn_blocking(move || source.load(device, intra_op_threads));
    let shutdown = async {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    };
    tokio::pin!(shutdown);
    let loaded = tokio::select! {
        loaded = load => Some(loaded),
        signal = &mut shutdown => {
            tracing::info!(signal, "signal while loading the model");
            None
        }
    };
    if let Some(loaded) = loaded {
        let backend = loaded
            .map_err(|_| RunError::LoadPanicked(model_id.clone()))?
            .map_err(|source| RunError::Load {
                model: model_id.clone(),
                source,
            })?;
        let limits = Limits {
            instances,
            max_concurrency,
            max_queue,
        };
        let executor = Executor::start(backend.into(), batching, limits, metrics, stats)
            .map_err(RunError::Executors)?;
        service.set_executor(executor);
        lifecycle.mark_ready().await;
        tracing::info!(model = %model_id, "model ready");
        let signal = shutdown.await;
        tracing::info!(signal, "signal received");
    }

    drain(&lifecycle, drain_delay, drain_timeout, &stop, &mut servers).await;
    let _ = stop_admin.send(true);
    let _ = admin.await;
    tracing::info!("drained; exiting");
    Ok(())
}

/// DESIGN §6: NOT_SERVING at once, keep serving for `delay` so endpoint removal propagates,
/// then stop accepting and give in-flight requests up to `timeout`.
async fn drain(
    lifecycle: &Lifecycle,
    delay: Duration,
    timeout: Duration,
    stop: &watch::Sender<bool>,
    servers: &mut JoinSet<()>,
) {
    lifecycle.begin_drain().await;
    tracing::info!(?delay, "draining: reporting NOT_SERVING, still serving");
    tokio::time::sleep(delay).await;
    let _ = stop.send(true);
    tracing::info!(
        ?timeout,
        "no longer accepting; waiting for in-flight requests"
    );
    let finished = tokio::time::timeout(timeout, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            ?timeout,
            "drain timeout passed; dropping what is still in flight"
        );
    }
}

/// Serves `router` (HTTP/1.1 and HTTP/2 without TLS, chosen per connection) until `stopped`
/// turns true, then lets open connections finish.
///
/// HTTP/2 flow-control windows are `window` bytes (the largest message), so a client sends a
/// whole inline tensor without waiting for window updates: with hyper's 1 MiB default every
/// MiB waited for the server task to be scheduled, and 16 MiB crawled in at 0.1 GB/s on a busy
/// machine. A connection can still hold no more unread bytes than one largest message.
async fn serve<L>(
    mut listener: L,
    router: axum::Router,
    window: u32,
    mut stopped: watch::Receiver<bool>,
) where
    L: axum::serve::Listener,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .max_frame_size(remotemedia_proto::http2::MAX_FRAME_BYTES);
    let connections = GracefulShutdown::new();
    loop {
        // The listener retries transient accept errors itself.
        let (io, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let connection = builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(router.clone()))
            .into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.shutdown().await;
}

async fn bind_tcp(what: &'static str, ip: IpAddr, port: u16) -> Result<TcpListener, RunError> {
    let address = SocketAddr::from((ip, port));
    TcpListener::bind(address)
        .await
        .map_err(|source| RunError::Bind { what, port, source })
}

fn bind_unix(path: &Path) -> Result<UnixListener, RunError> {
    if path.exists() {
        // A socket nobody answers on is left from an earlier run; one that answers is in use.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(RunError::UnixSocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(|source| RunError::BindUnix {
            path: path.to_owned(),
            source,
        })?;
    }
    UnixListener::bind(path).map_err(|source| RunError::BindUnix {
        path: path.to_owned(),
        source,
    })
}

/// Removes the Unix socket file when the worker stops, whether it drained or failed: the file
/// outlives the listener, and a stale one would only confuse the next start.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes a fatal start-up error where Kubernetes reads the termination message. A missing
/// directory means there is no such file to write (outside Kubernetes): skipped silently.
pub fn write_termination_log(path: &Path, message: &str) -> io::Result<()> {
    if path
        .parent()
        .is_some_and(|dir| !dir.as_os_str().is_empty() && !dir.is_dir())
    {
        return Ok(());
    }
    std::fs::write(path, format!("{message}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_log_gets_the_error_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("termination-log");
        write_termination_log(&path, "error: failed to load model 'm'").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "error: failed to load model 'm'\n"
        );
    }

    #[test]
    fn termination_log_is_skipped_where_its_directory_does_not_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("termination-log");
        write_termination_log(&path, "error: x").unwrap();
        assert!(!path.exists());
    }
}
