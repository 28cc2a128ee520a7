//! The client side of the broker: one session (connection) per [`BrokerClient`], blocking calls,
//! and the regions it holds, handed back to a restarted broker (Adopt) when it reconnects.

use std::collections::HashMap;
use std::io;
use std::num::NonZeroU64;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::memfd::{self, SealError};
use super::socket::{self, RecvError};
use super::wire::{
    self, ErrorCode, GrantToken, PacketError, Refusal, RegionHandleId, RegionKey, Request,
    Response, SessionStats, SessionToken,
};

/// Environment variable that turns the broker on for a client process: the sidecar's socket
/// directory, as `unix:///run/remotemedia` (or a plain absolute path). Unset: no broker.
pub const SIDECAR_ENV: &str = "REMOTEMEDIA_SIDECAR";
/// The broker's socket inside the sidecar's socket directory.
pub const BROKER_SOCKET: &str = "broker.sock";

/// Errors talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "failed to find the node broker: {SIDECAR_ENV}={value:?} is neither unix://<directory> nor an absolute path"
    )]
    BadAddress { value: String },
    #[error("failed to connect to the node broker at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to talk to the node broker")]
    Transport(#[source] RecvError),
    #[error("failed to {op}: the node broker answered {refusal}")]
    Refused { op: &'static str, refusal: Refusal },
    #[error("failed to {op}: the node broker sent a {got} reply")]
    UnexpectedReply { op: &'static str, got: &'static str },
    #[error("failed to accept a region from the node broker")]
    Seal(#[from] SealError),
    #[error("failed to {op}: {reason}")]
    BadRequest {
        op: &'static str,
        #[source]
        reason: PacketError,
    },
}

impl BrokerError {
    /// The broker's refusal code, when the broker refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { refusal, .. } => Some(refusal.code),
            _ => None,
        }
    }
}

/// A session with the node broker. Cheap to clone; clones share the session.
///
/// Regions come back as [`RegionHandle`]s; dropping the last clone of a handle releases this
/// session's hold. If the broker restarts, a watcher thread reconnects as soon as the new one
/// listens and hands every live handle back (Adopt), so other processes can keep opening this
/// process's regions by id; a call that finds the connection gone does the same first.
#[derive(Clone, Debug)]
pub struct BrokerClient {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    socket_path: PathBuf,
    label: String,
    connection: Mutex<Option<Connection>>,
    /// Counts handshakes, so the watcher can tell the connection it saw hang up from a newer one.
    generations: std::sync::atomic::AtomicU64,
    live: Mutex<Live>,
}

#[derive(Debug)]
struct Connection {
    socket: OwnedFd,
    token: SessionToken,
    generation: u64,
}

/// How long the watcher waits on one connection before checking that its client still exists.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Reconnect back-off while the broker is away: doubling from the first to the last.
const RETRY_DELAYS: (Duration, Duration) = (Duration::from_millis(20), Duration::from_secs(2));

/// Every handle alive in this process, so a reconnect can adopt them back.
#[derive(Debug, Default)]
struct Live {
    next: u64,
    handles: HashMap<u64, Weak<RegionHandle>>,
}

/// One hold on a brokered region: its sealed descriptor and size. Released on drop.
#[derive(Debug)]
pub struct RegionHandle {
    key: RegionKey,
    size: NonZeroU64,
    /// Allocated by this session (charged to it), as opposed to opened by id.
    owner: bool,
    label: String,
    fd: OwnedFd,
    slot: u64,
    client: Weak<Shared>,
}

impl RegionHandle {
    /// The region's id (a capability: hand it only to processes that may use the region).
    pub fn key(&self) -> RegionKey {
        self.key
    }

    /// The region's size in bytes (whole pages).
    pub fn size(&self) -> NonZeroU64 {
        self.size
    }

    /// The sealed memfd, for mapping.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for RegionHandle {
    fn drop(&mut self) {
        if let Some(shared) = self.client.upgrade() {
            shared.live().handles.remove(&self.slot);
            shared.release(self.key);
        }
    }
}

/// What a grant gave this session (see [`BrokerClient::redeem`]).
#[derive(Debug)]
pub struct Redeemed {
    /// The region within this session; the same for every grant of it while the session holds
    /// it.
    pub handle: RegionHandleId,
    pub size: NonZeroU64,
    /// The sealed memfd, only when the session did not hold the region yet (checked).
    pub fd: Option<OwnedFd>,
    /// Other handles of this session whose regions only this session still holds and no
    /// request uses: unmap them and [`BrokerClient::forget`] them.
    pub orphaned: Vec<RegionHandleId>,
}

impl BrokerClient {
    /// Connects to `<socket_dir>/broker.sock` and opens a session named `label` (shown, with
    /// counts and bytes, on the sidecar's `/debug/sessions`).
    pub fn connect(socket_dir: &Path, label: &str) -> Result<Self, BrokerError> {
        let label = wire::label(label.to_owned()).map_err(|reason| BrokerError::BadRequest {
            op: "open a broker session",
            reason,
        })?;
        let client = Self {
            shared: Arc::new(Shared {
                socket_path: socket_dir.join(BROKER_SOCKET),
                label,
                connection: Mutex::new(None),
                generations: Default::default(),
                live: Mutex::default(),
            }),
        };
        let mut connection = client.shared.connection();
        *connection = Some(client.shared.handshake(&mut Vec::new())?);
        drop(connection);
        let watched = Arc::downgrade(&client.shared);
        // Without the watcher the client still works; it only reconnects later, on its next call.
        if let Err(error) = std::thread::Builder::new()
            .name("remotemedia-broker-watch".into())
            .spawn(move || watch(watched))
        {
            tracing::warn!(%error, "failed to start the broker connection watcher");
        }
        Ok(client)
    }

    /// The process-wide session with the broker named by `REMOTEMEDIA_SIDECAR`, or `None` when
    /// it is unset. The first call connects; later calls share that session.
    pub fn from_env() -> Result<Option<Self>, BrokerError> {
        static PROCESS: Mutex<Option<(PathBuf, BrokerClient)>> = Mutex::new(None);
        let Some(dir) = socket_dir_from_env()? else {
            return Ok(None);
        };
        let mut process = PROCESS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, client)) = process.as_ref()
            && *cached == dir
        {
            return Ok(Some(client.clone()));
        }
        let client = Self::connect(&dir, &process_label())?;
        *process = Some((dir, client.clone()));
        Ok(Some(client))
    }

    /// Creates a region of at least `size` bytes (whole pages), charged to this session and to
    /// `label` within it (empty: the session only).
    pub fn allocate(&self, size: u64, label: &str) -> Result<Arc<RegionHandle>, BrokerError> {
        const OP: &str = "allocate a brokered region";
        let bad = |reason| BrokerError::BadRequest { op: OP, reason };
        let request = Request::Allocate {
            size: NonZeroU64::new(size)
                .filter(|s| s.get() <= wire::MAX_REGION_BYTES)
                .ok_or(bad(PacketError::BadSize { size }))?,
            label: wire::label(label.to_owned()).map_err(bad)?,
        };
        match self.shared.call(OP, &request)? {
            Response::Allocated { key, size, fd } => {
                self.shared.adopt_handle(key, size, true, label, fd)
            }
            other => Err(unexpected(OP, &other)),
        }
    }

    /// Opens the region `key` (allocated by any session); this session holds it until the handle
    /// drops. An unknown id and one that never existed are the same `NOT_FOUND`.
    pub fn open(&self, key: RegionKey) -> Result<Arc<RegionHandle>, BrokerError> {
        const OP: &str = "open a brokered region";
        match self.shared.call(OP, &Request::Open { key })? {
            Response::Opened { size, fd } => self.shared.adopt_handle(key, size, false, "", fd),
            other => Err(unexpected(OP, &other)),
        }
    }

    /// Turns a one-time grant (a model worker's side of a request the sidecar forwarded) into a
    /// hold on its region. The session keeps the hold until [`BrokerClient::forget`] or until it
    /// closes; after a broker restart the handles of the old session mean nothing (compare
    /// [`BrokerClient::session_token`]).
    pub fn redeem(&self, grant: GrantToken) -> Result<Redeemed, BrokerError> {
        const OP: &str = "redeem a region grant";
        match self.shared.call(OP, &Request::Redeem { grant })? {
            Response::Redeemed {
                handle,
                size,
                fd,
                orphaned,
            } => {
                if let Some(fd) = &fd {
                    memfd::verify(fd.as_fd(), size.get())?;
                }
                Ok(Redeemed {
                    handle,
                    size,
                    fd,
                    orphaned,
                })
            }
            other => Err(unexpected(OP, &other)),
        }
    }

    /// Drops the hold a [`BrokerClient::redeem`] gave this session.
    pub fn forget(&self, handle: RegionHandleId) -> Result<(), BrokerError> {
        const OP: &str = "forget a redeemed region";
        match self.shared.call(OP, &Request::Forget { handle })? {
            Response::Forgotten => Ok(()),
            other => Err(unexpected(OP, &other)),
        }
    }

    /// This session's handles (from [`BrokerClient::redeem`]) whose regions nobody else holds
    /// any more and no request uses; the same list every redemption's reply carries.
    pub fn orphans(&self) -> Result<Vec<RegionHandleId>, BrokerError> {
        const OP: &str = "list orphaned regions";
        match self.shared.call(OP, &Request::Orphans)? {
            Response::Orphans(orphaned) => Ok(orphaned),
            other => Err(unexpected(OP, &other)),
        }
    }

    /// This session's usage, as the broker counts it.
    pub fn stats(&self) -> Result<SessionStats, BrokerError> {
        const OP: &str = "read broker session stats";
        match self.shared.call(OP, &Request::Stats)? {
            Response::Stats(stats) => Ok(stats),
            other => Err(unexpected(OP, &other)),
        }
    }

    /// The session token that gRPC requests through the sidecar carry (`remotemedia-session`).
    /// It changes when the client reconnects to a restarted broker.
    pub fn session_token(&self) -> Option<SessionToken> {
        self.shared.connection().as_ref().map(|c| c.token)
    }
}

impl Shared {
    fn connection(&self) -> MutexGuard<'_, Option<Connection>> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `request` and returns the reply; a broker that went away (restarted) is reconnected
    /// to once, its live regions adopted back, and the request sent again.
    fn call(
        &self,
        op: &'static str,
        request: &Request<BorrowedFd<'_>>,
    ) -> Result<Response<OwnedFd>, BrokerError> {
        let bytes = request.encode();
        // Handles upgraded for Adopt are dropped only after the connection lock is released:
        // dropping the last one sends a Release, which takes that lock.
        let mut adopted = Vec::new();
        let result = (|| {
            let mut connection = self.connection();
            let mut retried = false;
            loop {
                let socket = match &mut *connection {
                    Some(connected) => connected.socket.as_fd(),
                    slot @ None => slot.insert(self.handshake(&mut adopted)?).socket.as_fd(),
                };
                match socket::round_trip(socket, &bytes, request.descriptor().copied()) {
                    Ok(packet) => {
                        let reply = decode_reply(packet);
                        if reply.is_err() {
                            *connection = None;
                        }
                        return reply
                            .map_err(BrokerError::Transport)
                            .and_then(|r| refused(op, r));
                    }
                    Err(error) => {
                        *connection = None;
                        if retried || !is_disconnect(&error) {
                            return Err(BrokerError::Transport(error));
                        }
                        retried = true;
                    }
                }
            }
        })();
        drop(adopted);
        result
    }

    /// Connects, says Hello, and adopts every live handle back (after a broker restart).
    fn handshake(&self, adopted: &mut Vec<Arc<RegionHandle>>) -> Result<Connection, BrokerError> {
        let connect_error = |source| BrokerError::Connect {
            path: self.socket_path.clone(),
            source,
        };
        let socket = socket::connect(&self.socket_path).map_err(connect_error)?;
        let hello = Request::<BorrowedFd<'_>>::Hello {
            label: self.label.clone(),
        };
        let token = match exchange(socket.as_fd(), "open a broker session", &hello)? {
            Response::Hello { token } => token,
            other => return Err(unexpected("open a broker session", &other)),
        };
        adopted.extend(self.live().handles.values().filter_map(Weak::upgrade));
        for handle in adopted.iter() {
            let adopt = Request::Adopt {
                key: handle.key,
                size: handle.size,
                label: handle.label.clone(),
                owner: handle.owner,
                fd: handle.fd.as_fd(),
            };
            match exchange(socket.as_fd(), "adopt a region", &adopt) {
                Ok(Response::Adopted) => {}
                // The region stays mapped here; the broker just does not know it any more.
                Ok(other) => tracing::warn!(reply = kind(&other), "broker did not adopt a region"),
                Err(error) => tracing::warn!(%error, "broker did not adopt a region"),
            }
        }
        let generation = 1 + self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Connection {
            socket,
            token,
            generation,
        })
    }

    /// Replaces the connection of generation `stale` (or no connection) with a fresh one, unless
    /// a call already did.
    fn reconnect(&self, stale: u64) -> Result<(), BrokerError> {
        let mut adopted = Vec::new();
        let result = {
            let mut connection = self.connection();
            match &*connection {
                Some(current) if current.generation != stale => Ok(()),
                _ => {
                    *connection = None;
                    self.handshake(&mut adopted)
                        .map(|fresh| *connection = Some(fresh))
                }
            }
        };
        // As in `call`: adopted handles may release on drop, which takes the connection lock.
        drop(adopted);
        result
    }

    /// Checks a received region and records it as live.
    fn adopt_handle(
        self: &Arc<Self>,
        key: RegionKey,
        size: NonZeroU64,
        owner: bool,
        label: &str,
        fd: OwnedFd,
    ) -> Result<Arc<RegionHandle>, BrokerError> {
        let mut live = self.live();
        let slot = live.next;
        live.next += 1;
        let handle = Arc::new(RegionHandle {
            key,
            size,
            owner,
            label: label.to_owned(),
            fd,
            slot,
            client: Arc::downgrade(self),
        });
        // Recorded before the check, so a refused region's drop releases it at the broker too.
        live.handles.insert(slot, Arc::downgrade(&handle));
        drop(live);
        memfd::verify(handle.fd(), size.get())?;
        Ok(handle)
    }

    /// Drops this session's hold on `key`. Never reconnects: a broker that restarted never
    /// knew the hold (it was not adopted back, since the handle is gone).
    fn release(&self, key: RegionKey) {
        let mut connection = self.connection();
        let Some(socket) = connection.as_ref().map(|c| c.socket.as_fd()) else {
            return;
        };
        let request = Request::<BorrowedFd<'_>>::Release { key };
        match exchange(socket, "release a region", &request) {
            Ok(Response::Released) => {}
            Ok(other) => tracing::warn!(reply = kind(&other), "broker did not release a region"),
            Err(BrokerError::Transport(_)) => *connection = None,
            Err(error) => tracing::warn!(%error, "broker did not release a region"),
        }
    }
}

/// The watcher thread: waits for the broker to hang up on the current connection (it restarted)
/// and reconnects right away, retrying with back-off while no broker listens. It holds only a
/// weak reference, and ends once the client is gone.
fn watch(shared: Weak<Shared>) {
    let mut delay = RETRY_DELAYS.0;
    loop {
        let Some(client) = shared.upgrade() else {
            return;
        };
        let watched = client
            .connection()
            .as_ref()
            .map(|c| (c.generation, c.socket.try_clone()));
        drop(client);
        let stale = match watched {
            Some((generation, Ok(socket))) => {
                if !hung_up(&socket) {
                    delay = RETRY_DELAYS.0;
                    continue;
                }
                generation
            }
            // No connection (a call failed, or the last reconnect did): try again after a pause.
            Some((_, Err(_))) | None => {
                std::thread::sleep(delay);
                0
            }
        };
        let Some(client) = shared.upgrade() else {
            return;
        };
        if let Err(error) = client.reconnect(stale) {
            tracing::debug!(%error, "broker not back yet");
            drop(client);
            std::thread::sleep(delay);
            delay = (delay * 2).min(RETRY_DELAYS.1);
        }
    }
}

/// Waits up to [`WATCH_INTERVAL`] for the peer to hang up; true if it did. Only hang-up events
/// are asked for, so replies that the connection's owner is about to read do not wake it.
fn hung_up(socket: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(socket, PollFlags::RDHUP)];
    let timeout = Timespec {
        tv_sec: WATCH_INTERVAL.as_secs() as i64,
        tv_nsec: i64::from(WATCH_INTERVAL.subsec_nanos()),
    };
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(0) | Err(rustix::io::Errno::INTR) => false,
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR),
        // Not a hang-up: pause so a persistent error cannot spin.
        Err(_) => {
            std::thread::sleep(WATCH_INTERVAL);
            false
        }
    }
}

/// One request and its reply on a connection that is not (yet) shared.
fn exchange(
    socket: BorrowedFd<'_>,
    op: &'static str,
    request: &Request<BorrowedFd<'_>>,
) -> Result<Response<OwnedFd>, BrokerError> {
    let packet = socket::round_trip(socket, &request.encode(), request.descriptor().copied())
        .map_err(BrokerError::Transport)?;
    decode_reply(packet)
        .map_err(BrokerError::Transport)
        .and_then(|reply| refused(op, reply))
}

fn decode_reply(packet: socket::Packet) -> Result<Response<OwnedFd>, RecvError> {
    Ok(wire::decode_response(&packet.bytes, packet.fds)?)
}

fn refused(op: &'static str, reply: Response<OwnedFd>) -> Result<Response<OwnedFd>, BrokerError> {
    match reply {
        Response::Error(refusal) => Err(BrokerError::Refused { op, refusal }),
        other => Ok(other),
    }
}

fn unexpected(op: &'static str, reply: &Response<OwnedFd>) -> BrokerError {
    BrokerError::UnexpectedReply {
        op,
        got: kind(reply),
    }
}

fn kind<F>(reply: &Response<F>) -> &'static str {
    match reply {
        Response::Hello { .. } => "hello",
        Response::Allocated { .. } => "allocate",
        Response::Opened { .. } => "open",
        Response::Released => "release",
        Response::Adopted => "adopt",
        Response::Stats(_) => "stats",
        Response::Redeemed { .. } => "redeem",
        Response::Forgotten => "forget",
        Response::Orphans(_) => "orphans",
        Response::Error(_) => "error",
    }
}

/// A dead peer, as opposed to a broken one: worth one reconnect.
fn is_disconnect(error: &RecvError) -> bool {
    match error {
        RecvError::Closed => true,
        RecvError::Io(error) => matches!(
            error.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::NotConnected
                | io::ErrorKind::ConnectionAborted
        ),
        RecvError::Packet(_) => false,
    }
}

/// The socket directory `REMOTEMEDIA_SIDECAR` names, if set.
pub fn socket_dir_from_env() -> Result<Option<PathBuf>, BrokerError> {
    let Some(value) = std::env::var_os(SIDECAR_ENV) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    let path = value.strip_prefix("unix://").unwrap_or(&value);
    if !path.starts_with('/') {
        return Err(BrokerError::BadAddress {
            value: value.into_owned(),
        });
    }
    Ok(Some(PathBuf::from(path)))
}

/// This program's name, reduced to the characters a label may hold.
fn process_label() -> String {
    let name = std::env::current_exe()
        .ok()
        .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:/@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(wire::MAX_LABEL_BYTES)
        .collect()
}
