//! Which client connection a call came on: Triton-style registrations through the sidecar are
//! scoped to the connection that made them, and go when it closes. The listeners hand every
//! accepted connection a [`ConnectionId`] (a call reads it from its `ConnectInfo`), and the
//! connection's stream tells the [`NamedRegistry`] when it is dropped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::named::NamedRegistry;

/// An accepted connection, numbered across every listener of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId(u64);

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A listener whose connections carry their [`ConnectionId`].
pub struct Tracked<L> {
    inner: L,
    named: Arc<NamedRegistry>,
}

impl<L> Tracked<L> {
    pub fn new(inner: L, named: Arc<NamedRegistry>) -> Self {
        Self { inner, named }
    }
}

impl<L: Listener> Listener for Tracked<L> {
    type Io = TrackedIo<L::Io>;
    type Addr = ConnectionId;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, _) = self.inner.accept().await;
        let id = ConnectionId(NEXT.fetch_add(1, Ordering::Relaxed));
        let named = self.named.clone();
        (TrackedIo { io, id, named }, id)
    }

    /// A listener has no connection of its own: id 0 is never handed out.
    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(ConnectionId(0))
    }
}

/// A connection's stream; dropping it (the connection closed) drops its registrations.
pub struct TrackedIo<T> {
    io: T,
    id: ConnectionId,
    named: Arc<NamedRegistry>,
}

impl<T> Drop for TrackedIo<T> {
    fn drop(&mut self) {
        self.named.drop_connection(self.id);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
