//! Every RPC of the service, over TCP and over the Unix socket, and the HTTP health endpoints.

use remotemedia_proto::{
    health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    },
    inference::{
        DataType as ConfigDataType, InferParameter, InferTensorContents, ModelConfigRequest,
        ModelInferRequest, ModelMetadataRequest, ModelReadyRequest, ModelStatisticsRequest,
        ServerLiveRequest, ServerMetadataRequest, ServerReadyRequest,
        SystemSharedMemoryRegisterRequest, SystemSharedMemoryStatusRequest,
        SystemSharedMemoryUnregisterRequest,
        infer_parameter::ParameterChoice,
        model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    },
};
use remotemedia_runtime_core::shm::Region;
use tonic::Code;

use crate::support::{Client, Worker, request};

/// Calls every RPC once and checks each answer.
async fn exercise_every_rpc(mut client: Client) {
    assert!(
        client
            .server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let ready = |name: &str| ModelReadyRequest {
        name: name.into(),
        version: String::new(),
    };
    assert!(
        client
            .model_ready(ready("identity"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    assert!(
        !client
            .model_ready(ready("other"))
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    let metadata = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.name, "remotemedia-model-worker");
    assert_eq!(
        metadata.extensions,
        ["model_configuration", "statistics", "system_shared_memory"]
    );

    let model = client
        .model_metadata(ModelMetadataRequest {
            name: "identity".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (model.name.as_str(), model.platform.as_str()),
        ("identity", "builtin")
    );
    assert_eq!(model.inputs[0].name, "INPUT0");
    assert_eq!(model.outputs[0].name, "OUTPUT0");

    let config = client
        .model_config(ModelConfigRequest {
            name: "identity".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.name, "identity");
    assert_eq!(
        config.input[0].data_type,
        ConfigDataType::TypeInvalid as i32
    );

    // Raw bytes in, the same bytes out.
    let data: Vec<u8> = (0..24u8).collect();
    let mut raw = request("identity", "FP32", &[2, 3], data.clone());
    raw.id = "raw-1".into();
    let response = client.model_infer(raw).await.unwrap().into_inner();
    assert_eq!(response.id, "raw-1");
    assert_eq!(response.outputs[0].name, "OUTPUT0");
    assert_eq!(response.outputs[0].datatype, "FP32");
    assert_eq!(response.outputs[0].shape, [2, 3]);
    assert_eq!(response.raw_output_contents[0].as_ref(), data);

    // Typed contents in, raw little-endian bytes out.
    let typed = ModelInferRequest {
        model_name: "identity".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "INT32".into(),
            shape: vec![2],
            contents: Some(InferTensorContents {
                int_contents: vec![1, -1],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let response = client.model_infer(typed).await.unwrap().into_inner();
    assert_eq!(
        response.raw_output_contents[0].as_ref(),
        [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]
    );

    // A stream: a bad request in the middle is answered in its response, the rest go on.
    let stream_request = |id: &str, data: Vec<u8>| ModelInferRequest {
        id: id.into(),
        ..request("identity", "UINT8", &[2], data)
    };
    let requests = vec![
        stream_request("s1", vec![7, 8]),
        stream_request("bad", vec![0; 3]),
        stream_request("s2", vec![9, 10]),
    ];
    let mut stream = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut answers = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        let response = message.infer_response.unwrap();
        answers.push((response.id, message.error_message));
    }
    answers.sort();
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(
        answers[0].0 == "bad" && answers[0].1.contains("bytes"),
        "{answers:?}"
    );
    assert_eq!(answers[1], ("s1".into(), String::new()));
    assert_eq!(answers[2], ("s2".into(), String::new()));

    // Statistics: two unary and two stream successes, one failure.
    let stats = client
        .model_statistics(ModelStatisticsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .model_stats;
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].name, "identity");
    assert_eq!(stats[0].inference_count, 4);
    assert_eq!(stats[0].execution_count, 4);
    let inference = stats[0].inference_stats.unwrap();
    assert_eq!(inference.fail.unwrap().count, 1);
    assert!(inference.success.unwrap().ns > 0);
    let unknown = client
        .model_statistics(ModelStatisticsRequest {
            name: "other".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    exercise_system_shared_memory(&mut client).await;
}

/// Registers a region, infers with the input and the output in it, and unregisters it.
async fn exercise_system_shared_memory(client: &mut Client) {
    let mut region = Region::create_named(std::num::NonZeroUsize::new(4096).unwrap()).unwrap();
    region.as_mut_slice()[..8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    client
        .system_shared_memory_register(SystemSharedMemoryRegisterRequest {
            name: "r".into(),
            key: format!("/{}", region.id()),
            offset: 0,
            byte_size: 4096,
        })
        .await
        .unwrap();
    let status = client
        .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.regions["r"].byte_size, 4096);

    let in_region = |offset: i64, byte_size: i64| {
        let parameter = |choice| InferParameter {
            parameter_choice: Some(choice),
        };
        [
            (
                "shared_memory_region".to_owned(),
                parameter(ParameterChoice::StringParam("r".into())),
            ),
            (
                "shared_memory_offset".to_owned(),
                parameter(ParameterChoice::Int64Param(offset)),
            ),
            (
                "shared_memory_byte_size".to_owned(),
                parameter(ParameterChoice::Int64Param(byte_size)),
            ),
        ]
        .into()
    };
    let infer = ModelInferRequest {
        model_name: "identity".into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "INT16".into(),
            shape: vec![4],
            parameters: in_region(0, 8),
            ..Default::default()
        }],
        outputs: vec![InferRequestedOutputTensor {
            name: "OUTPUT0".into(),
            parameters: in_region(1024, 8),
        }],
        ..Default::default()
    };
    let response = client.model_infer(infer).await.unwrap().into_inner();
    assert_eq!(response.outputs[0].shape, [4]);
    assert!(response.raw_output_contents[0].is_empty());
    assert_eq!(&region.as_slice()[1024..1032], [1, 2, 3, 4, 5, 6, 7, 8]);

    client
        .system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest::default())
        .await
        .unwrap();
    let status = client
        .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(status.regions.is_empty());
}

#[tokio::test]
async fn every_rpc_answers_over_tcp() {
    let worker = Worker::start("builtin://identity", &[]).await;
    exercise_every_rpc(worker.client().await).await;
}

#[tokio::test]
async fn every_rpc_answers_over_the_unix_socket() {
    let worker = Worker::start("builtin://identity", &[]).await;
    exercise_every_rpc(worker.uds_client().await).await;
}

#[tokio::test]
async fn checksum_model_reads_every_byte() {
    let worker = Worker::start("builtin://checksum", &[]).await;
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected: u64 = data.iter().map(|&byte| u64::from(byte)).sum();
    let response = worker
        .client()
        .await
        .model_infer(request("checksum", "UINT8", &[1000, 1000], data))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outputs[0].name, "CHECKSUM");
    assert_eq!(response.outputs[0].datatype, "UINT64");
    assert_eq!(response.outputs[0].shape, [1]);
    assert_eq!(
        response.raw_output_contents[0].as_ref(),
        expected.to_le_bytes()
    );
}

#[tokio::test]
async fn health_answers_over_plain_http_on_the_grpc_port_and_grpc_health() {
    let worker = Worker::start("builtin://identity", &["--model-id", "echo"]).await;
    let (status, body) = crate::support::http_get(worker.port, "/health")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.trim(), r#"{"status":"ready","model":"echo"}"#);
    for path in ["/v2/health/live", "/v2/health/ready"] {
        assert_eq!(
            crate::support::http_get(worker.port, path).await.unwrap().0,
            200,
            "{path}"
        );
    }
    assert_eq!(worker.admin("/healthz").await.0, 200);

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", worker.port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "inference.GRPCInferenceService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[tokio::test]
async fn metrics_count_requests_by_outcome() {
    let worker = Worker::start("builtin://identity", &[]).await;
    let mut client = worker.client().await;
    client
        .model_infer(request("identity", "UINT8", &[1], vec![1]))
        .await
        .unwrap();
    let error = client
        .model_infer(request("nope", "UINT8", &[1], vec![1]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let requests =
        |outcome: &str| format!("remotemedia_worker_requests_total{{outcome=\"{outcome}\"}}");
    assert_eq!(worker.metric(&requests("success")).await, 1.0);
    assert_eq!(worker.metric(&requests("not_found")).await, 1.0);
    assert_eq!(
        worker
            .metric("remotemedia_worker_request_duration_seconds_count")
            .await,
        2.0
    );
    let (_, text) = worker.admin("/metrics").await;
    for family in [
        "remotemedia_worker_queue_depth",
        "remotemedia_worker_in_flight",
    ] {
        assert!(text.contains(&format!("# TYPE {family} gauge")), "{text}");
    }
}
