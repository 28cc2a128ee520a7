use tonic::{Code, Status};

use super::endpoint::Address;
use super::error::{Failure, from_server};
use super::*;

#[test]
fn grpc_endpoints_become_http_uris_with_the_default_port_when_none_is_given() {
    let tcp = |s: &str| {
        Address::parse(s).map(|a| match a {
            Address::Tcp(uri) => uri,
            Address::Unix(path) => panic!("{s} parsed as {}", path.display()),
        })
    };
    assert_eq!(
        tcp("grpc://localhost:50051").unwrap(),
        "http://localhost:50051"
    );
    assert_eq!(
        tcp("grpc://worker.ns.svc").unwrap(),
        "http://worker.ns.svc:50051"
    );
    assert_eq!(
        tcp("http://127.0.0.1:9000/").unwrap(),
        "http://127.0.0.1:9000"
    );
    assert_eq!(tcp("grpc://[::1]:7").unwrap(), "http://[::1]:7");
    assert_eq!(tcp("grpc://[::1]").unwrap(), "http://[::1]:50051");
}

#[test]
fn unix_endpoint_to_a_directory_means_its_infer_socket() {
    let dir = std::env::temp_dir();
    assert_eq!(
        Address::parse(&format!("unix://{}", dir.display())).unwrap(),
        Address::Unix(dir.join(INFER_SOCKET))
    );
    assert_eq!(
        Address::parse("unix:///run/nowhere/worker.sock").unwrap(),
        Address::Unix("/run/nowhere/worker.sock".into())
    );
}

#[test]
fn malformed_endpoints_are_refused_with_the_reason() {
    for endpoint in [
        "localhost:50051",
        "unix://relative/path",
        "grpc://",
        "grpc://host:50051/path",
        "grpc://user@host",
        "grpc://host:port",
        "tcp://host:1",
    ] {
        match Address::parse(endpoint) {
            Err(ClientError::InvalidEndpoint {
                endpoint: e,
                reason,
            }) => {
                assert_eq!(e, endpoint);
                assert!(!reason.is_empty());
            }
            other => panic!("{endpoint}: {other:?}"),
        }
    }
}

#[test]
fn sidecar_variable_names_the_socket_directory() {
    assert_eq!(
        sidecar_endpoint("unix:///run/remotemedia").unwrap(),
        "unix:///run/remotemedia"
    );
    assert_eq!(sidecar_endpoint("/tmp/rm").unwrap(), "unix:///tmp/rm");
    assert!(matches!(
        sidecar_endpoint("run/remotemedia"),
        Err(ClientError::InvalidEndpoint { .. })
    ));
}

#[test]
fn every_status_code_from_a_server_becomes_a_typed_error_with_its_message() {
    type Expected = fn(&ClientError) -> bool;
    let cases: [(Code, Expected); 16] = [
        (Code::InvalidArgument, |e| {
            matches!(e, ClientError::InvalidArgument { .. })
        }),
        (Code::NotFound, |e| {
            matches!(e, ClientError::NotFound { .. })
        }),
        (Code::AlreadyExists, |e| {
            matches!(e, ClientError::AlreadyExists { .. })
        }),
        (Code::ResourceExhausted, |e| {
            matches!(e, ClientError::ResourceExhausted { .. })
        }),
        (Code::OutOfRange, |e| {
            matches!(e, ClientError::ResourceExhausted { .. })
        }),
        (Code::Unavailable, |e| {
            matches!(e, ClientError::Unavailable { .. })
        }),
        (Code::DeadlineExceeded, |e| {
            matches!(e, ClientError::DeadlineExceeded { .. })
        }),
        (Code::Unimplemented, |e| {
            matches!(e, ClientError::Unimplemented { .. })
        }),
        (Code::Internal, |e| {
            matches!(e, ClientError::Internal { .. })
        }),
        (Code::Cancelled, |e| {
            matches!(e, ClientError::Cancelled { .. })
        }),
        (Code::PermissionDenied, |e| {
            matches!(e, ClientError::PermissionDenied { .. })
        }),
        (Code::FailedPrecondition, |e| {
            matches!(e, ClientError::FailedPrecondition { .. })
        }),
        (Code::Unknown, |e| {
            matches!(
                e,
                ClientError::Server {
                    code: Code::Unknown,
                    ..
                }
            )
        }),
        (Code::Aborted, |e| {
            matches!(
                e,
                ClientError::Server {
                    code: Code::Aborted,
                    ..
                }
            )
        }),
        (Code::DataLoss, |e| {
            matches!(
                e,
                ClientError::Server {
                    code: Code::DataLoss,
                    ..
                }
            )
        }),
        (Code::Unauthenticated, |e| {
            matches!(
                e,
                ClientError::Server {
                    code: Code::Unauthenticated,
                    ..
                }
            )
        }),
    ];
    for (code, expected) in cases {
        let error = from_server(Status::new(code, "the server's words"));
        assert!(expected(&error), "{code:?} became {error:?}");
        assert!(error.to_string().contains("the server's words"), "{error}");
        // A status with no local source is the server's answer, never a transport failure.
        assert!(matches!(
            Failure::classify(Status::new(code, "x")),
            Failure::Answered(_)
        ));
    }
}

#[test]
fn a_connect_error_is_retryable_and_another_transport_error_is_not() {
    let connect = Status::from_error(Box::new(tonic::ConnectError(Box::new(
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    ))));
    assert!(matches!(Failure::classify(connect), Failure::Connect));
    let broken = Status::from_error(Box::new(std::io::Error::from(
        std::io::ErrorKind::ConnectionReset,
    )));
    assert!(matches!(Failure::classify(broken), Failure::Lost(_)));
    let timeout = Status::from_error(Box::new(tonic::TimeoutExpired(())));
    assert!(matches!(Failure::classify(timeout), Failure::Deadline));
}

#[test]
fn a_tensor_that_could_not_be_built_is_the_calls_error() {
    let built = TensorBuffer::from_vec(vec![1i32; 4], vec![5], crate::tensor::DataType::I32);
    assert!(matches!(
        built.into_tensor(),
        Err(TensorError::ShapeMismatch { .. })
    ));
}
