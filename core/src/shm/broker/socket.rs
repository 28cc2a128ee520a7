//! One packet in, one packet out, on a `SOCK_SEQPACKET` Unix socket, with descriptors passed as
//! `SCM_RIGHTS`. Blocking and non-blocking sockets alike: a non-blocking socket reports
//! `WouldBlock` as an I/O error, which an async caller (the sidecar's `AsyncFd`) retries.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use super::wire::{MAX_DESCRIPTORS, MAX_PACKET_BYTES, PacketError};

/// Control buffer for exactly [`MAX_DESCRIPTORS`] descriptors: a sender that attaches more gets
/// `MSG_CTRUNC`, which is a protocol error.
const CONTROL_BYTES: usize = rustix::cmsg_space!(ScmRights(MAX_DESCRIPTORS));

/// A received packet: its bytes and the descriptors that came with it (close-on-exec).
#[derive(Debug)]
pub struct Packet {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// Why no packet came.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("failed to receive a broker packet")]
    Io(#[source] io::Error),
    /// The peer closed its end (or sent an empty packet, which no message encodes to).
    #[error("failed to receive a broker packet: the peer closed the connection")]
    Closed,
    #[error(transparent)]
    Packet(#[from] PacketError),
}

/// A `SOCK_SEQPACKET` Unix socket connected to `path`, blocking, close-on-exec.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&socket, &SocketAddrUnix::new(path)?)?;
    Ok(socket)
}

/// A listening `SOCK_SEQPACKET` Unix socket bound at `path`, non-blocking, close-on-exec.
pub fn listen(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::net::bind(&socket, &SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&socket, backlog)?;
    Ok(socket)
}

/// Accepts one connection from a listening socket, non-blocking, close-on-exec.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rustix::net::accept_with(
        listener,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
    )?)
}

/// Sends one packet, with `fd` attached when given. `MSG_NOSIGNAL`: a closed peer is an
/// `EPIPE` error, not a signal that kills a library's host process.
pub fn send(socket: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); CONTROL_BYTES];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        // Cannot fail: the buffer is sized for exactly one descriptor.
        let pushed = control.push(SendAncillaryMessage::ScmRights(&fds));
        debug_assert!(pushed);
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != bytes.len() {
        // A seqpacket send is all or nothing; anything else means the socket is not one.
        return Err(io::Error::other("failed to send a whole broker packet"));
    }
    Ok(())
}

/// Receives one packet. Oversized packets, truncated control data and empty packets are
/// errors; any descriptors that did arrive are closed when the error drops them.
pub fn recv(socket: BorrowedFd<'_>) -> Result<Packet, RecvError> {
    // One byte more than the cap, so an oversized packet is seen even without MSG_TRUNC.
    let mut bytes = vec![0u8; MAX_PACKET_BYTES + 1];
    let mut space = [MaybeUninit::uninit(); CONTROL_BYTES];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        socket,
        &mut [IoSliceMut::new(&mut bytes)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|errno| RecvError::Io(errno.into()))?;
    // Take ownership of every descriptor first, so each is closed whatever happens next.
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if received.flags.contains(ReturnFlags::CTRUNC) {
        return Err(PacketError::ControlTruncated.into());
    }
    if received.flags.contains(ReturnFlags::TRUNC) || received.bytes > MAX_PACKET_BYTES {
        return Err(PacketError::Oversized.into());
    }
    if received.bytes == 0 {
        return Err(RecvError::Closed);
    }
    bytes.truncate(received.bytes);
    Ok(Packet { bytes, fds })
}

/// Sends a packet and waits for the one reply, on a blocking socket.
pub fn round_trip(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<Packet, RecvError> {
    send(socket, bytes, fd).map_err(RecvError::Io)?;
    recv(socket)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use rustix::io::FdFlags;

    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    fn memfd() -> OwnedFd {
        rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::empty()).unwrap()
    }

    #[test]
    fn a_packet_arrives_whole_with_its_descriptor_close_on_exec() {
        let (a, b) = pair();
        let fd = memfd();
        assert!(
            !rustix::io::fcntl_getfd(&fd)
                .unwrap()
                .contains(FdFlags::CLOEXEC)
        );
        send(a.as_fd(), b"hello", Some(fd.as_fd())).unwrap();
        let packet = recv(b.as_fd()).unwrap();
        assert_eq!(packet.bytes, b"hello");
        assert_eq!(packet.fds.len(), 1);
        let flags = rustix::io::fcntl_getfd(&packet.fds[0]).unwrap();
        assert!(flags.contains(FdFlags::CLOEXEC), "MSG_CMSG_CLOEXEC");
    }

    #[test]
    fn too_many_descriptors_and_oversized_packets_are_errors() {
        let (a, b) = pair();
        let fd = memfd();
        let fds = [fd.as_fd(); 8];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(&a, &[IoSlice::new(b"x")], &mut control, SendFlags::empty()).unwrap();
        assert!(matches!(
            recv(b.as_fd()),
            Err(RecvError::Packet(PacketError::ControlTruncated))
        ));

        send(a.as_fd(), &vec![1; MAX_PACKET_BYTES + 1], None).unwrap();
        assert!(matches!(
            recv(b.as_fd()),
            Err(RecvError::Packet(PacketError::Oversized))
        ));
        send(a.as_fd(), &vec![1; MAX_PACKET_BYTES], None).unwrap();
        assert_eq!(recv(b.as_fd()).unwrap().bytes.len(), MAX_PACKET_BYTES);
    }

    #[test]
    fn a_closed_peer_reads_as_closed() {
        let (a, b) = pair();
        drop(a);
        assert!(matches!(recv(b.as_fd()), Err(RecvError::Closed)));
    }
}
