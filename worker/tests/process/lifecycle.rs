//! Readiness while the model loads, and the drain on SIGTERM.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use remotemedia_proto::{
    health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    },
    inference::{ModelReadyRequest, ServerReadyRequest},
};
use tonic::transport::{Channel, Endpoint};

use crate::support::{Worker, request};

async fn channel(port: u16) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(error) => assert!(Instant::now() < deadline, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn health(channel: Channel) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn model_ready(worker: &Worker) -> bool {
    let mut client = worker.client().await;
    let model = client
        .model_ready(ModelReadyRequest {
            name: "identity".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .ready;
    let server = client
        .server_ready(ServerReadyRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    assert_eq!(model, server);
    model
}

#[tokio::test]
async fn readiness_follows_the_model_loading() {
    let started = Instant::now();
    // A long load, so that the checks below finish well inside it even on a loaded machine.
    let worker = Worker::spawn("builtin://identity?load_delay_ms=8000", &[]);
    let grpc = channel(worker.port).await;
    // Served at once, not ready while the model loads.
    assert_eq!(worker.admin("/readyz").await, (503, "loading\n".into()));
    assert_eq!(worker.admin("/healthz").await.0, 200);
    assert!(!model_ready(&worker).await);
    assert_eq!(health(grpc.clone()).await, ServingStatus::NotServing as i32);
    assert!(
        started.elapsed() < Duration::from_millis(7000),
        "the check came too late to mean anything"
    );

    worker.wait_ready().await;
    assert!(started.elapsed() >= Duration::from_secs(8));
    assert_eq!(worker.admin("/readyz").await, (200, "ready\n".into()));
    assert!(model_ready(&worker).await);
    assert_eq!(health(grpc).await, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn sigterm_finishes_every_request_in_flight_and_exits_zero() {
    const IN_FLIGHT: usize = 32;
    let mut worker = Worker::start(
        "builtin://identity?infer_delay_ms=2000",
        // One executor per request: all of them are in flight at SIGTERM.
        &[
            "--drain-delay",
            "2s",
            "--drain-timeout",
            "20s",
            "--instances",
            &IN_FLIGHT.to_string(),
        ],
    )
    .await;
    let client = worker.client().await;
    let requests: Vec<_> = (0..IN_FLIGHT as u8)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let response = client
                    .model_infer(request("identity", "UINT8", &[1], vec![i]))
                    .await?
                    .into_inner();
                assert_eq!(response.raw_output_contents[0].as_ref(), [i]);
                Ok::<_, tonic::Status>(())
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker.metric("remotemedia_worker_in_flight").await < IN_FLIGHT as f64 {
        assert!(Instant::now() < deadline, "requests never got in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let health_channel = channel(worker.port).await;
    worker.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    // NOT_SERVING at once, while the requests are still running.
    loop {
        if health(health_channel.clone()).await == ServingStatus::NotServing as i32 {
            break;
        }
        // Well inside the drain delay and the requests' 2 s.
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "health still SERVING"
        );
    }
    assert_eq!(worker.admin("/readyz").await, (503, "draining\n".into()));
    assert!(worker.metric("remotemedia_worker_in_flight").await > 0.0);

    for request in requests {
        request
            .await
            .unwrap()
            .expect("a request in flight at SIGTERM failed");
    }
    let status = worker.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.stderr());
}

#[tokio::test]
async fn sigterm_while_loading_exits_zero() {
    let mut worker = Worker::spawn(
        "builtin://identity?load_delay_ms=60000",
        &["--drain-delay", "0s"],
    );
    let _ = channel(worker.port).await;
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", worker.stderr());
    assert!(!worker.uds.exists(), "the unix socket file was left behind");
}
