//! The demo's client (`make demo`): the quickstart flow through the sidecar with
//! `ModelWorkerClient`, once to a worker on this node and once to a worker on another node.
//! With `REMOTEMEDIA_SIDECAR` set, it writes an FP32 tensor into a region made by the node
//! broker, asks the `identity` model for it through the sidecar's `infer.sock` with the output
//! written into a second region, checks what came back, and prints the path the sidecar took
//! (its `remotemedia_sidecar_inference_requests_total` counters) and the bytes that crossed a
//! socket: the `rchar + wchar` growth in `/proc/<pid>/io` of the sidecar, the worker and this
//! client (socket reads by `recv(2)` are not counted there, so each byte shows once, on the
//! sending side).
//!
//! Usage: `demo_client <admin-port> <sidecar-pid> <model>=<worker-pid>...`

use std::collections::HashMap;

use anyhow::{Context, bail};
use remotemedia_runtime_core::model_worker::{InferOptions, ModelWorkerClient};
use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 4 × 1 Mi FP32 values: 16 MiB.
const SHAPE: [usize; 2] = [4, 1 << 20];

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
    let client = ModelWorkerClient::from_env()
        .await?
        .context("failed to find REMOTEMEDIA_SIDECAR")?;
    let allocator = SharedMemoryAllocator::new(Default::default());
    let len = SHAPE[0] * SHAPE[1] * 4;

    for model in models {
        let (model, worker_pid) = model
            .split_once('=')
            .context("failed to read <model>=<worker-pid>")?;
        let worker_pid: u32 = worker_pid.parse().context("failed to parse a worker pid")?;
        let mut input = allocator
            .allocate_tensor(len, Some("demo"))?
            .reshape(SHAPE.to_vec(), DataType::F32)?;
        for (i, x) in input.as_mut_slice_of::<f32>()?.iter_mut().enumerate() {
            *x = i as f32 * 0.5;
        }
        let input_region = input.storage().region_id()?;
        let output = allocator.allocate_tensor(len, Some("demo"))?;
        let options = InferOptions {
            model: Some(model.to_owned()),
            output: Some(output),
            ..Default::default()
        };

        let pids = [sidecar_pid, worker_pid, std::process::id()];
        let paths_before = paths(admin_port).await?;
        let io_before = pids.map(io_bytes);
        let output = client.infer(input, options).await?;
        let io_after = pids.map(io_bytes);
        let paths_after = paths(admin_port).await?;

        let values = output.as_f32_slice()?;
        let same = values.iter().enumerate().all(|(i, &x)| x == i as f32 * 0.5);
        let taken: Vec<&str> = paths_after
            .iter()
            .filter(|(path, n)| paths_before.get(*path).copied().unwrap_or(0.0) < **n)
            .map(|(path, _)| path.as_str())
            .collect();
        let moved: Vec<Option<u64>> = io_before
            .iter()
            .zip(&io_after)
            .map(|(before, after)| Some((*after)? - (*before)?))
            .collect();
        println!(
            "\n{model}: INPUT0 FP32 {SHAPE:?} ({} MiB) in region {input_region}",
            len >> 20
        );
        println!(
            "  OUTPUT0 {:?} {:?} written into region {}, starting {:?}; equal to the input: {same}",
            output.dtype(),
            output.shape(),
            output.storage().region_id()?,
            &values[..4]
        );
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
    client.close().await?;
    Ok(())
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
