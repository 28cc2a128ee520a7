//! Serving the books on `broker.sock`: one task per connection, one request at a time.
//! Tokio has no descriptor passing, so sockets are `AsyncFd`s over non-blocking seqpacket
//! sockets and every read and write is one `recvmsg`/`sendmsg` retried on readiness.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use remotemedia_runtime_core::shm::broker::socket::{self, Packet, RecvError};
use remotemedia_runtime_core::shm::broker::wire::{Request, Response, decode_request};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::books::{Books, SessionId};
use crate::metrics::Metrics;

/// Accepts connections until the task is dropped.
pub async fn serve(listener: OwnedFd, books: Arc<Books>, metrics: Arc<Metrics>) -> io::Result<()> {
    let listener = register(listener, Interest::READABLE)?;
    loop {
        let mut ready = listener.readable().await?;
        match ready.try_io(|fd| socket::accept(fd.get_ref().as_fd())) {
            Ok(Ok(connection)) => {
                let books = books.clone();
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve_connection(connection, &books, &metrics).await {
                        tracing::warn!(%error, "broker connection failed");
                    }
                });
            }
            Ok(Err(error)) => {
                // Out of descriptors (EMFILE) and the like: back off instead of spinning.
                tracing::warn!(%error, "failed to accept a broker connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_would_block) => {}
        }
    }
}

/// Registers a socket with the reactor. `AsyncFd::with_interest` is deprecated because a caller
/// could close a borrowed descriptor while it is registered; here the `AsyncFd` owns the
/// `OwnedFd`, so it is deregistered before it is closed, and the unsafe `register` buys nothing.
#[allow(deprecated)]
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(fd, interest)
}

/// Ends a session when its connection task ends, however it ends.
struct SessionGuard<'a> {
    books: &'a Books,
    id: SessionId,
    metrics: &'a Metrics,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.books.close_session(self.id);
        self.metrics.observe(self.books);
    }
}

async fn serve_connection(connection: OwnedFd, books: &Books, metrics: &Metrics) -> io::Result<()> {
    let connection = register(connection, Interest::READABLE | Interest::WRITABLE)?;
    let mut session: Option<SessionGuard<'_>> = None;
    loop {
        let packet = match receive(&connection).await {
            Ok(packet) => packet,
            Err(RecvError::Closed) => return Ok(()),
            Err(RecvError::Io(error)) if error.kind() == io::ErrorKind::ConnectionReset => {
                return Ok(());
            }
            Err(RecvError::Io(error)) => return Err(error),
            Err(RecvError::Packet(error)) => {
                metrics.protocol_error(error_category(&error));
                tracing::info!(%error, "closing broker connection");
                return Ok(());
            }
        };
        let request = match decode_request(&packet.bytes, packet.fds) {
            Ok(request) => request,
            Err(error) => {
                metrics.protocol_error("malformed");
                tracing::info!(%error, "closing broker connection");
                return Ok(());
            }
        };
        let kind = request.kind();
        let reply = match (&session, request) {
            (None, Request::Hello { label }) => Some(match books.open_session(label) {
                Ok(ticket) => {
                    session = Some(SessionGuard {
                        books,
                        id: ticket.id,
                        metrics,
                    });
                    Response::Hello {
                        token: ticket.token,
                    }
                }
                Err(refusal) => Response::Error(refusal),
            }),
            (Some(guard), request) => handle(books, guard.id, request),
            (None, _) => None,
        };
        let Some(reply) = reply else {
            metrics.protocol_error("out_of_order");
            tracing::info!(kind, "closing broker connection: request out of order");
            return Ok(());
        };
        metrics.request(kind, &reply);
        metrics.observe(books);
        let fd = reply.descriptor().map(|fd| fd.as_fd());
        send(&connection, &reply.encode(), fd).await?;
    }
}

/// One request of an open session, answered; `None` for a second Hello, which ends the
/// connection.
fn handle(
    books: &Books,
    session: SessionId,
    request: Request<OwnedFd>,
) -> Option<Response<Arc<OwnedFd>>> {
    let answer = match request {
        Request::Allocate { size, label } => {
            books
                .allocate(session, size, label)
                .map(|grant| Response::Allocated {
                    key: grant.key,
                    size: grant.size,
                    fd: grant.fd,
                })
        }
        Request::Open { key } => books.open(session, key).map(|grant| Response::Opened {
            size: grant.size,
            fd: grant.fd,
        }),
        Request::Release { key } => books.release(session, key).map(|()| Response::Released),
        Request::Adopt {
            key,
            size,
            label,
            owner,
            fd,
        } => books
            .adopt(session, key, size, label, owner, fd)
            .map(|()| Response::Adopted),
        Request::Stats => Ok(Response::Stats(books.stats(session))),
        Request::Redeem { grant } => {
            books
                .redeem(session, grant)
                .map(|redemption| Response::Redeemed {
                    handle: redemption.handle,
                    size: redemption.size,
                    fd: redemption.fd,
                    orphaned: redemption.orphaned,
                })
        }
        Request::Forget { handle } => books.forget(session, handle).map(|()| Response::Forgotten),
        Request::Orphans => Ok(Response::Orphans(books.orphans(session))),
        Request::Hello { .. } => return None,
    };
    Some(answer.unwrap_or_else(Response::Error))
}

fn error_category(
    error: &remotemedia_runtime_core::shm::broker::wire::PacketError,
) -> &'static str {
    use remotemedia_runtime_core::shm::broker::wire::PacketError;
    match error {
        PacketError::Oversized => "oversized",
        PacketError::ControlTruncated => "control_truncated",
        _ => "malformed",
    }
}

async fn receive(connection: &AsyncFd<OwnedFd>) -> Result<Packet, RecvError> {
    loop {
        let mut ready = connection.readable().await.map_err(RecvError::Io)?;
        match ready.try_io(|fd| match socket::recv(fd.get_ref().as_fd()) {
            Err(RecvError::Io(error)) if error.kind() == io::ErrorKind::WouldBlock => Err(error),
            other => Ok(other),
        }) {
            Ok(Ok(result)) => return result,
            Ok(Err(error)) => return Err(RecvError::Io(error)),
            Err(_would_block) => continue,
        }
    }
}

async fn send(
    connection: &AsyncFd<OwnedFd>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    loop {
        let mut ready = connection.writable().await?;
        match ready.try_io(|socket| socket::send(socket.get_ref().as_fd(), bytes, fd)) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}
