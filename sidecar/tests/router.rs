//! The inference router with real processes: the sidecar binary with static discovery, model
//! workers (the worker binary's built-in models), and clients in this test process that make
//! regions through the broker and call the sidecar over `infer.sock` (or TCP). Zero-copy is
//! judged from outside: `/proc/<pid>/io` of the sidecar and the worker.

mod processes;

use processes::*;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use remotemedia_proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse, ModelStatisticsRequest,
    ServerLiveRequest, ServerMetadataRequest, SystemSharedMemoryRegisterRequest,
    SystemSharedMemoryStatusRequest, SystemSharedMemoryUnregisterRequest,
    grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer},
    infer_parameter::ParameterChoice,
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    model_infer_response::InferOutputTensor,
};
use remotemedia_proto::params::{
    BROKERED_EXTENSION, BROKERED_GRANT, BROKERED_REGION, SHARED_MEMORY_BYTE_SIZE,
    SHARED_MEMORY_REGION,
};
use remotemedia_runtime_core::shm::Region;
use remotemedia_runtime_core::shm::broker::{BrokerClient, ErrorCode, GrantToken, RegionKey};
use tonic::{Code, Request};

#[tokio::test(flavor = "multi_thread")]
async fn a_256_mib_colocated_inference_moves_no_tensor_bytes_through_system_calls_and_a_remote_one_does()
 {
    let dir = TempDir::new("io");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let near = Worker::start(&dir, "near", "builtin://checksum", Some(&dir.0)).await;
    let far = Worker::start(&dir, "far", "builtin://checksum", None).await;
    sidecar.discover(&[("near", &near, NODE), ("ns/far", &far, "node-b")]);
    let broker = BrokerClient::connect(&dir.0, "app").unwrap();
    let len = 256 * MIB;
    let (handle, mapped) = region(&broker, len, |i| (i % 251) as u8);
    let expected = expected_sum(&mapped.as_slice()[..len]);
    let mut client = sidecar.unix_client().await;
    let metadata = client
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap();
    assert!(
        metadata
            .get_ref()
            .extensions
            .iter()
            .any(|e| e == BROKERED_EXTENSION)
    );
    // Until the endpoints file is re-read the model is held, not refused.
    let infer = |model: &str| with_session(brokered_request(model, handle.key(), 0, len), &broker);

    let before = (sidecar.process.io_bytes(), near.process.io_bytes());
    let response = client
        .model_infer(infer("near"))
        .await
        .unwrap()
        .into_inner();
    let after = (sidecar.process.io_bytes(), near.process.io_bytes());
    assert_eq!(checksum(&response), expected);
    let moved = (after.0 - before.0) + (after.1 - before.1);
    eprintln!("colocated 256 MiB inference: {moved} bytes through system calls");
    assert!(
        moved < MIB as u64,
        "colocated: {moved} bytes through system calls"
    );

    // Again: the worker redeems the new grant as the region it already maps.
    let mappings = near.memfd_mappings();
    let response = client
        .model_infer(infer("near"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(checksum(&response), expected);
    assert_eq!(
        near.memfd_mappings(),
        mappings,
        "the region was mapped again"
    );

    let before = (sidecar.process.io_bytes(), far.process.io_bytes());
    let response = client.model_infer(infer("far")).await.unwrap().into_inner();
    let after = (sidecar.process.io_bytes(), far.process.io_bytes());
    assert_eq!(checksum(&response), expected);
    let moved = (after.0 - before.0) + (after.1 - before.1);
    eprintln!("remote 256 MiB inference: {moved} bytes through system calls");
    assert!(
        moved >= len as u64,
        "remote: only {moved} bytes through system calls"
    );
    assert_eq!(
        sidecar
            .metric(
                "remotemedia_sidecar_inference_requests_total{path=\"shm_local\",outcome=\"ok\"}"
            )
            .await,
        2.0
    );
    assert_eq!(
        sidecar
            .metric("remotemedia_sidecar_inference_requests_total{path=\"inline_remote\",outcome=\"ok\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_requested_in_a_region_are_written_there_on_both_paths() {
    let dir = TempDir::new("outputs");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let near = Worker::start(&dir, "near", "builtin://identity", Some(&dir.0)).await;
    let far = Worker::start(&dir, "far", "builtin://identity", None).await;
    sidecar.discover(&[("near", &near, NODE), ("far", &far, "node-b")]);
    let broker = BrokerClient::connect(&dir.0, "app").unwrap();
    let len = MIB;
    let (input, _input_map) = region(&broker, len, |i| (i % 13) as u8);
    let mut client = sidecar.unix_client().await;
    for model in ["near", "far"] {
        let (output, output_map) = region(&broker, len + 4096, |_| 0xEE);
        let mut request = brokered_request(model, input.key(), 0, len);
        request.outputs = vec![InferRequestedOutputTensor {
            name: "OUTPUT0".into(),
            parameters: brokered(output.key(), 4096, len as u64),
        }];
        let response = client
            .model_infer(with_session(request, &broker))
            .await
            .unwrap()
            .into_inner();
        let written = &output_map.as_slice()[4096..4096 + len];
        assert!(
            written
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 13) as u8),
            "{model}"
        );
        assert!(
            output_map.as_slice()[..4096].iter().all(|&b| b == 0xEE),
            "{model}"
        );
        assert!(
            response.raw_output_contents.iter().all(Bytes::is_empty),
            "{model}"
        );
        let parameters = &response.outputs[0].parameters;
        assert_eq!(
            parameters[BROKERED_REGION].parameter_choice,
            Some(ParameterChoice::StringParam(output.key().to_hex())),
            "{model}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_region_the_session_does_not_hold_is_not_found_and_brokered_references_over_tcp_are_refused()
 {
    let dir = TempDir::new("access");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let worker = Worker::start(&dir, "identity", "builtin://identity", Some(&dir.0)).await;
    sidecar.discover(&[("identity", &worker, NODE)]);
    let owner = BrokerClient::connect(&dir.0, "owner").unwrap();
    let other = BrokerClient::connect(&dir.0, "other").unwrap();
    let (victim, victim_map) = region(&owner, 4096, |i| i as u8);
    let (own, _own_map) = region(&other, 4096, |_| 7);
    let mut client = sidecar.unix_client().await;

    // The victim's id, learned out of band, but never opened through the broker.
    let as_input = brokered_request("identity", victim.key(), 0, 4096);
    let status = client
        .model_infer(with_session(as_input.clone(), &other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let mut as_output = brokered_request("identity", own.key(), 0, 4096);
    as_output.outputs = vec![InferRequestedOutputTensor {
        name: "OUTPUT0".into(),
        parameters: brokered(victim.key(), 0, 4096),
    }];
    let status = client
        .model_infer(with_session(as_output, &other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        victim_map
            .as_slice()
            .iter()
            .enumerate()
            .all(|(i, &b)| b == i as u8)
    );
    // A forged id answers exactly the same.
    let forged = brokered_request("identity", RegionKey::random().unwrap(), 0, 4096);
    let status = client
        .model_infer(with_session(forged, &other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // Named shared memory is off unless --allow-named-shm.
    let refused = client
        .system_shared_memory_register(SystemSharedMemoryRegisterRequest {
            name: "r".into(),
            key: "/x".into(),
            offset: 0,
            byte_size: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");

    let mut tcp = sidecar.tcp_client().await;
    let metadata = tcp.server_metadata(ServerMetadataRequest {}).await.unwrap();
    assert!(
        !metadata
            .get_ref()
            .extensions
            .iter()
            .any(|e| e == BROKERED_EXTENSION)
    );
    let status = tcp
        .model_infer(with_session(as_input, &owner))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("Unix socket"), "{status:?}");
    // Inline requests over TCP are routed as usual.
    let response = tcp
        .model_infer(inline_request("identity", vec![1, 2, 3]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.raw_output_contents[0].as_ref(), [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_fail_over_when_a_worker_is_killed_and_the_model_is_named_when_none_is_left() {
    let dir = TempDir::new("retry");
    let sidecar = Sidecar::start(&dir, &["--hold-timeout", "1s"]).await;
    let model = "builtin://checksum?infer_delay_ms=1500";
    let mut first = Worker::start(&dir, "slow", model, None).await;
    let mut second = Worker::start(&dir, "slow", model, None).await;
    sidecar.discover(&[("slow", &first, NODE), ("slow", &second, NODE)]);
    let client = sidecar.unix_client().await;
    let calls: Vec<_> = (0..6u8)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .model_infer(inline_request("slow", vec![n; 10]))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.process.kill();
    for (n, call) in calls.into_iter().enumerate() {
        let response = call
            .await
            .unwrap()
            .unwrap_or_else(|status| panic!("request {n}: {status:?}"));
        assert_eq!(checksum(response.get_ref()), 10 * n as u64);
    }
    second.process.kill();
    let status = client
        .clone()
        .model_infer(inline_request("slow", vec![1]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("'slow'"), "{status:?}");
    client
        .clone()
        .server_live(ServerLiveRequest {})
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_held_for_a_model_without_workers_completes_once_one_is_discovered() {
    let dir = TempDir::new("hold");
    let sidecar = Sidecar::start(&dir, &["--hold-timeout", "60s"]).await;
    let mut client = sidecar.unix_client().await;
    let held =
        tokio::spawn(async move { client.model_infer(inline_request("late", vec![2; 5])).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while sidecar.metric("remotemedia_sidecar_held_requests").await != 1.0 {
        assert!(Instant::now() < deadline, "the request was not held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let worker = Worker::start(&dir, "late", "builtin://checksum", None).await;
    sidecar.discover(&[("late", &worker, "node-b")]);
    let response = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("still held")
        .unwrap()
        .unwrap();
    assert_eq!(checksum(response.get_ref()), 10);
    assert_eq!(
        sidecar.metric("remotemedia_sidecar_held_requests").await,
        0.0
    );
}

/// What the fake worker saw: the request's two grants and what the broker answered.
#[derive(Default)]
struct Seen {
    grants: Vec<GrantToken>,
    first_redeemed: bool,
    other_connection: Option<Option<ErrorCode>>,
    /// The trace context and deadline the worker received.
    traceparent: Option<String>,
    timeout: Option<String>,
}

/// A worker that redeems the grants it is sent itself: the first on its own session, the
/// second on another connection.
fn fake_worker(
    own: BrokerClient,
    intruder: BrokerClient,
    seen: Arc<std::sync::Mutex<Seen>>,
) -> GrpcInferenceServiceServer<impl GrpcInferenceService> {
    GrpcInferenceServiceServer::new(InferOnly(move |request: Request<ModelInferRequest>| {
        let (own, intruder, seen) = (own.clone(), intruder.clone(), seen.clone());
        async move {
            let header = |key| {
                let value = request.metadata().get(key)?;
                Some(value.to_str().unwrap().to_owned())
            };
            let (traceparent, timeout) = (header("traceparent"), header("grpc-timeout"));
            let request = request.into_inner();
            assert!(
                !request.inputs[0].parameters.contains_key(BROKERED_REGION),
                "an id reached the worker"
            );
            let input = grant_of(&request.inputs[0].parameters);
            let output = grant_of(&request.outputs[0].parameters);
            let (first, other) = tokio::task::spawn_blocking(move || {
                let first = own.redeem(input).map(|redeemed| redeemed.fd.is_some());
                let other = intruder.redeem(output).err().map(|error| error.code());
                (first, other)
            })
            .await
            .unwrap();
            let mut seen = seen.lock().unwrap();
            seen.grants = vec![input, output];
            seen.first_redeemed = first.unwrap();
            seen.other_connection = other;
            seen.traceparent = traceparent;
            seen.timeout = timeout;
            Ok(tonic::Response::new(ModelInferResponse {
                model_name: request.model_name,
                outputs: vec![InferOutputTensor {
                    name: "OUTPUT0".into(),
                    datatype: "UINT8".into(),
                    shape: vec![4096],
                    ..Default::default()
                }],
                raw_output_contents: vec![Bytes::new()],
                ..Default::default()
            }))
        }
    }))
}

fn grant_of(parameters: &HashMap<String, InferParameter>) -> GrantToken {
    match &parameters[BROKERED_GRANT].parameter_choice {
        Some(ParameterChoice::StringParam(hex)) => GrantToken::parse_hex(hex).unwrap(),
        other => panic!("grant parameter {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_is_refused_to_another_connection_and_after_its_request_finished() {
    let dir = TempDir::new("grants");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let own = BrokerClient::connect(&dir.0, "worker").unwrap();
    let fake = fake_worker(
        own.clone(),
        BrokerClient::connect(&dir.0, "intruder").unwrap(),
        seen.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let routes = tonic::service::Routes::new(fake);
    tokio::spawn(axum::serve(listener, routes.into_axum_router()).into_future());
    sidecar.discover_ports(&[("fake", port, NODE)]);

    let app = BrokerClient::connect(&dir.0, "app").unwrap();
    let (input, _input_map) = region(&app, 4096, |i| i as u8);
    let (output, _output_map) = region(&app, 4096, |_| 0);
    let mut request = brokered_request("fake", input.key(), 0, 4096);
    request.outputs = vec![InferRequestedOutputTensor {
        name: "OUTPUT0".into(),
        parameters: brokered(output.key(), 0, 4096),
    }];
    let mut client = sidecar.unix_client().await;
    let mut request = with_session(request, &app);
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    request
        .metadata_mut()
        .insert("traceparent", trace.parse().unwrap());
    request.set_timeout(Duration::from_secs(30));
    client.model_infer(request).await.unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.traceparent.as_deref(), Some(trace));
    // What is left of the client's 30 s, in the gRPC encoding (an integer and a unit).
    let timeout = seen
        .timeout
        .as_deref()
        .expect("the deadline did not propagate");
    let (digits, unit) = timeout.split_at(timeout.len() - 1);
    let nanos_per_unit = match unit {
        "S" => 1_000_000_000,
        "m" => 1_000_000,
        "u" => 1_000,
        "n" => 1,
        other => panic!("unit {other} in {timeout}"),
    };
    let left = Duration::from_nanos(digits.parse::<u64>().unwrap() * nanos_per_unit);
    assert!(
        left > Duration::from_secs(20) && left <= Duration::from_secs(30),
        "{timeout}"
    );
    assert!(
        seen.first_redeemed,
        "the worker's own redemption brought the descriptor"
    );
    assert_eq!(
        seen.other_connection,
        Some(Some(ErrorCode::NotFound)),
        "another connection redeemed a grant of the request"
    );
    for grant in &seen.grants {
        // The replayed grant, and the one never redeemed: both died with the request.
        let refused = own.redeem(*grant).unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::NotFound), "{refused}");
    }
}

fn register(name: &str, region: &Region, byte_size: u64) -> SystemSharedMemoryRegisterRequest {
    SystemSharedMemoryRegisterRequest {
        name: name.into(),
        key: format!("/{}", region.id()),
        offset: 0,
        byte_size,
    }
}

fn named(region: &str, byte_size: u64) -> HashMap<String, InferParameter> {
    let param = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    HashMap::from([
        (
            SHARED_MEMORY_REGION.into(),
            param(ParameterChoice::StringParam(region.into())),
        ),
        (
            SHARED_MEMORY_BYTE_SIZE.into(),
            param(ParameterChoice::Int64Param(byte_size as i64)),
        ),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn named_registrations_belong_to_their_connection_and_travel_to_workers_inline() {
    let dir = TempDir::new("named");
    let sidecar = Sidecar::start(&dir, &["--allow-named-shm"]).await;
    let near = Worker::start(&dir, "near", "builtin://identity", Some(&dir.0)).await;
    let far = Worker::start(&dir, "far", "builtin://identity", None).await;
    sidecar.discover(&[("near", &near, NODE), ("far", &far, "node-b")]);
    let len = 64 * 1024;
    let mut input = Region::create_named(std::num::NonZeroUsize::new(len).unwrap()).unwrap();
    for (i, byte) in input.as_mut_slice().iter_mut().enumerate() {
        *byte = (i % 7) as u8;
    }
    let output = Region::create_named(std::num::NonZeroUsize::new(len).unwrap()).unwrap();
    let (mut a, mut b) = (sidecar.unix_client().await, sidecar.unix_client().await);
    a.system_shared_memory_register(register("in", &input, len as u64))
        .await
        .unwrap();
    a.system_shared_memory_register(register("out", &output, len as u64))
        .await
        .unwrap();

    let status = |name: &str| SystemSharedMemoryStatusRequest { name: name.into() };
    assert_eq!(
        a.system_shared_memory_status(status(""))
            .await
            .unwrap()
            .get_ref()
            .regions
            .len(),
        2
    );
    assert!(
        b.system_shared_memory_status(status(""))
            .await
            .unwrap()
            .get_ref()
            .regions
            .is_empty()
    );
    let refused = b
        .system_shared_memory_status(status("in"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    // B's unregister of everything touches nothing of A's.
    b.system_shared_memory_unregister(SystemSharedMemoryUnregisterRequest {
        name: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        a.system_shared_memory_status(status(""))
            .await
            .unwrap()
            .get_ref()
            .regions
            .len(),
        2
    );

    let request = |model: &str| ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "UINT8".into(),
            shape: vec![len as i64],
            parameters: named("in", len as u64),
            ..Default::default()
        }],
        outputs: vec![InferRequestedOutputTensor {
            name: "OUTPUT0".into(),
            parameters: named("out", len as u64),
        }],
        ..Default::default()
    };
    let refused = b.model_infer(request("near")).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    for model in ["near", "far"] {
        output.write_at(0, &vec![0xEE; len]).unwrap();
        let response = a.model_infer(request(model)).await.unwrap().into_inner();
        assert_eq!(
            &output.as_slice()[..len],
            &input.as_slice()[..len],
            "{model}"
        );
        assert!(
            response.raw_output_contents.iter().all(Bytes::is_empty),
            "{model}"
        );
    }
    assert_eq!(
        near.memfd_mappings(),
        0,
        "a named region reached a worker as a descriptor"
    );
    // When A's connection closes its registrations go, and with them the sidecar's mappings.
    let maps = || std::fs::read_to_string(format!("/proc/{}/maps", sidecar.process.pid())).unwrap();
    assert!(maps().contains(input.id().as_str()));
    drop((a, b));
    let deadline = Instant::now() + Duration::from_secs(10);
    while maps().contains(input.id().as_str()) {
        assert!(
            Instant::now() < deadline,
            "the sidecar still maps a closed connection's region"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unregistering_a_named_region_waits_for_the_request_writing_into_it() {
    let dir = TempDir::new("unregister");
    let sidecar = Sidecar::start(&dir, &["--allow-named-shm"]).await;
    let far = Worker::start(&dir, "slow", "builtin://identity?infer_delay_ms=1500", None).await;
    sidecar.discover(&[("slow", &far, "node-b")]);
    let output = Region::create_named(std::num::NonZeroUsize::new(4096).unwrap()).unwrap();
    let client = sidecar.unix_client().await;
    client
        .clone()
        .system_shared_memory_register(register("out", &output, 4096))
        .await
        .unwrap();
    let mut request = inline_request("slow", vec![9; 4096]);
    request.outputs = vec![InferRequestedOutputTensor {
        name: "OUTPUT0".into(),
        parameters: named("out", 4096),
    }];
    let infer = tokio::spawn({
        let mut client = client.clone();
        async move { client.model_infer(request).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unregister = SystemSharedMemoryUnregisterRequest { name: "out".into() };
    client
        .clone()
        .system_shared_memory_unregister(unregister)
        .await
        .unwrap();
    // Unregister returned: the request's write into the region has happened.
    assert!(
        output.as_slice().iter().all(|&b| b == 9),
        "unregister returned while a request still had to write the region"
    );
    infer.await.unwrap().unwrap();
}

/// A sidecar and a colocated checksum worker sweeping orphaned regions every `sweep`, and a
/// client with a broker session.
struct Colocated {
    sidecar: Sidecar,
    near: Worker,
    broker: BrokerClient,
    client: Client,
    _dir: TempDir,
}

impl Colocated {
    async fn start(name: &str, sweep: &str) -> Self {
        let dir = TempDir::new(name);
        let sidecar = Sidecar::start(&dir, &[]).await;
        let near = Worker::start_with(
            &dir,
            "near",
            "builtin://checksum",
            Some(&dir.0),
            &["--orphan-sweep-interval", sweep],
        )
        .await;
        sidecar.discover(&[("near", &near, NODE)]);
        let broker = BrokerClient::connect(&dir.0, "app").unwrap();
        let client = sidecar.unix_client().await;
        Self {
            sidecar,
            near,
            broker,
            client,
            _dir: dir,
        }
    }

    /// Checksums the first MiB of the region `key` (mapped here as `map`) through the sidecar.
    async fn infer(&mut self, key: RegionKey, map: &Region) {
        let response = self
            .client
            .model_infer(with_session(
                brokered_request("near", key, 0, MIB),
                &self.broker,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(checksum(&response), expected_sum(&map.as_slice()[..MIB]));
    }

    async fn regions(&self) -> f64 {
        self.sidecar.metric("remotemedia_sidecar_shm_regions").await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_region_its_client_released_leaves_the_workers_cache_at_the_next_request() {
    // No sweeps while idle: only the next request's grant can return the region.
    let mut setup = Colocated::start("orphans", "0s").await;
    let (first, first_map) = region(&setup.broker, MIB, |i| (i % 7) as u8);
    let (second, second_map) = region(&setup.broker, MIB, |i| (i % 5) as u8);

    setup.infer(first.key(), &first_map).await;
    let one = setup.near.memfd_mappings();
    setup.infer(second.key(), &second_map).await;
    let two = setup.near.memfd_mappings();
    assert!(two > one, "the worker maps each region it is granted");
    assert_eq!(setup.regions().await, 2.0);

    drop((first, first_map));
    assert_eq!(
        setup.regions().await,
        2.0,
        "the worker's cache still holds the released region"
    );
    setup.infer(second.key(), &second_map).await;
    assert_eq!(
        setup.near.memfd_mappings(),
        one,
        "the released region is still mapped"
    );
    assert_eq!(
        setup.regions().await,
        1.0,
        "the released region is still alive"
    );
}

#[tokio::test]
async fn a_region_its_client_released_leaves_an_idle_workers_cache_without_another_request() {
    let mut setup = Colocated::start("sweep", "200ms").await;
    let before = setup.near.memfd_mappings();
    let (kept, kept_map) = region(&setup.broker, MIB, |i| (i % 7) as u8);
    let (released, released_map) = region(&setup.broker, MIB, |i| (i % 5) as u8);
    setup.infer(kept.key(), &kept_map).await;
    setup.infer(released.key(), &released_map).await;
    let mapped = setup.near.memfd_mappings();
    assert!(mapped > before, "the worker maps the regions it is granted");
    // Several sweeps pass while the client holds both: nothing is returned.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(setup.near.memfd_mappings(), mapped);
    assert_eq!(setup.regions().await, 2.0);

    drop((released, released_map));
    let deadline = Instant::now() + Duration::from_secs(5);
    while setup.regions().await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "the idle worker still holds the released region after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        setup.near.memfd_mappings() < mapped,
        "the released region is unmapped in the worker"
    );
    // The region the client still holds stays cached and is read in place again.
    setup.infer(kept.key(), &kept_map).await;
}

#[tokio::test]
async fn a_stream_through_the_sidecar_answers_each_request_when_ready_and_a_failed_one_in_its_own_response()
 {
    let dir = TempDir::new("stream");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let slow = Worker::start(&dir, "slow", "builtin://checksum?infer_delay_ms=1500", None).await;
    let fast = Worker::start(&dir, "fast", "builtin://checksum", None).await;
    sidecar.discover(&[("slow", &slow, NODE), ("fast", &fast, NODE)]);
    let mut client = sidecar.unix_client().await;
    let with_id = |mut request: ModelInferRequest, id: &str| {
        request.id = id.into();
        request
    };
    let mut bad = inline_request("fast", vec![1, 2, 3]);
    bad.inputs[0].datatype = "FP32".into(); // 3 bytes are no FP32 tensor of shape [3]
    let requests = vec![
        with_id(inline_request("slow", vec![1; 1000]), "slow"),
        with_id(inline_request("fast", vec![2; 1000]), "fast"),
        with_id(bad, "bad"),
    ];
    let mut responses = client
        .model_stream_infer(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut order = Vec::new();
    while let Some(answer) = responses.message().await.unwrap() {
        let response = answer
            .infer_response
            .expect("every answer names its request");
        match response.id.as_str() {
            "slow" | "fast" => {
                assert_eq!(answer.error_message, "", "{}", response.id);
                let byte = if response.id == "slow" { 1 } else { 2 };
                assert_eq!(checksum(&response), 1000 * byte);
            }
            "bad" => {
                assert!(!answer.error_message.is_empty());
                assert_eq!(response.model_name, "fast");
            }
            other => panic!("an answer to no request: {other:?}"),
        }
        order.push(response.id);
    }
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(
        order.last().map(String::as_str),
        Some("slow"),
        "the slow request held up the ones after it: {order:?}"
    );
}

#[tokio::test]
async fn statistics_without_a_model_name_list_every_model_the_sidecar_routes_to() {
    let dir = TempDir::new("stats");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let alpha = Worker::start(&dir, "alpha", "builtin://checksum", None).await;
    let beta = Worker::start(&dir, "beta", "builtin://checksum", None).await;
    sidecar.discover(&[("alpha", &alpha, NODE), ("beta", &beta, "other-node")]);
    let mut client = sidecar.unix_client().await;
    for model in ["alpha", "alpha", "beta"] {
        client
            .model_infer(inline_request(model, vec![1; 64]))
            .await
            .unwrap();
    }
    let stats = client
        .model_statistics(ModelStatisticsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .model_stats;
    let counts: Vec<_> = stats
        .iter()
        .map(|model| (model.name.as_str(), model.inference_count))
        .collect();
    assert_eq!(counts, [("alpha", 2), ("beta", 1)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_maps_a_region_once_for_remote_requests_and_unmaps_it_when_the_region_goes() {
    let dir = TempDir::new("remote-mapping");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let far = Worker::start(&dir, "far", "builtin://checksum", None).await;
    sidecar.discover(&[("far", &far, "node-b")]);
    let broker = BrokerClient::connect(&dir.0, "app").unwrap();
    let mut client = sidecar.unix_client().await;
    let (handle, mapped) = region(&broker, MIB, |i| (i % 13) as u8);
    let expected = expected_sum(&mapped.as_slice()[..MIB]);
    // The sidecar's mappings of brokered regions, as /proc shows them (address range included).
    let regions_mapped = || {
        std::fs::read_to_string(format!("/proc/{}/maps", sidecar.process.pid()))
            .unwrap()
            .lines()
            .filter(|line| line.contains("memfd:remotemedia-region"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(regions_mapped().is_empty());

    let mut mappings = Vec::new();
    for _ in 0..3 {
        let request = with_session(brokered_request("far", handle.key(), 0, MIB), &broker);
        let response = client.model_infer(request).await.unwrap().into_inner();
        assert_eq!(checksum(&response), expected);
        mappings.push(regions_mapped());
    }
    assert_eq!(mappings[0].len(), 1, "{mappings:?}");
    assert!(
        mappings.iter().all(|m| *m == mappings[0]),
        "the region was mapped again: {mappings:?}"
    );

    drop((handle, mapped));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !regions_mapped().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the sidecar still maps a released region"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_requests_for_a_region_are_all_read_in_place() {
    let dir = TempDir::new("first-use");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let near = Worker::start(&dir, "near", "builtin://checksum", Some(&dir.0)).await;
    sidecar.discover(&[("near", &near, NODE)]);
    let broker = BrokerClient::connect(&dir.0, "app").unwrap();
    let client = sidecar.unix_client().await;
    // Each round's requests race to be the first to use a new region: the worker redeems their
    // grants on several threads, and the broker answers all but one with a handle and no
    // descriptor, which must find the region the first one is still mapping.
    for round in 0..20u8 {
        let (region_handle, map) = region(&broker, 64 << 10, |i| (i as u8) ^ round);
        let expected = expected_sum(&map.as_slice()[..64 << 10]);
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let mut client = client.clone();
                let request = with_session(
                    brokered_request("near", region_handle.key(), 0, 64 << 10),
                    &broker,
                );
                tokio::spawn(async move { client.model_infer(request).await })
            })
            .collect();
        for call in calls {
            let response = call
                .await
                .unwrap()
                .unwrap_or_else(|status| panic!("round {round}: {status:?}"));
            assert_eq!(checksum(response.get_ref()), expected);
        }
    }
}
