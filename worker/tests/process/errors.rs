//! The error matrix: each bad request gets its status code, and the worker keeps serving.

use bytes::Bytes;
use remotemedia_proto::inference::{
    InferTensorContents, ModelInferRequest, model_infer_request::InferRequestedOutputTensor,
};
use tonic::Code;

use crate::support::{Worker, request};

/// A model whose input is FP32 of shape [-1, 4], so datatype and shape can be wrong.
const MODEL: &str = "builtin://identity?datatype=FP32&shape=-1,4";
const LIMIT: usize = 1 << 20;

fn good() -> ModelInferRequest {
    request("identity", "FP32", &[2, 4], vec![0; 32])
}

#[tokio::test]
async fn each_bad_request_gets_its_code_and_the_worker_keeps_serving() {
    let worker = Worker::start(MODEL, &["--max-message-bytes", &LIMIT.to_string()]).await;
    let mut client = worker.client().await;

    let with_contents_and_raw = {
        let mut request = good();
        request.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: vec![0.0; 8],
            ..Default::default()
        });
        request
    };
    let with_unknown_output = ModelInferRequest {
        outputs: vec![InferRequestedOutputTensor {
            name: "NOPE".into(),
            ..Default::default()
        }],
        ..good()
    };
    let cases: Vec<(&str, ModelInferRequest, Code)> = vec![
        (
            "wrong datatype",
            request("identity", "INT32", &[2, 4], vec![0; 32]),
            Code::InvalidArgument,
        ),
        (
            "unknown datatype",
            request("identity", "FLOAT", &[2, 4], vec![0; 32]),
            Code::InvalidArgument,
        ),
        (
            "BYTES",
            request("identity", "BYTES", &[2, 4], vec![0; 32]),
            Code::InvalidArgument,
        ),
        (
            "wrong shape",
            request("identity", "FP32", &[2, 5], vec![0; 40]),
            Code::InvalidArgument,
        ),
        (
            "negative dim",
            request("identity", "FP32", &[-2, 4], vec![0; 32]),
            Code::InvalidArgument,
        ),
        (
            "byte size",
            request("identity", "FP32", &[2, 4], vec![0; 31]),
            Code::InvalidArgument,
        ),
        (
            "contents and raw",
            with_contents_and_raw,
            Code::InvalidArgument,
        ),
        (
            "unknown model",
            request("nope", "FP32", &[2, 4], vec![0; 32]),
            Code::NotFound,
        ),
        (
            "unknown version",
            ModelInferRequest {
                model_version: "7".into(),
                ..good()
            },
            Code::NotFound,
        ),
        (
            "empty request",
            ModelInferRequest::default(),
            Code::InvalidArgument,
        ),
        (
            "no inputs",
            ModelInferRequest {
                model_name: "identity".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "2 GiB claimed, 16 bytes sent",
            request("identity", "FP32", &[1 << 27, 4], vec![0; 16]),
            Code::InvalidArgument,
        ),
        ("unknown output", with_unknown_output, Code::InvalidArgument),
        (
            "over the size limit",
            request(
                "identity",
                "FP32",
                &[(LIMIT / 16 + 1) as i64, 4],
                vec![0; LIMIT + 64],
            ),
            Code::ResourceExhausted,
        ),
    ];
    for (name, bad, code) in cases {
        let status = client.model_infer(bad).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        assert!(!status.message().is_empty(), "{name}");
        let response = client
            .model_infer(good())
            .await
            .unwrap_or_else(|error| panic!("worker stopped serving after {name}: {error:?}"));
        assert_eq!(
            response.into_inner().raw_output_contents[0],
            Bytes::from(vec![0; 32])
        );
    }
    assert!(worker.stderr().contains("model ready"));
    assert!(!worker.stderr().contains("panicked"), "{}", worker.stderr());
}

#[tokio::test]
async fn requests_while_loading_are_unavailable() {
    let worker = Worker::spawn("builtin://identity?load_delay_ms=60000", &[]);
    let mut client = loop {
        if let Ok(channel) =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", worker.port))
                .unwrap()
                .connect()
                .await
        {
            break remotemedia_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let status = client
        .model_infer(request("identity", "UINT8", &[1], vec![1]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn stream_message_over_the_size_limit_ends_the_stream_with_resource_exhausted() {
    let worker = Worker::start(MODEL, &["--max-message-bytes", &LIMIT.to_string()]).await;
    let mut client = worker.client().await;
    let oversize = request(
        "identity",
        "FP32",
        &[(LIMIT / 16 + 1) as i64, 4],
        vec![0; LIMIT + 64],
    );
    let mut stream = client
        .model_stream_infer(tokio_stream::iter(vec![good(), oversize]))
        .await
        .unwrap()
        .into_inner();
    // The good request's answer may come before or after the error that ends the stream.
    let status = loop {
        match stream.message().await {
            Ok(Some(response)) => assert_eq!(response.error_message, ""),
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    client.model_infer(good()).await.unwrap();
}
