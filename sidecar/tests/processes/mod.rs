//! Real processes for the sidecar's tests and benchmarks: the sidecar binary with static
//! discovery, model workers (the worker binary's built-in models), regions made through the
//! broker, and the requests that name them. Included by `#[path]` from `tests/router.rs`,
//! `tests/drills.rs` and `benches/transport.rs`; each uses a part of it.
#![allow(dead_code)]

#[path = "../../../core/tests/support/ports.rs"]
mod ports;
#[path = "../../../core/tests/support/built.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
pub use ports::free_port;
use remotemedia_proto::inference::{
    InferParameter, ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ModelStatisticsResponse, ModelStreamInferResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse, SystemSharedMemoryRegisterRequest, SystemSharedMemoryRegisterResponse,
    SystemSharedMemoryStatusRequest, SystemSharedMemoryStatusResponse,
    SystemSharedMemoryUnregisterRequest, SystemSharedMemoryUnregisterResponse,
    grpc_inference_service_client::GrpcInferenceServiceClient,
    grpc_inference_service_server::GrpcInferenceService, infer_parameter::ParameterChoice,
    model_infer_request::InferInputTensor,
};
use remotemedia_proto::params::{
    BROKERED_BYTE_SIZE, BROKERED_OFFSET, BROKERED_REGION, SESSION_METADATA,
};
use remotemedia_runtime_core::shm::broker::{BrokerClient, RegionHandle, RegionKey};
use remotemedia_runtime_core::shm::{Access, Region};
pub use support::built;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

pub const MIB: usize = 1 << 20;
/// Room for a 256 MiB tensor inline, on both the sidecar and the worker.
pub const MAX_MESSAGE: &str = "314572800";
pub const NODE: &str = "node-a";

pub type Client = GrpcInferenceServiceClient<Channel>;

/// A fresh directory (socket directory, discovery file, logs), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let random = RegionKey::random().unwrap().to_hex();
        let path = std::env::temp_dir().join(format!("rm-router-{name}-{}", &random[..8]));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop.
pub struct Process(pub Child);

impl Process {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// `rchar + wchar` from `/proc/<pid>/io`: every byte the process moved through read- and
    /// write-like system calls (sockets included), whatever its own counters say.
    pub fn io_bytes(&self) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/io", self.pid())).unwrap();
        text.lines()
            .filter_map(|line| {
                let (key, value) = line.split_once(": ")?;
                matches!(key, "rchar" | "wchar").then(|| value.trim().parse::<u64>().unwrap())
            })
            .sum()
    }

    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Sidecar {
    pub process: Process,
    pub dir: PathBuf,
    pub workers: PathBuf,
    pub admin_port: u16,
    pub tcp_port: u16,
}

impl Sidecar {
    pub async fn start(dir: &TempDir, extra: &[&str]) -> Self {
        let workers = dir.0.join("workers.yaml");
        std::fs::write(&workers, "").unwrap();
        let (admin_port, tcp_port) = (free_port(), free_port());
        let log = std::fs::File::create(dir.0.join("sidecar.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_remotemedia-sidecar"))
            .arg("--socket-dir")
            .arg(&dir.0)
            .args(["--admin-address", "127.0.0.1", "--admin-port"])
            .arg(admin_port.to_string())
            .args(["--port", &tcp_port.to_string()])
            .args(["--discovery", "static", "--workers"])
            .arg(&workers)
            .args(["--node-name", NODE, "--max-message-bytes", MAX_MESSAGE])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stderr(log)
            .spawn()
            .expect("spawn sidecar");
        let mut sidecar = Self {
            process: Process(child),
            dir: dir.0.clone(),
            workers,
            admin_port,
            tcp_port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.0.join("infer.sock").exists() || sidecar.metrics().await.is_none() {
            assert!(sidecar.process.alive(), "sidecar exited: {}", sidecar.log());
            assert!(Instant::now() < deadline, "sidecar did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sidecar
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.log")).unwrap_or_default()
    }

    /// Replaces the discovery file: `(model, worker, node)` per endpoint.
    pub fn discover(&self, endpoints: &[(&str, &Worker, &str)]) {
        let ports: Vec<_> = endpoints
            .iter()
            .map(|(model, worker, node)| (*model, worker.port, *node))
            .collect();
        self.discover_ports(&ports);
    }

    /// Replaces the discovery file: `(model, port on 127.0.0.1, node)` per endpoint.
    pub fn discover_ports(&self, endpoints: &[(&str, u16, &str)]) {
        let text: String = endpoints
            .iter()
            .map(|(model, port, node)| {
                format!("- {{model: {model}, address: '127.0.0.1:{port}', node: {node}}}\n")
            })
            .collect();
        // Written beside and renamed over, so the sidecar never reads half a file.
        let fresh = self.workers.with_extension("new");
        std::fs::write(&fresh, text).unwrap();
        std::fs::rename(fresh, &self.workers).unwrap();
    }

    pub async fn unix_client(&self) -> Client {
        let path = self.dir.join("infer.sock");
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://sidecar.invalid")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    pub async fn tcp_client(&self) -> Client {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{}", self.tcp_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
        GrpcInferenceServiceClient::new(channel)
    }

    pub async fn metrics(&self) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    }

    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await.unwrap_or_default();
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

pub struct Worker {
    pub process: Process,
    pub port: u16,
    pub log: PathBuf,
}

impl Worker {
    /// Starts the worker binary serving `model_path` as `model_id`, redeeming grants at
    /// `broker` when given, and waits until it is ready.
    pub async fn start(
        dir: &TempDir,
        model_id: &str,
        model_path: &str,
        broker: Option<&Path>,
    ) -> Self {
        Self::start_with(dir, model_id, model_path, broker, &[]).await
    }

    /// [`Worker::start`] with more flags.
    pub async fn start_with(
        dir: &TempDir,
        model_id: &str,
        model_path: &str,
        broker: Option<&Path>,
        flags: &[&str],
    ) -> Self {
        let (port, admin_port) = (free_port(), free_port());
        let log = dir.0.join(format!("worker-{port}.log"));
        let mut command = Command::new(built("remotemedia-model-worker"));
        command
            .args(["--model-id", model_id, "--model-path", model_path])
            .args([
                "--port",
                &port.to_string(),
                "--admin-port",
                &admin_port.to_string(),
            ])
            .args([
                "--allow-named-shm",
                "false",
                "--max-message-bytes",
                MAX_MESSAGE,
            ])
            .args(["--drain-delay", "0s"])
            .arg("--termination-log")
            .arg(dir.0.join("termination-log"))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(broker) = broker {
            command.arg("--broker").arg(broker);
        }
        command.args(flags);
        let mut worker = Self {
            process: Process(command.spawn().unwrap()),
            port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
                .await
                .is_ok()
                && readyz(admin_port).await;
            if ready {
                return worker;
            }
            assert!(
                worker.process.alive() && Instant::now() < deadline,
                "worker not ready: {}",
                std::fs::read_to_string(&worker.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many memfd mappings the worker has (`/proc/<pid>/maps`).
    pub fn memfd_mappings(&self) -> usize {
        std::fs::read_to_string(format!("/proc/{}/maps", self.process.pid()))
            .unwrap()
            .lines()
            .filter(|line| line.contains("memfd:"))
            .count()
    }
}

pub async fn readyz(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut response = String::new();
    stream.write_all(request).await.is_ok()
        && stream.read_to_string(&mut response).await.is_ok()
        && response.starts_with("HTTP/1.1 200")
}

/// A region of `len` bytes allocated by `client` and mapped here, filled by `fill(i)`.
pub fn region(
    client: &BrokerClient,
    len: usize,
    fill: impl Fn(usize) -> u8,
) -> (Arc<RegionHandle>, Region) {
    let handle = client.allocate(len as u64, "").unwrap();
    let mut mapped = Region::from_handle(handle.clone(), Access::Shared).unwrap();
    for (i, byte) in mapped.as_mut_slice()[..len].iter_mut().enumerate() {
        *byte = fill(i);
    }
    (handle, mapped)
}

pub fn brokered(key: RegionKey, offset: u64, byte_size: u64) -> HashMap<String, InferParameter> {
    let param = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    HashMap::from([
        (
            BROKERED_REGION.into(),
            param(ParameterChoice::StringParam(key.to_hex())),
        ),
        (
            BROKERED_OFFSET.into(),
            param(ParameterChoice::Int64Param(offset as i64)),
        ),
        (
            BROKERED_BYTE_SIZE.into(),
            param(ParameterChoice::Int64Param(byte_size as i64)),
        ),
    ])
}

/// One UINT8 input `INPUT0` of `len` bytes in a brokered region.
pub fn brokered_request(model: &str, key: RegionKey, offset: u64, len: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "UINT8".into(),
            shape: vec![len as i64],
            parameters: brokered(key, offset, len as u64),
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn inline_request(model: &str, data: Vec<u8>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "UINT8".into(),
            shape: vec![data.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(data)],
        ..Default::default()
    }
}

pub fn with_session<T>(message: T, client: &BrokerClient) -> Request<T> {
    let mut request = Request::new(message);
    let token = client.session_token().unwrap().to_hex();
    request
        .metadata_mut()
        .insert(SESSION_METADATA, token.parse().unwrap());
    request
}

/// The `CHECKSUM` output of the checksum model: the sum of the input's bytes.
pub fn checksum(response: &ModelInferResponse) -> u64 {
    u64::from_le_bytes(response.raw_output_contents[0][..8].try_into().unwrap())
}

pub fn expected_sum(bytes: &[u8]) -> u64 {
    bytes.iter().map(|&b| u64::from(b)).sum()
}

pub type Answer<T> = Result<Response<T>, Status>;

/// A gRPC inference server in this process that answers ModelInfer with its function and every
/// other RPC with UNIMPLEMENTED: the transport benchmark's sink, the router tests' fake worker.
pub struct InferOnly<F>(pub F);

fn unimplemented<T>() -> Answer<T> {
    Err(Status::unimplemented(
        "this test server answers only ModelInfer",
    ))
}

#[tonic::async_trait]
impl<F, Fut> GrpcInferenceService for InferOnly<F>
where
    F: Fn(Request<ModelInferRequest>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Answer<ModelInferResponse>> + Send + 'static,
{
    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Answer<ModelInferResponse> {
        (self.0)(request).await
    }
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Answer<ServerLiveResponse> {
        unimplemented()
    }
    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Answer<ServerReadyResponse> {
        unimplemented()
    }
    async fn model_ready(&self, _: Request<ModelReadyRequest>) -> Answer<ModelReadyResponse> {
        unimplemented()
    }
    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Answer<ServerMetadataResponse> {
        unimplemented()
    }
    async fn model_metadata(
        &self,
        _: Request<ModelMetadataRequest>,
    ) -> Answer<ModelMetadataResponse> {
        unimplemented()
    }
    type ModelStreamInferStream = tokio_stream::Empty<Result<ModelStreamInferResponse, Status>>;
    async fn model_stream_infer(
        &self,
        _: Request<tonic::Streaming<ModelInferRequest>>,
    ) -> Answer<Self::ModelStreamInferStream> {
        unimplemented()
    }
    async fn model_config(&self, _: Request<ModelConfigRequest>) -> Answer<ModelConfigResponse> {
        unimplemented()
    }
    async fn model_statistics(
        &self,
        _: Request<ModelStatisticsRequest>,
    ) -> Answer<ModelStatisticsResponse> {
        unimplemented()
    }
    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> Answer<SystemSharedMemoryStatusResponse> {
        unimplemented()
    }
    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Answer<SystemSharedMemoryRegisterResponse> {
        unimplemented()
    }
    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Answer<SystemSharedMemoryUnregisterResponse> {
        unimplemented()
    }
}
