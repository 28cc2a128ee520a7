//! Broker packets as validated values: decoding and encoding shared by the client and the server.
//!
//! Everything that arrives on the broker socket is decoded here, from its bytes and the
//! descriptors that came with it, into a [`Request`] or [`Response`] whose fields were checked:
//! ids of exactly 16 bytes, non-zero sizes within bounds, short printable labels, and exactly the
//! descriptors the message kind carries. The decoder is generic over the descriptor type so that
//! property tests and the fuzz target can run it without opening files.

use std::fmt;
use std::num::NonZeroU64;

use prost::Message;
use remotemedia_proto::broker as pb;

/// Largest packet either side sends or accepts. Every message is a handful of short fields;
/// a `Stats` reply with many labels is the largest.
pub const MAX_PACKET_BYTES: usize = 16 * 1024;
/// Most descriptors one packet carries (the receive control buffer is sized for exactly this).
pub const MAX_DESCRIPTORS: usize = 1;
/// Longest label, in bytes.
pub const MAX_LABEL_BYTES: usize = 128;
/// Largest region anyone may ask for: far beyond any node, small enough that rounding up to
/// pages and summing a session's regions never overflows.
pub const MAX_REGION_BYTES: u64 = 1 << 46;
/// Most labels a `Stats` reply lists.
pub const MAX_STATS_LABELS: usize = 64;

/// A brokered region's id: 128 random bits, a capability. `Debug` never shows it; the hex form
/// ([`RegionKey::to_hex`]) is for the owner to hand to the processes it chooses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionKey([u8; 16]);

/// A session's token (Hello's reply): 128 random bits, carried by the session's gRPC requests.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionToken([u8; 16]);

/// A one-time grant for a region, issued by the sidecar's router for one forwarded request and
/// redeemed by the colocated worker (Redeem): 128 random bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrantToken([u8; 16]);

/// A region as a session that redeemed a grant for it knows it: a per-session number, never
/// the region's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionHandleId(pub NonZeroU64);

macro_rules! secret_bytes {
    ($name:ident) => {
        impl $name {
            /// 16 bytes from the system's random source.
            pub fn random() -> Result<Self, getrandom::Error> {
                let mut bytes = [0; 16];
                getrandom::fill(&mut bytes)?;
                Ok(Self(bytes))
            }

            /// Wraps raw bytes.
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// 32 lowercase hex digits.
            pub fn to_hex(&self) -> String {
                self.0.iter().map(|b| format!("{b:02x}")).collect()
            }

            /// Parses 32 hex digits (either case); `None` for anything else.
            pub fn parse_hex(text: &str) -> Option<Self> {
                let text = text.as_bytes();
                // `from_str_radix` alone would also take a sign ("+0").
                if text.len() != 32 || !text.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let mut bytes = [0; 16];
                for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
                    let pair = std::str::from_utf8(pair).ok()?;
                    *byte = u8::from_str_radix(pair, 16).ok()?;
                }
                Some(Self(bytes))
            }

            fn from_wire(bytes: &[u8]) -> Result<Self, PacketError> {
                bytes
                    .try_into()
                    .map(Self)
                    .map_err(|_| PacketError::BadId { len: bytes.len() })
            }
        }

        impl fmt::Debug for $name {
            // Ids and tokens are capabilities: they must not reach logs through `{:?}`.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(redacted)"))
            }
        }
    };
}

secret_bytes!(RegionKey);
secret_bytes!(SessionToken);
secret_bytes!(GrantToken);

/// A request, validated. `F` is the descriptor type (`OwnedFd` received, `BorrowedFd` to send).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<F> {
    Hello {
        label: String,
    },
    Allocate {
        size: NonZeroU64,
        label: String,
    },
    Open {
        key: RegionKey,
    },
    Release {
        key: RegionKey,
    },
    Adopt {
        key: RegionKey,
        size: NonZeroU64,
        label: String,
        owner: bool,
        fd: F,
    },
    Stats,
    Redeem {
        grant: GrantToken,
    },
    Forget {
        handle: RegionHandleId,
    },
    Orphans,
}

/// A reply, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response<F> {
    Hello {
        token: SessionToken,
    },
    Allocated {
        key: RegionKey,
        size: NonZeroU64,
        fd: F,
    },
    Opened {
        size: NonZeroU64,
        fd: F,
    },
    Released,
    Adopted,
    Stats(SessionStats),
    /// The descriptor comes only when the session did not hold the region yet. `orphaned`:
    /// the session's other handles that only it still holds (see the protocol).
    Redeemed {
        handle: RegionHandleId,
        size: NonZeroU64,
        fd: Option<F>,
        orphaned: Vec<RegionHandleId>,
    },
    Forgotten,
    /// The session's handles that only it still holds and no request uses.
    Orphans(Vec<RegionHandleId>),
    Error(Refusal),
}

/// A session's own usage, as the `Stats` reply reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Regions the session holds (allocated or opened).
    pub held_regions: u64,
    /// Their total size.
    pub held_bytes: u64,
    /// Bytes charged to the session's quota.
    pub charged_bytes: u64,
    /// Charges by allocation label.
    pub labels: Vec<LabelUsage>,
}

/// Regions and bytes charged to one label of a session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelUsage {
    pub label: String,
    pub regions: u64,
    pub bytes: u64,
}

/// Why the broker refused a request: a gRPC-style code and a short message for people.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// The codes a refusal carries (numbered as gRPC status codes on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    FailedPrecondition,
    Internal,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::NotFound => "NOT_FOUND",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Internal => "INTERNAL",
        })
    }
}

impl ErrorCode {
    fn to_wire(self) -> pb::error::Code {
        match self {
            Self::InvalidArgument => pb::error::Code::InvalidArgument,
            Self::NotFound => pb::error::Code::NotFound,
            Self::ResourceExhausted => pb::error::Code::ResourceExhausted,
            Self::FailedPrecondition => pb::error::Code::FailedPrecondition,
            Self::Internal => pb::error::Code::Internal,
        }
    }

    fn from_wire(code: i32) -> Result<Self, PacketError> {
        match pb::error::Code::try_from(code) {
            Ok(pb::error::Code::InvalidArgument) => Ok(Self::InvalidArgument),
            Ok(pb::error::Code::NotFound) => Ok(Self::NotFound),
            Ok(pb::error::Code::ResourceExhausted) => Ok(Self::ResourceExhausted),
            Ok(pb::error::Code::FailedPrecondition) => Ok(Self::FailedPrecondition),
            Ok(pb::error::Code::Internal) => Ok(Self::Internal),
            Ok(pb::error::Code::Unspecified) | Err(_) => Err(PacketError::UnknownCode { code }),
        }
    }
}

/// Why a packet was refused. Any of these closes the connection it arrived on.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("failed to read broker packet: empty")]
    Empty,
    #[error("failed to read broker packet: larger than {MAX_PACKET_BYTES} bytes")]
    Oversized,
    #[error("failed to read broker packet: its descriptors did not fit the control buffer")]
    ControlTruncated,
    #[error("failed to decode broker packet")]
    Malformed(#[source] prost::DecodeError),
    #[error("failed to decode broker packet: no message kind set")]
    MissingKind,
    #[error("failed to decode broker packet: id of {len} bytes, expected 16")]
    BadId { len: usize },
    #[error("failed to decode broker packet: size {size} is not between 1 and {MAX_REGION_BYTES}")]
    BadSize { size: u64 },
    #[error("failed to decode broker packet: label of {len} bytes, at most {MAX_LABEL_BYTES}")]
    LabelTooLong { len: usize },
    #[error("failed to decode broker packet: label has a character outside [A-Za-z0-9._:/@-]")]
    LabelCharacters,
    #[error(
        "failed to decode broker packet: {kind} carries {count} descriptors, expected {expected}"
    )]
    Descriptors {
        kind: &'static str,
        count: usize,
        expected: usize,
    },
    #[error(
        "failed to decode broker packet: stats list {count} labels, at most {MAX_STATS_LABELS}"
    )]
    TooManyLabels { count: usize },
    #[error("failed to decode broker packet: unknown error code {code}")]
    UnknownCode { code: i32 },
    #[error("failed to decode broker packet: region handle 0")]
    ZeroHandle,
}

/// Decodes a request and checks it carries exactly the descriptors its kind needs.
pub fn decode_request<F>(bytes: &[u8], fds: Vec<F>) -> Result<Request<F>, PacketError> {
    use pb::request::Kind;
    let kind = decode::<pb::Request>(bytes)?
        .kind
        .ok_or(PacketError::MissingKind)?;
    Ok(match kind {
        Kind::Hello(hello) => {
            no_descriptors("hello", fds)?;
            Request::Hello {
                label: label(hello.label)?,
            }
        }
        Kind::Allocate(allocate) => {
            no_descriptors("allocate", fds)?;
            Request::Allocate {
                size: size(allocate.size)?,
                label: label(allocate.label)?,
            }
        }
        Kind::Open(open) => {
            no_descriptors("open", fds)?;
            Request::Open {
                key: RegionKey::from_wire(&open.region_id)?,
            }
        }
        Kind::Release(release) => {
            no_descriptors("release", fds)?;
            Request::Release {
                key: RegionKey::from_wire(&release.region_id)?,
            }
        }
        Kind::Adopt(adopt) => {
            let key = RegionKey::from_wire(&adopt.region_id)?;
            let size = size(adopt.size)?;
            let label = label(adopt.label)?;
            Request::Adopt {
                key,
                size,
                label,
                owner: adopt.owner,
                fd: one_descriptor("adopt", fds)?,
            }
        }
        Kind::Stats(pb::GetStats {}) => {
            no_descriptors("stats", fds)?;
            Request::Stats
        }
        Kind::Redeem(redeem) => {
            no_descriptors("redeem", fds)?;
            Request::Redeem {
                grant: GrantToken::from_wire(&redeem.grant)?,
            }
        }
        Kind::Forget(forget) => {
            no_descriptors("forget", fds)?;
            Request::Forget {
                handle: handle(forget.handle)?,
            }
        }
        Kind::Orphans(pb::GetOrphans {}) => {
            no_descriptors("orphans", fds)?;
            Request::Orphans
        }
    })
}

/// Decodes a reply and checks it carries exactly the descriptors its kind needs.
pub fn decode_response<F>(bytes: &[u8], fds: Vec<F>) -> Result<Response<F>, PacketError> {
    use pb::response::Kind;
    let kind = decode::<pb::Response>(bytes)?
        .kind
        .ok_or(PacketError::MissingKind)?;
    Ok(match kind {
        Kind::Hello(hello) => {
            no_descriptors("hello reply", fds)?;
            Response::Hello {
                token: SessionToken::from_wire(&hello.session_token)?,
            }
        }
        Kind::Allocate(allocate) => {
            let key = RegionKey::from_wire(&allocate.region_id)?;
            let size = size(allocate.size)?;
            Response::Allocated {
                key,
                size,
                fd: one_descriptor("allocate reply", fds)?,
            }
        }
        Kind::Open(open) => {
            let size = size(open.size)?;
            Response::Opened {
                size,
                fd: one_descriptor("open reply", fds)?,
            }
        }
        Kind::Release(pb::ReleaseReply {}) => {
            no_descriptors("release reply", fds)?;
            Response::Released
        }
        Kind::Adopt(pb::AdoptReply {}) => {
            no_descriptors("adopt reply", fds)?;
            Response::Adopted
        }
        Kind::Stats(stats) => {
            no_descriptors("stats reply", fds)?;
            if stats.labels.len() > MAX_STATS_LABELS {
                return Err(PacketError::TooManyLabels {
                    count: stats.labels.len(),
                });
            }
            let labels = stats
                .labels
                .into_iter()
                .map(|usage| {
                    Ok(LabelUsage {
                        label: label(usage.label)?,
                        regions: usage.regions,
                        bytes: usage.bytes,
                    })
                })
                .collect::<Result<_, PacketError>>()?;
            Response::Stats(SessionStats {
                held_regions: stats.held_regions,
                held_bytes: stats.held_bytes,
                charged_bytes: stats.charged_bytes,
                labels,
            })
        }
        Kind::Redeem(redeem) => {
            let handle = handle(redeem.handle)?;
            let size = size(redeem.size)?;
            let orphaned = handles(&redeem.orphaned)?;
            let fd = if redeem.attached {
                Some(one_descriptor("redeem reply", fds)?)
            } else {
                no_descriptors("redeem reply", fds)?;
                None
            };
            Response::Redeemed {
                handle,
                size,
                fd,
                orphaned,
            }
        }
        Kind::Forget(pb::ForgetReply {}) => {
            no_descriptors("forget reply", fds)?;
            Response::Forgotten
        }
        Kind::Orphans(orphans) => {
            no_descriptors("orphans reply", fds)?;
            Response::Orphans(handles(&orphans.orphaned)?)
        }
        Kind::Error(error) => {
            no_descriptors("error reply", fds)?;
            // The message is for people; cap it rather than refuse the reply.
            let mut message = error.message;
            if message.len() > 512 {
                let end = (0..=512).rev().find(|&i| message.is_char_boundary(i));
                message.truncate(end.unwrap_or(0));
            }
            Response::Error(Refusal {
                code: ErrorCode::from_wire(error.code)?,
                message,
            })
        }
    })
}

impl<F> Request<F> {
    /// The message bytes (the descriptor, if any, travels beside them: [`Request::descriptor`]).
    pub fn encode(&self) -> Vec<u8> {
        use pb::request::Kind;
        let kind = match self {
            Self::Hello { label } => Kind::Hello(pb::Hello {
                label: label.clone(),
            }),
            Self::Allocate { size, label } => Kind::Allocate(pb::Allocate {
                size: size.get(),
                label: label.clone(),
            }),
            Self::Open { key } => Kind::Open(pb::Open {
                region_id: key.0.to_vec(),
            }),
            Self::Release { key } => Kind::Release(pb::Release {
                region_id: key.0.to_vec(),
            }),
            Self::Adopt {
                key,
                size,
                label,
                owner,
                fd: _,
            } => Kind::Adopt(pb::Adopt {
                region_id: key.0.to_vec(),
                size: size.get(),
                label: label.clone(),
                owner: *owner,
            }),
            Self::Stats => Kind::Stats(pb::GetStats {}),
            Self::Redeem { grant } => Kind::Redeem(pb::Redeem {
                grant: grant.0.to_vec(),
            }),
            Self::Forget { handle } => Kind::Forget(pb::Forget {
                handle: handle.0.get(),
            }),
            Self::Orphans => Kind::Orphans(pb::GetOrphans {}),
        };
        pb::Request { kind: Some(kind) }.encode_to_vec()
    }

    /// The descriptor this request carries.
    pub fn descriptor(&self) -> Option<&F> {
        match self {
            Self::Adopt { fd, .. } => Some(fd),
            _ => None,
        }
    }

    /// The message kind, for logs and metrics (a bounded set).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Allocate { .. } => "allocate",
            Self::Open { .. } => "open",
            Self::Release { .. } => "release",
            Self::Adopt { .. } => "adopt",
            Self::Stats => "stats",
            Self::Redeem { .. } => "redeem",
            Self::Forget { .. } => "forget",
            Self::Orphans => "orphans",
        }
    }
}

impl<F> Response<F> {
    /// The message bytes (the descriptor, if any, travels beside them: [`Response::descriptor`]).
    pub fn encode(&self) -> Vec<u8> {
        use pb::response::Kind;
        let kind = match self {
            Self::Hello { token } => Kind::Hello(pb::HelloReply {
                session_token: token.0.to_vec(),
            }),
            Self::Allocated { key, size, fd: _ } => Kind::Allocate(pb::AllocateReply {
                region_id: key.0.to_vec(),
                size: size.get(),
            }),
            Self::Opened { size, fd: _ } => Kind::Open(pb::OpenReply { size: size.get() }),
            Self::Released => Kind::Release(pb::ReleaseReply {}),
            Self::Adopted => Kind::Adopt(pb::AdoptReply {}),
            Self::Stats(stats) => Kind::Stats(pb::Stats {
                held_regions: stats.held_regions,
                held_bytes: stats.held_bytes,
                charged_bytes: stats.charged_bytes,
                labels: stats
                    .labels
                    .iter()
                    .take(MAX_STATS_LABELS)
                    .map(|usage| pb::LabelUsage {
                        label: usage.label.clone(),
                        regions: usage.regions,
                        bytes: usage.bytes,
                    })
                    .collect(),
            }),
            Self::Redeemed {
                handle,
                size,
                fd,
                orphaned,
            } => Kind::Redeem(pb::RedeemReply {
                handle: handle.0.get(),
                size: size.get(),
                attached: fd.is_some(),
                orphaned: wire_handles(orphaned),
            }),
            Self::Forgotten => Kind::Forget(pb::ForgetReply {}),
            Self::Orphans(orphaned) => Kind::Orphans(pb::Orphans {
                orphaned: wire_handles(orphaned),
            }),
            Self::Error(refusal) => Kind::Error(pb::Error {
                code: refusal.code.to_wire().into(),
                message: refusal.message.clone(),
            }),
        };
        pb::Response { kind: Some(kind) }.encode_to_vec()
    }

    /// The descriptor this reply carries.
    pub fn descriptor(&self) -> Option<&F> {
        match self {
            Self::Allocated { fd, .. } | Self::Opened { fd, .. } => Some(fd),
            Self::Redeemed { fd, .. } => fd.as_ref(),
            _ => None,
        }
    }
}

/// Checks a label: short, and only characters that are safe in logs, metrics and URLs.
pub fn label(label: String) -> Result<String, PacketError> {
    if label.len() > MAX_LABEL_BYTES {
        return Err(PacketError::LabelTooLong { len: label.len() });
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._:/@-".contains(&b);
    if !label.bytes().all(allowed) {
        return Err(PacketError::LabelCharacters);
    }
    Ok(label)
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, PacketError> {
    if bytes.is_empty() {
        return Err(PacketError::Empty);
    }
    if bytes.len() > MAX_PACKET_BYTES {
        return Err(PacketError::Oversized);
    }
    M::decode(bytes).map_err(PacketError::Malformed)
}

fn size(size: u64) -> Result<NonZeroU64, PacketError> {
    NonZeroU64::new(size)
        .filter(|size| size.get() <= MAX_REGION_BYTES)
        .ok_or(PacketError::BadSize { size })
}

fn handle(handle: u64) -> Result<RegionHandleId, PacketError> {
    NonZeroU64::new(handle)
        .map(RegionHandleId)
        .ok_or(PacketError::ZeroHandle)
}

fn handles(handles: &[u64]) -> Result<Vec<RegionHandleId>, PacketError> {
    handles.iter().map(|h| handle(*h)).collect()
}

fn wire_handles(handles: &[RegionHandleId]) -> Vec<u64> {
    handles.iter().map(|handle| handle.0.get()).collect()
}

fn no_descriptors<F>(kind: &'static str, fds: Vec<F>) -> Result<(), PacketError> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(PacketError::Descriptors {
            kind,
            count: fds.len(),
            expected: 0,
        })
    }
}

fn one_descriptor<F>(kind: &'static str, fds: Vec<F>) -> Result<F, PacketError> {
    let count = fds.len();
    let mut fds = fds.into_iter();
    match (fds.next(), fds.next()) {
        (Some(fd), None) => Ok(fd),
        _ => Err(PacketError::Descriptors {
            kind,
            count,
            expected: 1,
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(byte: u8) -> RegionKey {
        RegionKey([byte; 16])
    }

    fn nz(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    fn label_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._:/@-]{0,128}"
    }

    fn request_strategy() -> impl Strategy<Value = Request<u8>> {
        let key = any::<[u8; 16]>().prop_map(RegionKey);
        let size = (1..=MAX_REGION_BYTES).prop_map(nz);
        prop_oneof![
            label_strategy().prop_map(|label| Request::Hello { label }),
            (size.clone(), label_strategy())
                .prop_map(|(size, label)| Request::Allocate { size, label }),
            key.clone().prop_map(|key| Request::Open { key }),
            key.clone().prop_map(|key| Request::Release { key }),
            (key, size, label_strategy(), any::<bool>(), any::<u8>()).prop_map(
                |(key, size, label, owner, fd)| Request::Adopt {
                    key,
                    size,
                    label,
                    owner,
                    fd
                }
            ),
            Just(Request::Stats),
            any::<[u8; 16]>().prop_map(|grant| Request::Redeem {
                grant: GrantToken(grant)
            }),
            (1..=u64::MAX).prop_map(|handle| Request::Forget {
                handle: RegionHandleId(nz(handle))
            }),
            Just(Request::Orphans),
        ]
    }

    fn response_strategy() -> impl Strategy<Value = Response<u8>> {
        (
            1..=u64::MAX,
            1..=MAX_REGION_BYTES,
            any::<Option<u8>>(),
            proptest::collection::vec(1..=u64::MAX, 0..4),
        )
            .prop_map(|(handle, size, fd, orphaned)| Response::Redeemed {
                handle: RegionHandleId(nz(handle)),
                size: nz(size),
                fd,
                orphaned: orphaned
                    .into_iter()
                    .map(|h| RegionHandleId(nz(h)))
                    .collect(),
            })
    }

    fn fds_of<F: Copy>(request: &Request<F>) -> Vec<F> {
        request.descriptor().copied().into_iter().collect()
    }

    #[test]
    fn region_keys_round_trip_through_hex_and_never_print() {
        let key = RegionKey::random().unwrap();
        assert_eq!(RegionKey::parse_hex(&key.to_hex()), Some(key));
        assert_eq!(
            RegionKey::parse_hex(&key.to_hex().to_uppercase()),
            Some(key)
        );
        assert_eq!(format!("{key:?}"), "RegionKey(redacted)");
        assert!(!format!("{:?}", Request::<u8>::Open { key }).contains(&key.to_hex()));
        for bad in [
            "",
            "00",
            &"g".repeat(32),
            &"0".repeat(33),
            "+0000000000000000000000000000000",
        ] {
            assert_eq!(RegionKey::parse_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grants_never_print_and_handle_zero_is_refused() {
        let grant = GrantToken::random().unwrap();
        assert_eq!(format!("{grant:?}"), "GrantToken(redacted)");
        let forget = pb::Request {
            kind: Some(pb::request::Kind::Forget(pb::Forget { handle: 0 })),
        };
        assert!(matches!(
            decode_request::<u8>(&forget.encode_to_vec(), vec![]),
            Err(PacketError::ZeroHandle)
        ));
        let orphan_zero = pb::Response {
            kind: Some(pb::response::Kind::Redeem(pb::RedeemReply {
                handle: 1,
                size: 4096,
                attached: false,
                orphaned: vec![2, 0],
            })),
        };
        assert!(matches!(
            decode_response::<u8>(&orphan_zero.encode_to_vec(), vec![]),
            Err(PacketError::ZeroHandle)
        ));
        let orphans_zero = pb::Response {
            kind: Some(pb::response::Kind::Orphans(pb::Orphans {
                orphaned: vec![3, 0],
            })),
        };
        assert!(matches!(
            decode_response::<u8>(&orphans_zero.encode_to_vec(), vec![]),
            Err(PacketError::ZeroHandle)
        ));
    }

    #[test]
    fn an_orphans_reply_round_trips_and_carries_no_descriptor() {
        let reply = Response::<u8>::Orphans(vec![RegionHandleId(nz(3)), RegionHandleId(nz(9))]);
        assert_eq!(decode_response(&reply.encode(), vec![]).unwrap(), reply);
        assert_eq!(
            decode_response::<u8>(&Response::<u8>::Orphans(vec![]).encode(), vec![]).unwrap(),
            Response::Orphans(vec![])
        );
        assert!(matches!(
            decode_response(&reply.encode(), vec![7u8]),
            Err(PacketError::Descriptors {
                kind: "orphans reply",
                count: 1,
                expected: 0
            })
        ));
    }

    #[test]
    fn a_descriptor_on_a_message_that_takes_none_is_refused() {
        let bytes = Request::<u8>::Stats.encode();
        assert!(matches!(
            decode_request(&bytes, vec![7u8]),
            Err(PacketError::Descriptors {
                kind: "stats",
                count: 1,
                expected: 0
            })
        ));
    }

    #[test]
    fn adopt_without_its_descriptor_is_refused() {
        let adopt = Request::Adopt {
            key: key(1),
            size: nz(4096),
            label: String::new(),
            owner: true,
            fd: 0u8,
        };
        assert!(matches!(
            decode_request::<u8>(&adopt.encode(), vec![]),
            Err(PacketError::Descriptors {
                kind: "adopt",
                count: 0,
                expected: 1
            })
        ));
    }

    #[test]
    fn ids_of_the_wrong_length_zero_sizes_and_bad_labels_are_refused() {
        let open = pb::Request {
            kind: Some(pb::request::Kind::Open(pb::Open {
                region_id: vec![0; 15],
            })),
        };
        assert!(matches!(
            decode_request::<u8>(&open.encode_to_vec(), vec![]),
            Err(PacketError::BadId { len: 15 })
        ));
        let allocate = |size, label: &str| pb::Request {
            kind: Some(pb::request::Kind::Allocate(pb::Allocate {
                size,
                label: label.into(),
            })),
        };
        assert!(matches!(
            decode_request::<u8>(&allocate(0, "").encode_to_vec(), vec![]),
            Err(PacketError::BadSize { size: 0 })
        ));
        assert!(matches!(
            decode_request::<u8>(&allocate(MAX_REGION_BYTES + 1, "").encode_to_vec(), vec![]),
            Err(PacketError::BadSize { .. })
        ));
        assert!(matches!(
            decode_request::<u8>(&allocate(1, "a b").encode_to_vec(), vec![]),
            Err(PacketError::LabelCharacters)
        ));
        assert!(matches!(
            decode_request::<u8>(&allocate(1, &"a".repeat(129)).encode_to_vec(), vec![]),
            Err(PacketError::LabelTooLong { len: 129 })
        ));
    }

    #[test]
    fn empty_oversized_and_kindless_packets_are_refused() {
        assert!(matches!(
            decode_request::<u8>(&[], vec![]),
            Err(PacketError::Empty)
        ));
        let big = vec![0u8; MAX_PACKET_BYTES + 1];
        assert!(matches!(
            decode_request::<u8>(&big, vec![]),
            Err(PacketError::Oversized)
        ));
        let kindless = pb::Request { kind: None }.encode_to_vec();
        // An empty message encodes to no bytes; add an unknown field so it is not empty.
        let mut unknown_only = kindless.clone();
        unknown_only.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
        assert!(matches!(
            decode_request::<u8>(&unknown_only, vec![]),
            Err(PacketError::MissingKind)
        ));
    }

    #[test]
    fn error_replies_keep_their_code_and_cap_their_message() {
        let reply = Response::<u8>::Error(Refusal {
            code: ErrorCode::NotFound,
            message: "é".repeat(400),
        });
        match decode_response::<u8>(&reply.encode(), vec![]).unwrap() {
            Response::Error(refusal) => {
                assert_eq!(refusal.code, ErrorCode::NotFound);
                assert!(refusal.message.len() <= 512);
            }
            other => panic!("{other:?}"),
        }
        let unspecified = pb::Response {
            kind: Some(pb::response::Kind::Error(pb::Error::default())),
        };
        assert!(matches!(
            decode_response::<u8>(&unspecified.encode_to_vec(), vec![]),
            Err(PacketError::UnknownCode { code: 0 })
        ));
    }

    proptest! {
        #[test]
        fn every_valid_request_round_trips(request in request_strategy()) {
            let fds = fds_of(&request);
            let decoded = decode_request(&request.encode(), fds).unwrap();
            prop_assert_eq!(decoded, request);
        }

        #[test]
        fn redeem_replies_round_trip_with_exactly_the_descriptor_they_announce(
            response in response_strategy(),
        ) {
            let fds: Vec<u8> = response.descriptor().copied().into_iter().collect();
            let decoded = decode_response(&response.encode(), fds.clone()).unwrap();
            prop_assert_eq!(&decoded, &response);
            // One descriptor more or less than announced is refused.
            let mut other = fds;
            if other.pop().is_none() {
                other.push(3);
            }
            let refused = matches!(
                decode_response(&response.encode(), other),
                Err(PacketError::Descriptors { .. })
            );
            prop_assert!(refused);
        }

        #[test]
        fn a_request_with_an_extra_descriptor_is_refused(request in request_strategy()) {
            let mut fds = fds_of(&request);
            fds.push(9);
            let refused = matches!(
                decode_request(&request.encode(), fds),
                Err(PacketError::Descriptors { .. })
            );
            prop_assert!(refused);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_decode_only_to_valid_values(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            fds in 0usize..3,
        ) {
            if let Ok(request) = decode_request(&bytes, vec![0u8; fds]) {
                // Whatever decodes satisfies every rule, so re-encoding it decodes again.
                prop_assert_eq!(fds, usize::from(request.descriptor().is_some()));
                let again = decode_request(&request.encode(), fds_of(&request)).unwrap();
                prop_assert_eq!(again, request);
            }
            let _ = decode_response(&bytes, vec![0u8; fds]);
        }

        #[test]
        fn truncated_requests_never_decode_to_something_else_with_an_id(
            request in request_strategy(),
            cut in 1usize..40,
        ) {
            let bytes = request.encode();
            let cut = cut.min(bytes.len());
            let truncated = &bytes[..bytes.len() - cut];
            // A cut-off id or size must never come back as a shorter valid id.
            match decode_request(truncated, fds_of(&request)) {
                Ok(Request::Open { key }) | Ok(Request::Release { key }) => {
                    let same = matches!(request, Request::Open { key: k } | Request::Release { key: k } if k == key);
                    prop_assert!(same);
                }
                _ => {}
            }
        }
    }
}
