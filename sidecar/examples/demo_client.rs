//! The demo's client (`make demo`): the quickstart flow through the sidecar, once to a worker
//! on this node and once to a worker on another node. It writes an FP32 tensor into a region
//! made by the broker (`REMOTEMEDIA_SIDECAR`), asks the `identity` model for it through
//! `<socket-dir>/infer.sock` with the output written into a second region, checks what came
//! back, and prints the path the sidecar took (its `remotemedia_sidecar_inference_requests_total`
//! counters) and the bytes that crossed a socket: the `rchar + wchar` growth in `/proc/<pid>/io`
//! of the sidecar, the worker and this client.
//!
//! Usage: `demo_client <admin-port> <sidecar-pid> <model>=<worker-pid>...`

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use hyper_util::rt::TokioIo;
use remotemedia_proto::inference::{
    InferParameter, ModelInferRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    model_infer_request::InferRequestedOutputTensor,
};
use remotemedia_proto::params::{
    BROKERED_BYTE_SIZE, BROKERED_OFFSET, BROKERED_REGION, SESSION_METADATA,
};
use remotemedia_runtime_core::shm::broker::{BrokerClient, RegionKey};
use remotemedia_runtime_core::shm::{Access, Region};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Endpoint, Uri};

/// 4 × 1 Mi FP32 values: 16 MiB.
const SHAPE: [i64; 2] = [4, 1 << 20];

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [admin_port, sidecar_pid, models @ ..] = args.as_slice() else {
        bail!("usage: demo_client <admin-port> <sidecar-pid> <model>=<worker-pid>...");
    };
    let admin_port: u16 = admin_port
        .parse()
        .context("failed to parse the admin port")?;
    let sidecar_pid: u32 = sidecar_pid
        .parse()
        .context("failed to parse the sidecar pid")?;
    let dir = PathBuf::from(
        std::env::var("REMOTEMEDIA_SIDECAR")
            .context("failed to find REMOTEMEDIA_SIDECAR")?
            .trim_start_matches("unix://"),
    );
    let broker = BrokerClient::from_env()?.context("failed to find REMOTEMEDIA_SIDECAR")?;
    let token = broker
        .session_token()
        .context("failed to get a session token")?
        .to_hex();
    let mut client = connect(dir.join("infer.sock")).await?;

    let count = (SHAPE[0] * SHAPE[1]) as usize;
    let len = count * 4;
    let input = broker.allocate(len as u64, "demo")?;
    let mut input_map = Region::from_handle(input.clone(), Access::Shared)?;
    for (i, chunk) in input_map.as_mut_slice()[..len]
        .chunks_exact_mut(4)
        .enumerate()
    {
        chunk.copy_from_slice(&(i as f32 * 0.5).to_le_bytes());
    }
    println!(
        "client: wrote INPUT0 FP32 {SHAPE:?} ({} MiB) into region {} (made by the sidecar's broker)",
        len >> 20,
        input.key().to_hex()
    );

    for model in models {
        let (model, worker_pid) = model
            .split_once('=')
            .context("failed to read <model>=<worker-pid>")?;
        let worker_pid: u32 = worker_pid.parse().context("failed to parse a worker pid")?;
        let output = broker.allocate(len as u64, "demo")?;
        let output_map = Region::from_handle(output.clone(), Access::Shared)?;
        let mut request = tonic::Request::new(ModelInferRequest {
            model_name: model.to_owned(),
            inputs: vec![InferInputTensor {
                name: "INPUT0".into(),
                datatype: "FP32".into(),
                shape: SHAPE.to_vec(),
                parameters: brokered(input.key(), len),
                ..Default::default()
            }],
            outputs: vec![InferRequestedOutputTensor {
                name: "OUTPUT0".into(),
                parameters: brokered(output.key(), len),
            }],
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert(SESSION_METADATA, token.parse()?);

        let pids = [sidecar_pid, worker_pid, std::process::id()];
        let paths_before = paths(admin_port).await?;
        let io_before = pids.map(io_bytes);
        let response = client.model_infer(request).await?.into_inner();
        let io_after = pids.map(io_bytes);
        let paths_after = paths(admin_port).await?;

        let same = output_map.as_slice()[..len] == input_map.as_slice()[..len];
        let first: Vec<f32> = output_map.as_slice()[..16]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("four bytes")))
            .collect();
        let taken: Vec<String> = paths_after
            .iter()
            .filter(|(path, n)| paths_before.get(*path).copied().unwrap_or(0.0) < **n)
            .map(|(path, _)| path.clone())
            .collect();
        let moved: Vec<Option<u64>> = io_before
            .iter()
            .zip(&io_after)
            .map(|(before, after)| Some((*after)? - (*before)?))
            .collect();
        println!(
            "\n{model}: model {} answered OUTPUT0 into region {}",
            response.model_name,
            output.key().to_hex()
        );
        println!("  output starts {first:?}; equal to the input: {same}");
        println!("  path taken by the sidecar: {}", taken.join(", "));
        println!(
            "  bytes through system calls (rchar + wchar, /proc/<pid>/io): sidecar {}, worker {}, client {}",
            show(moved[0]),
            show(moved[1]),
            show(moved[2])
        );
        if !same {
            bail!("failed to get the input back from {model}");
        }
    }
    Ok(())
}

fn brokered(key: RegionKey, len: usize) -> HashMap<String, InferParameter> {
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
            param(ParameterChoice::Int64Param(0)),
        ),
        (
            BROKERED_BYTE_SIZE.into(),
            param(ParameterChoice::Int64Param(len as i64)),
        ),
    ])
}

async fn connect(
    path: PathBuf,
) -> anyhow::Result<GrpcInferenceServiceClient<tonic::transport::Channel>> {
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://sidecar.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .context("failed to connect to the sidecar's infer.sock")?;
    Ok(GrpcInferenceServiceClient::new(channel))
}

/// `rchar + wchar` of `pid`, or nothing when `/proc/<pid>/io` cannot be read (another user's
/// process).
fn io_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(": ")?;
            matches!(key, "rchar" | "wchar").then(|| value.trim().parse::<u64>().ok())
        })
        .sum()
}

fn show(bytes: Option<u64>) -> String {
    match bytes {
        Some(n) if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        Some(n) => format!("{n} B"),
        None => "unknown".into(),
    }
}

/// `remotemedia_sidecar_inference_requests_total` by `path` label, from the admin port.
async fn paths(admin_port: u16) -> anyhow::Result<HashMap<String, f64>> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
        .await
        .context("failed to connect to the sidecar's admin port")?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let mut paths = HashMap::new();
    for line in response.lines() {
        let Some(rest) = line.strip_prefix("remotemedia_sidecar_inference_requests_total{") else {
            continue;
        };
        let (labels, value) = rest.split_once("} ").context("failed to read a metric")?;
        let path = labels
            .split(',')
            .find_map(|label| label.strip_prefix("path=\""))
            .and_then(|p| p.strip_suffix('"'))
            .context("failed to find the path label")?;
        *paths.entry(path.to_owned()).or_default() += value.parse::<f64>()?;
    }
    Ok(paths)
}
