//! What a call to a model worker (or the node sidecar) can fail with, and the one place gRPC
//! statuses become these errors.

use std::error::Error as _;

use tonic::{Code, Status};

use crate::shm::ShmError;
use crate::tensor::TensorError;

/// Errors of [`super::ModelWorkerClient`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to parse endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        endpoint: String,
        reason: &'static str,
    },
    /// Nothing answered at `endpoint`: every attempt to connect failed, so no request reached
    /// a server.
    #[error(
        "failed to reach the model worker at {endpoint}: no connection after {attempts} attempts"
    )]
    WorkerUnavailable { endpoint: String, attempts: u32 },
    /// The connection broke while a request was in flight: the server may have run it, so it is
    /// not sent again.
    #[error(
        "failed to finish a request to {endpoint}: the connection was lost ({reason}); the server may have run it"
    )]
    ConnectionLost { endpoint: String, reason: String },
    /// The caller's deadline passed (measured here, or reported by the server).
    #[error("failed to call the server: deadline exceeded: {message}")]
    DeadlineExceeded { message: String },
    #[error("failed to call the server: invalid argument: {message}")]
    InvalidArgument { message: String },
    #[error("failed to call the server: not found: {message}")]
    NotFound { message: String },
    #[error("failed to call the server: already exists: {message}")]
    AlreadyExists { message: String },
    #[error("failed to call the server: resource exhausted: {message}")]
    ResourceExhausted { message: String },
    /// The server answered that it cannot serve now (a model still loading, no ready worker
    /// behind the sidecar).
    #[error("failed to call the server: unavailable: {message}")]
    Unavailable { message: String },
    #[error("failed to call the server: unimplemented: {message}")]
    Unimplemented { message: String },
    #[error("failed to call the server: internal error: {message}")]
    Internal { message: String },
    #[error("failed to call the server: cancelled: {message}")]
    Cancelled { message: String },
    #[error("failed to call the server: permission denied: {message}")]
    PermissionDenied { message: String },
    #[error("failed to call the server: failed precondition: {message}")]
    FailedPrecondition { message: String },
    /// Any other status code the server sent, with its message.
    #[error("failed to call the server: {code:?}: {message}")]
    Server { code: Code, message: String },
    /// One request of a stream failed; the server reports it without a status code, and the
    /// stream goes on.
    #[error("failed to infer: {message}")]
    Rejected { message: String },
    #[error("failed to read the server's answer: {reason}")]
    BadResponse { reason: String },
    #[error("failed to prepare the request: {reason}")]
    Usage { reason: &'static str },
    #[error("failed to choose a model: {reason}")]
    Model { reason: String },
    #[error("failed to send a brokered tensor: this process has no broker session")]
    NoBrokerSession,
    #[error(transparent)]
    Tensor(#[from] TensorError),
    #[error(transparent)]
    Shm(#[from] ShmError),
}

/// How a failed call ended, as far as the client can tell.
pub(super) enum Failure {
    /// Connecting failed: the request never left this process, so sending it again is safe.
    Connect,
    /// The deadline sent with the request passed (tonic's own timer fired).
    Deadline,
    /// The transport broke after the request may have reached the server.
    Lost(String),
    /// The server answered with this error.
    Answered(ClientError),
}

impl Failure {
    pub(super) fn classify(status: Status) -> Failure {
        // A status the server sent carries no source; one tonic made from a local transport
        // error does, and connect errors are marked as such somewhere in its chain.
        let mut source = status.source();
        if source.is_none() {
            return Failure::Answered(from_server(status));
        }
        while let Some(error) = source {
            if error.is::<tonic::ConnectError>() {
                return Failure::Connect;
            }
            if error.is::<tonic::TimeoutExpired>() {
                return Failure::Deadline;
            }
            source = error.source();
        }
        Failure::Lost(status.message().to_owned())
    }
}

/// The typed error for a status the server sent.
pub(super) fn from_server(status: Status) -> ClientError {
    let message = status.message().to_owned();
    match status.code() {
        Code::InvalidArgument => ClientError::InvalidArgument { message },
        Code::NotFound => ClientError::NotFound { message },
        Code::AlreadyExists => ClientError::AlreadyExists { message },
        // tonic reports a message over its size limit as OUT_OF_RANGE; gRPC's code for it (and
        // the one the worker sends) is RESOURCE_EXHAUSTED.
        Code::ResourceExhausted | Code::OutOfRange => ClientError::ResourceExhausted { message },
        Code::Unavailable => ClientError::Unavailable { message },
        Code::DeadlineExceeded => ClientError::DeadlineExceeded { message },
        Code::Unimplemented => ClientError::Unimplemented { message },
        Code::Internal => ClientError::Internal { message },
        Code::Cancelled => ClientError::Cancelled { message },
        Code::PermissionDenied => ClientError::PermissionDenied { message },
        Code::FailedPrecondition => ClientError::FailedPrecondition { message },
        code => ClientError::Server { code, message },
    }
}
