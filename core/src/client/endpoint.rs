//! Where a client connects: `grpc://host:port` over TCP, or `unix://` to a socket (or to the
//! sidecar's socket directory, meaning its `infer.sock`), and the connection itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::ClientError;

/// The sidecar's inference socket inside its socket directory.
pub const INFER_SOCKET: &str = "infer.sock";
/// The worker's default gRPC port, used when a `grpc://` endpoint names none.
pub const DEFAULT_PORT: u16 = 50051;

/// A parsed endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Address {
    /// `http://host:port` for tonic.
    Tcp(String),
    /// The socket to dial.
    Unix(PathBuf),
}

impl Address {
    /// Parses `grpc://host[:port]` (also `http://`) or `unix:///absolute/path`; a path that is a
    /// directory means the `infer.sock` inside it.
    pub(super) fn parse(endpoint: &str) -> Result<Address, ClientError> {
        let invalid = |reason| ClientError::InvalidEndpoint {
            endpoint: endpoint.chars().take(256).collect(),
            reason,
        };
        if let Some(path) = endpoint.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(invalid(
                    "a unix:// endpoint needs an absolute path (unix:///dir)",
                ));
            }
            let path = Path::new(path);
            return Ok(Address::Unix(if path.is_dir() {
                path.join(INFER_SOCKET)
            } else {
                path.to_owned()
            }));
        }
        let authority = endpoint
            .strip_prefix("grpc://")
            .or_else(|| endpoint.strip_prefix("http://"))
            .ok_or_else(|| invalid("expected grpc://host:port or unix:///path"))?
            .trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(invalid(
                "expected grpc://host:port with nothing after the port",
            ));
        }
        // `host`, `host:port`, `[v6]` or `[v6]:port`: a port follows the last colon outside
        // brackets.
        let port = authority
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty() && (!host.contains(':') || host.ends_with(']')));
        let uri = match port {
            Some((_, port)) if port.parse::<u16>().is_err() => {
                return Err(invalid("the port is not a number from 0 to 65535"));
            }
            Some(_) => format!("http://{authority}"),
            None => format!("http://{authority}:{DEFAULT_PORT}"),
        };
        uri.parse::<Uri>()
            .map_err(|_| invalid("expected grpc://host:port"))?;
        Ok(Address::Tcp(uri))
    }

    /// True for a Unix socket: the only transport on which brokered region ids may travel.
    pub(super) fn is_unix(&self) -> bool {
        matches!(self, Address::Unix(_))
    }

    /// A channel that connects when first used and reconnects after the connection drops.
    pub(super) fn channel(&self, connect_timeout: Duration) -> Result<Channel, ClientError> {
        match self {
            Address::Tcp(uri) => Ok(Endpoint::from_shared(uri.clone())
                .map_err(|_| ClientError::InvalidEndpoint {
                    endpoint: uri.clone(),
                    reason: "expected grpc://host:port",
                })?
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .connect_lazy()),
            Address::Unix(path) => {
                let path = path.clone();
                // The URI is required by the API but unused: the connector dials the socket.
                Ok(Endpoint::from_static("http://unix.socket")
                    .connect_timeout(connect_timeout)
                    .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    })))
            }
        }
    }
}
