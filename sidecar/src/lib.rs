//! `remotemedia-sidecar`: the per-node agent. It runs the shared-memory broker on
//! `<socket-dir>/broker.sock` ([`broker`]), the inference router on `<socket-dir>/infer.sock`
//! and, when enabled, TCP ([`router`]), plus the admin port.

pub mod admin;
pub mod broker;
pub mod budget;
pub mod config;
pub mod metrics;
pub mod router;

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::{Args, Config, ConfigError, DiscoverySource};
use remotemedia_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use remotemedia_runtime_core::shm::broker::{BROKER_SOCKET, socket};

use axum::Extension;
use axum::extract::ConnectInfo;
use axum::serve::{Listener, ListenerExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use router::connection::Tracked;
use router::discovery::kubernetes::Kubernetes;
use router::named::NamedRegistry;
use router::scale::{ModelWorkerScaler, ScaleFromZero};
use router::{Discovery, RouterService, StaticFile, Transport};

/// The router's Unix socket inside the socket directory.
pub const INFER_SOCKET: &str = "infer.sock";

/// Why the sidecar stopped.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("failed to prepare socket directory {}", path.display())]
    SocketDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to bind {}", path.display())]
    BindBroker {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to bind the admin port {addr}")]
    BindAdmin {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("failed to bind the inference port {addr}")]
    BindInference {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("failed to serve")]
    Serve(#[source] io::Error),
    #[error("failed to configure the Kubernetes client (in-cluster or kubeconfig)")]
    KubeClient(#[source] kube::Error),
}

/// Binds everything, then serves until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), SidecarError> {
    let Config {
        socket_dir,
        admin_address,
        admin_port,
        limits,
        tcp,
        discovery,
        allow_named_shm,
        router: router_config,
    } = config;
    let metrics = Arc::new(metrics::Metrics::new());
    // Discovery first: a sidecar without Kubernetes credentials fails at start, not later.
    let (endpoints, scale) = match discovery {
        DiscoverySource::Static(path) => (Box::new(StaticFile { path }).watch(), None),
        DiscoverySource::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .map_err(SidecarError::KubeClient)?;
            let (discovery, scales) = Kubernetes::new(client.clone());
            let scaler = Arc::new(ModelWorkerScaler { client });
            let scale = ScaleFromZero::new(scales, scaler, metrics.clone());
            (Box::new(discovery).watch(), Some(scale))
        }
        DiscoverySource::None => (tokio::sync::watch::channel(Arc::new(Vec::new())).1, None),
    };
    raise_descriptor_limit();
    let broker_path = socket_dir.join(BROKER_SOCKET);
    let listener = bind_broker(&socket_dir, &broker_path)?;
    let infer_path = socket_dir.join(INFER_SOCKET);
    let infer_unix = bind_infer(&infer_path)?;
    let infer_tcp = match tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| SidecarError::BindInference { addr, source })?,
        ),
        None => None,
    };
    let admin_addr = SocketAddr::new(admin_address, admin_port);
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| SidecarError::BindAdmin {
            addr: admin_addr,
            source,
        })?;
    let admin_addr = admin.local_addr().map_err(SidecarError::Serve)?;
    tracing::info!(
        socket = %broker_path.display(),
        admin = %admin_addr,
        max_shm_bytes = limits.max_shm_bytes,
        "sidecar serving"
    );

    let books = Arc::new(broker::Books::new(limits));
    let max_message_bytes = router_config.max_message_bytes;
    let router = router::Router::new(router_config, endpoints, metrics.held(), scale);
    let named = Arc::new(NamedRegistry::new(allow_named_shm));
    let window = remotemedia_proto::http2::window(max_message_bytes);
    let grpc = |transport| {
        let service = RouterService::new(
            router.clone(),
            books.clone(),
            metrics.clone(),
            named.clone(),
            transport,
        );
        tonic::service::Routes::new(
            GrpcInferenceServiceServer::new(service)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
        )
        .into_axum_router()
    };
    let unix = Tracked::new(infer_unix, named.clone());
    let unix = tokio::spawn(serve_grpc(unix, grpc(Transport::Unix), window));
    let tcp = infer_tcp.map(|listener| {
        tracing::info!(address = ?listener.local_addr().ok(), "inference over TCP");
        // Without TCP_NODELAY, Nagle's algorithm holds HTTP/2's small frames back.
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::warn!(%error, "failed to set TCP_NODELAY");
            }
        });
        let listener = Tracked::new(listener, named.clone());
        tokio::spawn(serve_grpc(listener, grpc(Transport::Tcp), window))
    });
    let tcp = async move {
        match tcp {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    let broker = tokio::spawn(broker::serve(listener, books.clone(), metrics.clone()));
    let admin = tokio::spawn(async move {
        axum::serve(
            admin,
            admin::router(books, metrics, router).into_make_service(),
        )
        .await
    });
    tokio::select! {
        result = broker => flatten(result)?,
        result = unix => flatten(result)?,
        result = tcp => flatten(result)?,
        result = admin => flatten(result)?,
        () = shutdown_signal() => tracing::info!("shutting down"),
    }
    // Clients reconnect to the next sidecar at this path; a stale socket file would refuse them.
    let _ = std::fs::remove_file(&broker_path);
    let _ = std::fs::remove_file(&infer_path);
    Ok(())
}

/// Binds `infer.sock`, replacing a stale socket (the directory exists: `bind_broker` made it).
fn bind_infer(path: &Path) -> Result<tokio::net::UnixListener, SidecarError> {
    let bind_error = |source| SidecarError::BindBroker {
        path: path.to_owned(),
        source,
    };
    remove_stale_socket(path).map_err(bind_error)?;
    let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_error)?;
    Ok(listener)
}

/// Removes a socket left by a previous sidecar at `path`; any other kind of file is in the way.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        )),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// Serves `router` on `listener` until the process ends, each call carrying its connection's
/// [`ConnectionId`] as `ConnectInfo`. HTTP/2 flow-control windows are `window` bytes (the largest
/// message), as on the worker: with hyper's 1 MiB default a client's inline tensor waited for a
/// window update every MiB, each one for this process to be scheduled.
async fn serve_grpc<L: Listener>(
    mut listener: Tracked<L>,
    router: axum::Router,
    window: u32,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .max_frame_size(remotemedia_proto::http2::MAX_FRAME_BYTES);
    loop {
        // The listener retries transient accept errors itself.
        let (io, id) = listener.accept().await;
        let service = router.clone().layer(Extension(ConnectInfo(id)));
        let connection = builder
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
            .into_owned();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "client connection ended with an error");
            }
        });
    }
}

fn flatten(result: Result<io::Result<()>, tokio::task::JoinError>) -> Result<(), SidecarError> {
    result
        .map_err(|join| SidecarError::Serve(io::Error::other(join)))?
        .map_err(SidecarError::Serve)
}

/// Creates the socket directory and binds `broker.sock`, replacing a stale socket left by a
/// previous sidecar (never any other kind of file).
fn bind_broker(dir: &Path, path: &Path) -> Result<std::os::fd::OwnedFd, SidecarError> {
    let dir_error = |source| SidecarError::SocketDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(dir_error)?;
    let bind_error = |source| SidecarError::BindBroker {
        path: path.to_owned(),
        source,
    };
    remove_stale_socket(path).map_err(bind_error)?;
    let listener = socket::listen(path, 128).map_err(bind_error)?;
    // Any pod that mounts the directory is meant to be a client: access to a region is decided
    // by its id (a capability), not by file permissions, and pods run as arbitrary users.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_error)?;
    Ok(listener)
}

/// Every live region is a descriptor in the sidecar, and every client a socket: the usual soft
/// limit of 1024 would refuse regions long before memory runs out, so take the hard limit.
fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(limit = ?limit.maximum, "raised the descriptor limit"),
        Err(error) => tracing::warn!(%error, "failed to raise the descriptor limit"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
