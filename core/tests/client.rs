//! `ModelWorkerClient` against real `remotemedia-model-worker` processes (the binary the
//! workspace built into the same target directory, or `REMOTEMEDIA_WORKER_BIN`). Which way a
//! tensor travelled is told from outside the client: a worker started with a message limit far
//! below the tensor refuses it inline (RESOURCE_EXHAUSTED) and serves it by reference; the
//! worker's `/proc/<pid>/maps` shows the client's region; its registration list comes from a
//! plain gRPC client. (`rchar` in `/proc/<pid>/io` does not count socket `recv`s, so it cannot
//! tell.)

#[path = "support/ports.rs"]
mod ports;
use ports::free_port;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use remotemedia_proto::inference::{
    SystemSharedMemoryStatusRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use remotemedia_runtime_core::model_worker::{
    ClientConfig, ClientError, InferOptions, ModelWorkerClient, OutputRequest,
};
use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator, TensorBuffer};

const MIB: usize = 1024 * 1024;

/// A worker process on free ports (and `<dir>/infer.sock`), killed when dropped.
struct Worker {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Worker {
    /// Starts a worker and waits until it is ready.
    fn start(model_path: &str, extra: &[&str]) -> Worker {
        let worker = Worker::spawn(model_path, extra);
        worker.wait_until(|| worker.http_status("/health") == Some(200), "ready");
        worker
    }

    /// Starts a worker and waits only until its gRPC port accepts connections.
    fn spawn(model_path: &str, extra: &[&str]) -> Worker {
        let [port, admin_port] = [free_port(), free_port()];
        let dir = std::env::temp_dir().join(format!("rm-client-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(worker_binary())
            .args(["--model-id", "m", "--model-path", model_path])
            .args(["--port", &port.to_string()])
            .args(["--admin-port", &admin_port.to_string()])
            .arg("--uds")
            .arg(dir.join("infer.sock"))
            .arg("--termination-log")
            .arg(dir.join("termination-log"))
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let worker = Worker { child, port, dir };
        worker.wait_until(|| worker.http_status("/health").is_some(), "listening");
        worker
    }

    fn wait_until(&self, condition: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "worker not {what}: {}",
                std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn http_status(&self, path: &str) -> Option<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split(' ').nth(1)?.parse().ok()
    }

    fn endpoint(&self) -> String {
        format!("grpc://127.0.0.1:{}", self.port)
    }

    fn maps(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/maps", self.child.id())).unwrap()
    }

    /// The names registered with the worker's system shared memory, asked with a plain client.
    async fn registrations(&self) -> Vec<String> {
        let mut grpc =
            GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{}", self.port))
                .await
                .unwrap();
        let status = grpc
            .system_shared_memory_status(SystemSharedMemoryStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut names: Vec<String> = status.regions.into_keys().collect();
        names.sort();
        names
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn target_binary(name: &str, hint: &str) -> PathBuf {
    // Tests run from <target>/debug/deps; binaries sit in <target>/debug.
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(path.exists(), "{} is missing: {hint}", path.display());
    path
}

fn worker_binary() -> PathBuf {
    match std::env::var_os("REMOTEMEDIA_WORKER_BIN") {
        Some(path) => path.into(),
        None => target_binary(
            "remotemedia-model-worker",
            "run `cargo build -p remotemedia-model-worker` (or set REMOTEMEDIA_WORKER_BIN)",
        ),
    }
}

fn counting(len: usize) -> Vec<i32> {
    (0..len as i32).map(|i| i.wrapping_mul(31)).collect()
}

/// A shared-memory INT32 tensor of `len` elements from `allocator`, filled like `counting`.
fn shared(allocator: &SharedMemoryAllocator, len: usize) -> TensorBuffer {
    let mut tensor = allocator
        .allocate_tensor(len * 4, Some("client-test"))
        .unwrap()
        .reshape(vec![1, len], DataType::I32)
        .unwrap();
    tensor
        .as_mut_slice_of::<i32>()
        .unwrap()
        .copy_from_slice(&counting(len));
    tensor
}

#[tokio::test]
async fn the_quickstart_call_returns_the_identity_models_output_and_counts_in_its_statistics() {
    let worker = Worker::start("builtin://identity", &[]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    assert!(client.health_check().await.unwrap());
    let input = TensorBuffer::from_vec(counting(512), vec![1, 512], DataType::I32);
    let output = client.infer(input, Default::default()).await.unwrap();
    assert_eq!(output.shape(), &[1, 512]);
    assert_eq!(output.as_i32_slice().unwrap(), counting(512).as_slice());

    let status = client.status(None).await.unwrap();
    assert_eq!(status.metadata.name, "m");
    assert_eq!(status.metadata.inputs[0].name, "INPUT0");
    let statistics = status.statistics.expect("statistics of the model");
    assert_eq!(statistics.inference_count, 1);
}

#[tokio::test]
async fn a_tensor_that_could_not_be_built_fails_the_call_before_anything_is_sent() {
    let worker = Worker::start("builtin://identity", &[]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    let input = TensorBuffer::from_vec(counting(511), vec![1, 512], DataType::I32);
    let error = client.infer(input, Default::default()).await.unwrap_err();
    assert!(matches!(error, ClientError::Tensor(_)), "{error:?}");
    let status = client.status(None).await.unwrap();
    assert_eq!(status.statistics.unwrap().inference_count, 0);
}

#[tokio::test]
async fn a_named_region_is_registered_once_and_read_in_place_and_the_output_written_into_ours() {
    // 1 MiB: an 8 MiB tensor can only get through by reference.
    let worker = Worker::start("builtin://identity", &["--max-message-bytes", "1048576"]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    let allocator = SharedMemoryAllocator::new(Default::default());
    let len = 2 * MIB; // 8 MiB of INT32
    let input = shared(&allocator, len);
    let region = input.storage().region_id().unwrap().to_string();
    let output = allocator.allocate_tensor(len * 4, None).unwrap();
    let output_region = output.storage().region_id().unwrap().to_string();

    let options = InferOptions {
        output: Some(output),
        ..Default::default()
    };
    let mut outputs = client
        .infer_many(
            vec![("INPUT0".into(), input)],
            vec![OutputRequest {
                name: "OUTPUT0".into(),
                into: options.output,
            }],
            Default::default(),
        )
        .await
        .unwrap();
    let output = outputs.take("OUTPUT0").unwrap();
    assert_eq!(
        output.storage().region_id().unwrap().to_string(),
        output_region
    );
    assert_eq!(output.as_i32_slice().unwrap(), counting(len).as_slice());
    assert!(worker.maps().contains(&format!("/dev/shm/{region}")));
    assert_eq!(
        worker.registrations().await.len(),
        2,
        "input and output regions"
    );

    // The same tensor on the heap goes inline, which this worker's limit refuses.
    let error = client
        .infer(
            TensorBuffer::from_vec(counting(len), vec![1, len], DataType::I32),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::ResourceExhausted { .. }),
        "{error:?}"
    );

    // The output, still registered, goes back as the next input: it is referenced under its
    // registration (registering it again would be ALREADY_EXISTS). The first input is gone; its
    // region was mapped by the worker, so the allocator could not pool it and unlinked it: the
    // next registration (the new output's) drops its registration first, and the worker
    // unmaps it.
    let next = allocator.allocate_tensor(len * 4, None).unwrap();
    let next_region = next.storage().region_id().unwrap().to_string();
    let options = InferOptions {
        output: Some(next),
        ..Default::default()
    };
    let next = client.infer(output, options).await.unwrap();
    assert_eq!(next.as_i32_slice().unwrap(), counting(len).as_slice());
    let registered = worker.registrations().await;
    assert_eq!(registered.len(), 2, "{registered:?}");
    for id in [&output_region, &next_region] {
        assert!(
            registered.iter().any(|name| name.ends_with(id.as_str())),
            "{registered:?}"
        );
    }
    assert!(!worker.maps().contains(&format!("/dev/shm/{region}")));
    assert!(worker.maps().contains(&format!("/dev/shm/{next_region}")));

    client.close().await.unwrap();
    assert!(
        worker.registrations().await.is_empty(),
        "closing unregisters"
    );
    assert!(!worker.maps().contains(&format!("/dev/shm/{next_region}")));
}

#[tokio::test]
async fn a_shared_tensor_below_the_inline_threshold_goes_inline() {
    let worker = Worker::start("builtin://identity", &[]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    let allocator = SharedMemoryAllocator::new(Default::default());
    let input = shared(&allocator, 1024); // 4 KiB < 64 KiB
    let output = client.infer(input, Default::default()).await.unwrap();
    assert_eq!(output.as_i32_slice().unwrap(), counting(1024).as_slice());
    assert!(worker.registrations().await.is_empty());
}

#[tokio::test]
async fn a_worker_without_named_shared_memory_gets_the_shared_tensor_inline() {
    let allocator = SharedMemoryAllocator::new(Default::default());
    let worker = Worker::start("builtin://identity", &["--allow-named-shm", "false"]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    let output = client
        .infer(shared(&allocator, MIB), Default::default())
        .await
        .unwrap();
    assert_eq!(output.as_i32_slice().unwrap(), counting(MIB).as_slice());
    // Inline indeed: under a 1 MiB limit the same 4 MiB tensor is refused.
    let limited = Worker::start(
        "builtin://identity",
        &[
            "--allow-named-shm",
            "false",
            "--max-message-bytes",
            "1048576",
        ],
    );
    let client = ModelWorkerClient::connect(&limited.endpoint())
        .await
        .unwrap();
    let error = client
        .infer(shared(&allocator, MIB), Default::default())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::ResourceExhausted { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn connects_over_a_unix_socket_by_path_and_by_socket_directory() {
    let worker = Worker::start("builtin://identity", &[]);
    let by_path = format!("unix://{}", worker.dir.join("infer.sock").display());
    let by_directory = format!("unix://{}", worker.dir.display());
    for endpoint in [by_path, by_directory] {
        let client = ModelWorkerClient::connect(&endpoint).await.unwrap();
        let output = client
            .infer(
                TensorBuffer::from_vec(counting(16), vec![16], DataType::I32),
                Default::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            output.as_i32_slice().unwrap(),
            counting(16).as_slice(),
            "{endpoint}"
        );
    }
}

#[tokio::test]
async fn a_stream_answers_every_request_and_reports_a_failed_one_without_closing() {
    let worker = Worker::start("builtin://identity?datatype=INT32", &[]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    let mut stream = client.infer_stream(Default::default()).await.unwrap();
    let mut sent = Vec::new();
    for n in 1..=6 {
        let id = if n == 3 {
            stream
                .send(TensorBuffer::from_vec(
                    vec![0.5f32; 4],
                    vec![4],
                    DataType::F32,
                ))
                .await
                .unwrap()
        } else {
            stream
                .send(TensorBuffer::from_vec(
                    counting(n * 100),
                    vec![n * 100],
                    DataType::I32,
                ))
                .await
                .unwrap()
        };
        sent.push((id, n));
    }
    stream.close_send();
    let mut answered = 0;
    while let Some(response) = stream.next().await {
        let n = sent.iter().find(|(id, _)| *id == response.id).unwrap().1;
        match (n, response.result) {
            (3, Err(ClientError::Rejected { message })) => {
                assert!(
                    message.contains("FP32") || message.contains("INT32"),
                    "{message}"
                );
            }
            (n, Ok(outputs)) if n != 3 => {
                let output = outputs.get("OUTPUT0").unwrap();
                assert_eq!(output.as_i32_slice().unwrap(), counting(n * 100).as_slice());
            }
            (n, other) => panic!("request {n}: {other:?}"),
        }
        answered += 1;
    }
    assert_eq!(answered, 6);
}

#[tokio::test]
async fn a_worker_killed_mid_stream_fails_the_pending_requests_without_sending_them_again() {
    let mut worker = Worker::start("builtin://checksum?infer_delay_ms=3000", &[]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    let mut stream = client.infer_stream(Default::default()).await.unwrap();
    for _ in 0..2 {
        stream
            .send(TensorBuffer::from_vec(
                vec![1u8; 64],
                vec![64],
                DataType::U8,
            ))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    worker.kill();
    let mut ids = Vec::new();
    while let Some(response) = stream.next().await {
        assert!(
            matches!(response.result, Err(ClientError::ConnectionLost { .. })),
            "{:?}",
            response.result
        );
        ids.push(response.id);
    }
    assert_eq!(ids, [0, 1]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let error = stream
        .send(TensorBuffer::from_vec(vec![1u8; 4], vec![4], DataType::U8))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::ConnectionLost { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_inference_in_flight_when_the_worker_dies_is_connection_lost_not_retried() {
    let mut worker = Worker::start("builtin://checksum?infer_delay_ms=3000", &[]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .infer(
                    TensorBuffer::from_vec(vec![1u8; 64], vec![64], DataType::U8),
                    Default::default(),
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.kill();
    let error = call.await.unwrap().unwrap_err();
    assert!(
        matches!(error, ClientError::ConnectionLost { .. }),
        "{error:?}"
    );
    // The next call finds nothing to connect to.
    let error = client
        .infer(
            TensorBuffer::from_vec(vec![1u8; 64], vec![64], DataType::U8),
            Default::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::WorkerUnavailable { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_unreachable_endpoint_is_worker_unavailable_after_bounded_retries_with_backoff() {
    let port = free_port();
    let config = ClientConfig {
        connect_attempts: 4,
        retry_backoff: Duration::from_millis(100),
        ..Default::default()
    };
    for endpoint in [
        format!("grpc://127.0.0.1:{port}"),
        format!("unix:///nonexistent-{port}/infer.sock"),
    ] {
        let started = Instant::now();
        let error = ModelWorkerClient::connect_with(&endpoint, config.clone())
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        match error {
            ClientError::WorkerUnavailable {
                endpoint: named,
                attempts,
            } => {
                assert_eq!(named, endpoint);
                assert_eq!(attempts, 4);
            }
            other => panic!("{endpoint}: {other:?}"),
        }
        // Three waits between four attempts: 100 + 200 + 400 ms.
        assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    }
}

/// The error a worker's answer to `len` INT32s sent with `options` becomes.
async fn refusal(worker: &Worker, len: usize, options: InferOptions) -> ClientError {
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    client
        .infer(
            TensorBuffer::from_vec(counting(len), vec![len], DataType::I32),
            options,
        )
        .await
        .unwrap_err()
}

#[tokio::test]
async fn a_datatype_the_model_does_not_take_is_invalid_argument_with_the_servers_message() {
    let worker = Worker::start("builtin://identity?datatype=FP32", &[]);
    match refusal(&worker, 4, InferOptions::default()).await {
        ClientError::InvalidArgument { message } => assert!(message.contains("INT32"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_unknown_model_is_not_found() {
    let worker = Worker::start("builtin://identity", &[]);
    let options = InferOptions {
        model: Some("no-such-model".into()),
        ..Default::default()
    };
    match refusal(&worker, 4, options).await {
        ClientError::NotFound { message } => {
            assert!(message.contains("no-such-model"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_message_over_the_servers_limit_is_resource_exhausted() {
    let worker = Worker::start("builtin://identity", &["--max-message-bytes", "65536"]);
    let error = refusal(&worker, MIB, InferOptions::default()).await;
    assert!(
        matches!(error, ClientError::ResourceExhausted { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_model_still_loading_is_unavailable() {
    let worker = Worker::spawn("builtin://identity?load_delay_ms=20000", &[]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    assert!(!client.health_check().await.unwrap());
    let options = InferOptions {
        model: Some("m".into()),
        ..Default::default()
    };
    match refusal(&worker, 4, options).await {
        ClientError::Unavailable { message } => assert!(message.contains("not ready"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded_without_waiting_for_the_model() {
    let worker = Worker::start("builtin://checksum?infer_delay_ms=3000", &[]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    let options = InferOptions {
        timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let started = Instant::now();
    let error = client
        .infer(
            TensorBuffer::from_vec(vec![1u8; 8], vec![8], DataType::U8),
            options,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::DeadlineExceeded { .. }),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_checksum_models_uint64_output_is_read_as_u64() {
    let worker = Worker::start("builtin://checksum", &[]);
    let client = ModelWorkerClient::connect(&worker.endpoint())
        .await
        .unwrap();
    let output = client
        .infer(
            TensorBuffer::from_vec(vec![1u8; 1000], vec![1000], DataType::U8),
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(output.dtype(), DataType::U64);
    assert_eq!(output.as_u64_slice().unwrap().len(), 1);
}

/// The sidecar (for its broker) in `dir`, killed when dropped.
struct Sidecar(Child);

impl Sidecar {
    fn start(dir: &Path) -> Sidecar {
        let admin_port = free_port();
        let child = Command::new(target_binary(
            "remotemedia-sidecar",
            "run `cargo build -p remotemedia-sidecar`",
        ))
        .arg("--socket-dir")
        .arg(dir)
        .args([
            "--admin-address",
            "127.0.0.1",
            "--admin-port",
            &admin_port.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
        let sidecar = Sidecar(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join("broker.sock").exists() {
            assert!(Instant::now() < deadline, "the sidecar did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        sidecar
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_brokered_tensor_sent_straight_to_a_worker_goes_inline() {
    // The quickstart client, its tensors allocated by the node broker, against a worker on a
    // Unix socket: the worker does not list the brokered extension, so the tensors must travel
    // inline (the worker ignores region ids: a reference would arrive without its bytes and be
    // refused).
    let worker = Worker::start("builtin://identity", &[]);
    let broker_dir = worker.dir.join("sidecar");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let _sidecar = Sidecar::start(&broker_dir);
    let output = Command::new(target_binary(
        "quickstart-client",
        "run `cargo build --manifest-path examples/quickstart/Cargo.toml`",
    ))
    .arg(format!("unix://{}", worker.dir.display()))
    .env(
        "REMOTEMEDIA_SIDECAR",
        format!("unix://{}", broker_dir.display()),
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let region = stdout
        .split("in region ")
        .nth(1)
        .map(str::trim)
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        region.len() == 32 && region.bytes().all(|b| b.is_ascii_hexdigit()),
        "a brokered region id, not a /dev/shm name: {region}"
    );
    assert!(
        stdout.contains("shared memory: 1048576 elements back"),
        "{stdout}"
    );
}
