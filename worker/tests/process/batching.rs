//! Dynamic batching and the request queue, seen from a client: a full queue, a deadline that
//! passes in the queue, and (with TorchScript) batched answers against unbatched ones.

use std::time::{Duration, Instant};

use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use remotemedia_proto::inference::{
    ModelStatisticsRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use tonic::Code;

use crate::support::{Worker, request};

/// The worker's count of requests that ended with `outcome`.
async fn outcomes(worker: &Worker, outcome: &str) -> f64 {
    worker
        .metric(&format!(
            "remotemedia_worker_requests_total{{outcome=\"{outcome}\"}}"
        ))
        .await
}

/// A gRPC client over a plain HTTP/2 connection: tonic's channel would also enforce a request's
/// `grpc-timeout` itself and cancel the call, so the worker's own answer could not be seen.
fn untimed_client(
    worker: &Worker,
) -> GrpcInferenceServiceClient<HttpClient<HttpConnector, tonic::body::Body>> {
    let http = HttpClient::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let origin = format!("http://127.0.0.1:{}", worker.port).parse().unwrap();
    GrpcInferenceServiceClient::with_origin(http, origin)
}

/// Waits until the sample reaches `value`.
async fn until_metric(worker: &Worker, sample: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker.metric(sample).await < value {
        assert!(Instant::now() < deadline, "{sample} never reached {value}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_and_recovers() {
    let worker = Worker::start(
        "builtin://identity?infer_delay_ms=400",
        &["--max-queue", "2"],
    )
    .await;
    let client = worker.client().await;
    let send = |byte: u8| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .model_infer(request("identity", "UINT8", &[1], vec![byte]))
                .await
        })
    };
    let running = send(1);
    until_metric(&worker, "remotemedia_worker_in_flight", 1.0).await;
    let queued = [send(2), send(3)];
    until_metric(&worker, "remotemedia_worker_queue_depth", 2.0).await;

    let refused = client
        .clone()
        .model_infer(request("identity", "UINT8", &[1], vec![4]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("queue is full"), "{refused:?}");

    for (task, byte) in std::iter::once(running).chain(queued).zip(1u8..) {
        let response = task.await.unwrap().unwrap().into_inner();
        assert_eq!(response.raw_output_contents[0].as_ref(), [byte]);
    }
    // Drained: served again.
    let response = client
        .clone()
        .model_infer(request("identity", "UINT8", &[1], vec![5]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.raw_output_contents[0].as_ref(), [5]);
    assert_eq!(outcomes(&worker, "resource_exhausted").await, 1.0);
    assert_eq!(outcomes(&worker, "success").await, 4.0);
}

#[tokio::test]
async fn an_expired_deadline_in_the_queue_answers_deadline_exceeded_without_running() {
    let worker = Worker::start("builtin://identity?infer_delay_ms=800", &[]).await;
    let client = worker.client().await;
    let running = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .model_infer(request("identity", "UINT8", &[1], vec![1]))
                .await
        }
    });
    until_metric(&worker, "remotemedia_worker_in_flight", 1.0).await;

    let mut late = tonic::Request::new(request("identity", "UINT8", &[1], vec![2]));
    late.set_timeout(Duration::from_millis(100));
    let sent = Instant::now();
    let status = untimed_client(&worker).model_infer(late).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        sent.elapsed() < Duration::from_millis(700),
        "answered after the running pass"
    );
    running.await.unwrap().unwrap();

    // The worker answered it (its own count), and only the first request ever ran.
    assert_eq!(outcomes(&worker, "deadline_exceeded").await, 1.0);
    let stats = client
        .clone()
        .model_statistics(ModelStatisticsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.model_stats[0].execution_count, 1);
    assert_eq!(stats.model_stats[0].inference_count, 1);
    assert_eq!(
        worker.metric("remotemedia_worker_batch_size_count").await,
        1.0
    );
}

#[tokio::test]
async fn a_malformed_grpc_timeout_is_an_invalid_argument() {
    let worker = Worker::start("builtin://identity", &[]).await;
    let mut bad = tonic::Request::new(request("identity", "UINT8", &[1], vec![2]));
    bad.metadata_mut()
        .insert("grpc-timeout", "soon".parse().unwrap());
    let status = worker.client().await.model_infer(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("grpc-timeout"), "{status:?}");
}

#[cfg(feature = "torch")]
mod torch {
    //! Tolerance: a batched forward pass multiplies a matrix of several rows where the unbatched
    //! one multiplies a single row, and libtorch may pick a different kernel (another
    //! summation order) for each, so FP32 answers may differ in their last bits:
    //! |batched − unbatched| ≤ 1e-5 · max(1, |unbatched|).

    use bytes::Bytes;
    use remotemedia_proto::inference::{
        ModelInferRequest, ModelInferResponse, model_infer_request::InferInputTensor,
    };

    use crate::{support::Worker, torchscript::model_file};

    const CLIENTS: usize = 128;
    const RTOL: f32 = 1e-5;

    /// Client `index`'s one row of 16 floats, distinct for every client.
    fn row(index: usize) -> Vec<f32> {
        (0..16)
            .map(|column| ((index * 16 + column) as f32 * 0.618_034).sin() * 2.0)
            .collect()
    }

    fn mlp_request(index: usize) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "mlp".into(),
            inputs: vec![InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 16],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from(
                row(index)
                    .iter()
                    .flat_map(|value| value.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )],
            ..Default::default()
        }
    }

    fn floats(response: &ModelInferResponse) -> Vec<f32> {
        assert_eq!(response.outputs[0].shape, [1, 4]);
        response.raw_output_contents[0]
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
            .collect()
    }

    #[tokio::test]
    async fn batched_answers_equal_unbatched_ones_under_128_concurrent_clients() {
        let flags = ["--intra-op-threads", "1", "--max-queue", "256"];
        let unbatched = Worker::start(
            &model_file("mlp"),
            &[&flags[..], &["--max-batch-size", "1"]].concat(),
        )
        .await;
        // config.pbtxt's dynamic_batching: batches of up to 8, 500 µs delay.
        let batched = Worker::start(&model_file("mlp"), &flags).await;

        let mut reference = unbatched.client().await;
        let mut want = Vec::with_capacity(CLIENTS);
        for index in 0..CLIENTS {
            let response = reference.model_infer(mlp_request(index)).await.unwrap();
            want.push(floats(&response.into_inner()));
        }
        assert_eq!(
            unbatched.metric("remotemedia_worker_batch_size_sum").await,
            CLIENTS as f64,
            "batching off: one request per pass"
        );
        assert_eq!(
            unbatched
                .metric("remotemedia_worker_batch_size_count")
                .await,
            CLIENTS as f64
        );

        // A request alone in its pass is not copied.
        batched
            .client()
            .await
            .model_infer(mlp_request(0))
            .await
            .unwrap();
        assert_eq!(
            batched
                .metric("remotemedia_worker_batch_copied_bytes_total")
                .await,
            0.0
        );

        // Every client on its own connection, all at once.
        let mut clients = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            clients.push(batched.client().await);
        }
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(index, mut client)| {
                let start = start.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    client.model_infer(mlp_request(index)).await
                })
            })
            .collect();
        for (index, task) in tasks.into_iter().enumerate() {
            let got = floats(&task.await.unwrap().unwrap().into_inner());
            for (column, (got, want)) in got.iter().zip(&want[index]).enumerate() {
                assert!(
                    (got - want).abs() <= RTOL * want.abs().max(1.0),
                    "client {index}[{column}]: batched {got}, unbatched {want}"
                );
            }
        }

        let requests = batched.metric("remotemedia_worker_batch_size_sum").await;
        let passes = batched.metric("remotemedia_worker_batch_size_count").await;
        let alone = batched
            .metric("remotemedia_worker_batch_size_bucket{le=\"1.0\"}")
            .await;
        assert_eq!(requests, (CLIENTS + 1) as f64);
        assert!(
            alone < passes,
            "no batch larger than one: {passes} passes, all alone"
        );
        assert!(
            batched
                .metric("remotemedia_worker_batch_copied_bytes_total")
                .await
                > 0.0
        );
    }
}
