//! The shared fixture: start a worker on free ports, wait for it, talk to it, stop it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use nix::{sys::signal::Signal, unistd::Pid};
use remotemedia_proto::inference::{
    ModelInferRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
    model_infer_request::InferInputTensor,
};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint, Uri};

pub type Client = GrpcInferenceServiceClient<Channel>;

pub const BINARY: &str = env!("CARGO_BIN_EXE_remotemedia-model-worker");

/// How long a worker may take to become ready in a test (debug build, busy machine).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running worker process, killed when dropped.
pub struct Worker {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub uds: PathBuf,
    dir: TempDir,
}

impl Worker {
    /// Starts a worker serving `model_path` with `extra` flags, and waits until it is ready.
    pub async fn start(model_path: &str, extra: &[&str]) -> Worker {
        let worker = Worker::spawn(model_path, extra);
        worker.wait_ready().await;
        worker
    }

    /// Starts a worker without waiting for it.
    pub fn spawn(model_path: &str, extra: &[&str]) -> Worker {
        let dir = tempfile::tempdir().unwrap();
        let [port, admin_port] = free_ports();
        let uds = dir.path().join("worker.sock");
        let stderr = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let child = Command::new(BINARY)
            .args(["--model-path", model_path])
            .args(["--port", &port.to_string()])
            .args(["--admin-port", &admin_port.to_string()])
            .args(["--uds".as_ref(), uds.as_os_str()])
            .args([
                "--termination-log".as_ref(),
                dir.path().join("termination-log").as_os_str(),
            ])
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Worker {
            child,
            port,
            admin_port,
            uds,
            dir,
        }
    }

    /// Waits until `/readyz` answers 200, failing with the worker's log if it exits first.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok((200, _)) = http_get(self.admin_port, "/readyz").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker not ready: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn client(&self) -> Client {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect()
            .await
            .unwrap();
        GrpcInferenceServiceClient::new(channel).max_decoding_message_size(usize::MAX)
    }

    pub async fn uds_client(&self) -> Client {
        let path = self.uds.clone();
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://worker.invalid")
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
    }

    /// `GET path` on the admin port.
    pub async fn admin(&self, path: &str) -> (u16, String) {
        http_get(self.admin_port, path).await.unwrap()
    }

    /// The value of an unlabelled or labelled sample in `/metrics`, e.g.
    /// `remotemedia_worker_in_flight`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.admin("/metrics").await;
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn signal(&self, signal: Signal) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Threads the process runs now, from `/proc/<pid>/task`.
    #[cfg(feature = "torch")]
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .unwrap()
            .count()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two distinct ports free right now.
pub fn free_ports() -> [u16; 2] {
    [crate::ports::free_port(), crate::ports::free_port()]
}

/// A minimal HTTP/1.1 GET: status code and body.
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    Ok((status, body))
}

/// A request with one raw input `INPUT0`.
pub fn request(model: &str, datatype: &str, shape: &[i64], data: Vec<u8>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(data)],
        ..Default::default()
    }
}

/// Runs the binary to completion with `args` (bad flags: it must exit by itself).
pub fn run_to_exit(args: &[&str], dir: &Path) -> (ExitStatus, String) {
    let output = Command::new(BINARY)
        .args(args)
        .args([
            "--termination-log".as_ref(),
            dir.join("termination-log").as_os_str(),
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
