//! The worker benchmark: real worker processes and a tonic client, against baselines measured in
//! the same run.
//!
//! 1. `builtin://checksum` (reads every byte) at 4 KiB, 1 MiB, 16 MiB and 64 MiB: the backend
//!    called in this process (baseline), then through a worker with the tensor inline in the
//!    gRPC message and in Triton system shared memory: p50 and p99 latency, effective GB/s
//!    (payload over end-to-end p50 time) and the p50 ratio to the baseline.
//! 2. The heavy TorchScript model (`make models`): throughput and p99 at concurrency 1, 8 and
//!    64, with dynamic batching off (`--max-batch-size 1`) and on (its config.pbtxt: up to 64,
//!    500 µs), and the ratio of the two throughputs.
//!
//! `--quick` runs one pass per row (CI runs it so the benchmark cannot rot); `--models DIR` is
//! where `make models` wrote the models (default `target/models` of the workspace); `--device`
//! (default `cpu`) is where the heavy model runs, e.g. `cuda:0`; `--worker PATH` runs another
//! worker binary than the one cargo built with the benchmark (a copy on a GPU machine).
//! `make bench` (or `cargo bench -p remotemedia-model-worker --features torch --bench worker`).

use std::{
    hint::black_box,
    num::NonZeroUsize,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

#[path = "../../core/tests/support/ports.rs"]
mod ports;
use ports::free_port;

use bytes::Bytes;
use remotemedia_model_worker::{
    backend::ModelSource,
    config::Device,
    tensor::{DataType, TensorView},
};
use remotemedia_proto::{
    inference::{
        InferParameter, ModelInferRequest, ServerReadyRequest, SystemSharedMemoryRegisterRequest,
        grpc_inference_service_client::GrpcInferenceServiceClient,
        infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
    },
    params::{SHARED_MEMORY_BYTE_SIZE, SHARED_MEMORY_OFFSET, SHARED_MEMORY_REGION},
};
use remotemedia_runtime_core::shm::Region;
use tonic::transport::Channel;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
type Client = GrpcInferenceServiceClient<Channel>;

/// The worker binary `--worker` named; else the one cargo built with this benchmark.
static WORKER: OnceLock<PathBuf> = OnceLock::new();
const MIB: usize = 1 << 20;
/// Room for a 64 MiB tensor and the message around it.
const MAX_MESSAGE_BYTES: usize = 80 * MIB;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; ours are `--quick`, `--models DIR`, `--device DEVICE` and
    // `--worker PATH`.
    let quick = args.iter().any(|arg| arg == "--quick");
    let value = |flag: &str| {
        args.iter()
            .position(|arg| arg == flag)
            .map(|index| {
                args.get(index + 1)
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))
            })
            .transpose()
    };
    let models = value("--models")?.map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/models")),
        PathBuf::from,
    );
    let device = value("--device")?.unwrap_or_else(|| "cpu".into());
    if let Some(worker) = value("--worker")? {
        WORKER
            .set(PathBuf::from(worker))
            .expect("the worker binary is chosen once");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        println!(
            "worker benchmark ({})\n",
            if quick {
                "quick: one pass per row"
            } else {
                "full"
            }
        );
        checksum_table(quick).await?;
        println!();
        heavy_table(&models, &device, quick).await
    })
}

/// A worker process on free ports, killed when dropped.
struct Worker {
    child: Child,
    port: u16,
}

impl Worker {
    async fn start(model_path: &str, extra: &[&str]) -> Result<Worker> {
        let [port, admin_port] = [free_port(), free_port()];
        let binary = WORKER.get_or_init(|| env!("CARGO_BIN_EXE_remotemedia-model-worker").into());
        let child = Command::new(binary)
            .args(["--model-path", model_path])
            .args(["--port", &port.to_string()])
            .args(["--admin-port", &admin_port.to_string()])
            .args(["--max-message-bytes", &MAX_MESSAGE_BYTES.to_string()])
            .args(["--termination-log", "/dev/null"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let worker = Worker { child, port };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(mut client) = worker.client().await
                && client
                    .server_ready(ServerReadyRequest {})
                    .await
                    .is_ok_and(|ready| ready.into_inner().ready)
            {
                return Ok(worker);
            }
            if Instant::now() > deadline {
                return Err(format!("worker for {model_path} never turned ready").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn client(&self) -> Result<Client> {
        Ok(
            GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{}", self.port))
                .await?
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Latencies of one row, sorted.
struct Samples(Vec<Duration>);

impl Samples {
    fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Samples(samples)
    }

    fn quantile(&self, q: f64) -> Duration {
        let last = self.0.len().saturating_sub(1);
        self.0
            .get((last as f64 * q).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

fn millis(duration: Duration) -> String {
    format!("{:.3} ms", duration.as_secs_f64() * 1e3)
}

/// Untimed calls before each row's timed ones: after one, the quick pass (one timed call) still
/// timed first-call costs (16 MiB inline: 0.38 to 1.00 GB/s against about 2 GB/s at p50).
const WARM_UP: usize = 5;

/// Runs `once` `passes` times after [`WARM_UP`] untimed calls, timing each.
async fn time<F, Fut>(passes: usize, mut once: F) -> Result<Samples>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    for _ in 0..WARM_UP {
        once().await?;
    }
    let mut samples = Vec::with_capacity(passes);
    for _ in 0..passes {
        let started = Instant::now();
        once().await?;
        samples.push(started.elapsed());
    }
    Ok(Samples::new(samples))
}

fn input(datatype: &str, shape: Vec<i64>) -> InferInputTensor {
    InferInputTensor {
        name: "INPUT0".into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    }
}

async fn checksum_table(quick: bool) -> Result<()> {
    println!("builtin://checksum: one tensor, read whole; GB/s = payload / p50 end-to-end time");
    println!(
        "{:<8} {:<15} {:>12} {:>12} {:>9} {:>14}",
        "size", "path", "p50", "p99", "GB/s", "p50 vs base"
    );
    let backend = ModelSource::parse("builtin://checksum")?.load(Device::Cpu, None)?;
    let worker = Worker::start("builtin://checksum", &[]).await?;
    let mut client = worker.client().await?;
    for (label, size) in [
        ("4 KiB", 4 << 10),
        ("1 MiB", MIB),
        ("16 MiB", 16 * MIB),
        ("64 MiB", 64 * MIB),
    ] {
        let passes = if quick {
            1
        } else {
            (512 * MIB / size).clamp(20, 500)
        };
        let payload = Bytes::from(vec![7u8; size]);
        let shape = [size];
        let baseline = time(passes, || {
            let result = backend.infer(&[TensorView {
                name: "INPUT0",
                datatype: DataType::Uint8,
                shape: &shape,
                data: &payload,
            }]);
            async move {
                black_box(result?);
                Ok(())
            }
        })
        .await?;

        let inline = time(passes, || {
            let mut client = client.clone();
            let request = ModelInferRequest {
                model_name: "checksum".into(),
                inputs: vec![input("UINT8", vec![size as i64])],
                raw_input_contents: vec![payload.clone()],
                ..Default::default()
            };
            async move {
                black_box(client.model_infer(request).await?);
                Ok(())
            }
        })
        .await?;

        let mut region = Region::create_named(NonZeroUsize::new(size).ok_or("empty size")?)?;
        region.as_mut_slice().copy_from_slice(&payload);
        let name = format!("bench-{size}");
        client
            .system_shared_memory_register(SystemSharedMemoryRegisterRequest {
                name: name.clone(),
                key: format!("/{}", region.id()),
                offset: 0,
                byte_size: size as u64,
            })
            .await?;
        let parameter = |choice| InferParameter {
            parameter_choice: Some(choice),
        };
        let mut in_region = input("UINT8", vec![size as i64]);
        in_region.parameters = [
            (SHARED_MEMORY_REGION, ParameterChoice::StringParam(name)),
            (SHARED_MEMORY_OFFSET, ParameterChoice::Uint64Param(0)),
            (
                SHARED_MEMORY_BYTE_SIZE,
                ParameterChoice::Uint64Param(size as u64),
            ),
        ]
        .into_iter()
        .map(|(key, choice)| (key.to_owned(), parameter(choice)))
        .collect();
        let shared = time(passes, || {
            let mut client = client.clone();
            let request = ModelInferRequest {
                model_name: "checksum".into(),
                inputs: vec![in_region.clone()],
                ..Default::default()
            };
            async move {
                black_box(client.model_infer(request).await?);
                Ok(())
            }
        })
        .await?;

        let base = baseline.quantile(0.5).as_secs_f64();
        for (path, samples) in [
            ("in-process", &baseline),
            ("inline gRPC", &inline),
            ("shared memory", &shared),
        ] {
            let p50 = samples.quantile(0.5);
            println!(
                "{:<8} {:<15} {:>12} {:>12} {:>9.2} {:>13.2}x",
                label,
                path,
                millis(p50),
                millis(samples.quantile(0.99)),
                size as f64 / p50.as_secs_f64() / 1e9,
                p50.as_secs_f64() / base,
            );
        }
    }
    Ok(())
}

async fn heavy_table(models: &std::path::Path, device: &str, quick: bool) -> Result<()> {
    let model = models.join("heavy/model.pt");
    if !model.is_file() {
        return Err(format!("{} is missing: run `make models`", model.display()).into());
    }
    let model = model.display().to_string();
    // Each client sends this many requests per row.
    let per_client = if quick { 1 } else { 16 };
    println!(
        "heavy model (FP32[1,256] per request) on {device}: {per_client} request(s) per client per row"
    );
    println!(
        "{:<12} {:<10} {:>12} {:>12} {:>14}",
        "concurrency", "batching", "req/s", "p99", "on vs off"
    );
    let row: Vec<u8> = (0..256)
        .flat_map(|index| ((index as f32) * 0.01).sin().to_le_bytes())
        .collect();
    let request = ModelInferRequest {
        model_name: "heavy".into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            ..input("FP32", vec![1, 256])
        }],
        raw_input_contents: vec![Bytes::from(row)],
        ..Default::default()
    };
    let off = Worker::start(&model, &["--device", device, "--max-batch-size", "1"]).await?;
    let on = Worker::start(&model, &["--device", device]).await?;
    for concurrency in [1, 8, 64] {
        let mut throughput = [0.0; 2];
        for (slot, (label, worker)) in [("off", &off), ("on", &on)].into_iter().enumerate() {
            let (rate, p99) = load(worker, &request, concurrency, per_client).await?;
            throughput[slot] = rate;
            let ratio = if slot == 1 {
                format!("{:.2}x", throughput[1] / throughput[0])
            } else {
                String::new()
            };
            println!(
                "{:<12} {:<10} {:>12.1} {:>12} {:>14}",
                concurrency,
                label,
                rate,
                millis(p99),
                ratio
            );
        }
    }
    Ok(())
}

/// `concurrency` clients, each on its own connection, each sending `per_client` requests one
/// after another: requests per second over the whole run, and the p99 latency.
async fn load(
    worker: &Worker,
    request: &ModelInferRequest,
    concurrency: usize,
    per_client: usize,
) -> Result<(f64, Duration)> {
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut client = worker.client().await?;
        // Warm the connection (and the model) outside the measurement.
        client.model_infer(request.clone()).await?;
        clients.push(client);
    }
    let start = Arc::new(tokio::sync::Barrier::new(concurrency + 1));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let request = request.clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let sent = Instant::now();
                    client.model_infer(request.clone()).await?;
                    latencies.push(sent.elapsed());
                }
                Ok::<_, tonic::Status>(latencies)
            })
        })
        .collect();
    start.wait().await;
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(concurrency * per_client);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let samples = Samples::new(latencies);
    Ok((
        samples.0.len() as f64 / elapsed.as_secs_f64(),
        samples.quantile(0.99),
    ))
}
