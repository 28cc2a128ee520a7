//! Why a request failed, and the one place those reasons become gRPC status codes.

use tonic::{Code, Status};

use crate::{
    backend::BackendError, decode::DecodeError, granted::GrantError, shm::SharedMemoryError,
};

/// A request the worker could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("model_name is required")]
    MissingModelName,
    #[error("unknown model '{0}'")]
    UnknownModel(String),
    #[error("model '{model}' has no version '{version}'; it serves version {served}")]
    UnknownVersion {
        model: String,
        version: String,
        served: &'static str,
    },
    #[error("model '{0}' is not ready")]
    NotReady(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error("the request's deadline passed before it ran")]
    DeadlineExceeded,
    #[error("invalid grpc-timeout header '{0}'")]
    InvalidTimeout(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the model panicked")]
    Panicked,
    #[error(transparent)]
    SharedMemory(#[from] SharedMemoryError),
    #[error(transparent)]
    Grant(#[from] GrantError),
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let message = error.to_string();
        match error {
            ServiceError::SharedMemory(error)
            | ServiceError::Decode(DecodeError::SharedMemory { error, .. }) => {
                Status::new(shared_memory_code(&error), message)
            }
            ServiceError::MissingModelName
            | ServiceError::InvalidTimeout(_)
            | ServiceError::Decode(_)
            | ServiceError::Backend(BackendError::InvalidInput(_)) => {
                Status::invalid_argument(message)
            }
            ServiceError::UnknownModel(_) | ServiceError::UnknownVersion { .. } => {
                Status::not_found(message)
            }
            ServiceError::NotReady(_) => Status::unavailable(message),
            ServiceError::Grant(error) => Status::new(error.code(), message),
            ServiceError::QueueFull(_) => Status::resource_exhausted(message),
            ServiceError::DeadlineExceeded => Status::deadline_exceeded(message),
            ServiceError::Backend(BackendError::Failed(_)) | ServiceError::Panicked => {
                // The details are the model's internals: log them, tell the client only that it
                // failed.
                tracing::error!(error = %message, "inference failed");
                Status::internal("failed to run the model")
            }
        }
    }
}

fn shared_memory_code(error: &SharedMemoryError) -> Code {
    match error {
        SharedMemoryError::Disabled => Code::Unimplemented,
        SharedMemoryError::AlreadyRegistered(_) => Code::AlreadyExists,
        SharedMemoryError::KeyNotFound(_) | SharedMemoryError::NotRegistered(_) => Code::NotFound,
        SharedMemoryError::EmptyName
        | SharedMemoryError::InvalidKey { .. }
        | SharedMemoryError::EmptyRange(_)
        | SharedMemoryError::PastObject { .. }
        | SharedMemoryError::OutOfRange { .. }
        | SharedMemoryError::OutputTooSmall { .. } => Code::InvalidArgument,
        // The OS error behind it was logged; the message names only the client's region.
        SharedMemoryError::Map(_) => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn model_internals_do_not_reach_the_client() {
        let status = Status::from(ServiceError::Backend(BackendError::Failed(
            "/models/secret.pt: cuda error".into(),
        )));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("secret"));
    }

    #[test]
    fn errors_map_to_their_codes() {
        let cases = [
            (ServiceError::MissingModelName, Code::InvalidArgument),
            (
                ServiceError::Decode(DecodeError::NoInputs),
                Code::InvalidArgument,
            ),
            (ServiceError::UnknownModel("x".into()), Code::NotFound),
            (ServiceError::NotReady("x".into()), Code::Unavailable),
            (ServiceError::QueueFull(3), Code::ResourceExhausted),
            (ServiceError::DeadlineExceeded, Code::DeadlineExceeded),
            (
                ServiceError::InvalidTimeout("9".into()),
                Code::InvalidArgument,
            ),
            (ServiceError::Panicked, Code::Internal),
            (
                ServiceError::SharedMemory(SharedMemoryError::AlreadyRegistered("r".into())),
                Code::AlreadyExists,
            ),
            (
                ServiceError::Decode(DecodeError::SharedMemory {
                    kind: "input",
                    name: "INPUT0".into(),
                    error: SharedMemoryError::NotRegistered("r".into()),
                }),
                Code::NotFound,
            ),
            (
                ServiceError::Decode(DecodeError::SharedMemory {
                    kind: "input",
                    name: "INPUT0".into(),
                    error: SharedMemoryError::OutOfRange {
                        region: "r".into(),
                        offset: 8,
                        byte_size: 8,
                        registered: 8,
                    },
                }),
                Code::InvalidArgument,
            ),
            (
                ServiceError::SharedMemory(SharedMemoryError::Disabled),
                Code::Unimplemented,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(Status::from(error).code(), code);
        }
    }
}
