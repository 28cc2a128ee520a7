//! The Rust side of the Python client benchmark (`python/benches/client.py`): the loop the
//! Python `ModelWorkerClient` runs there, in a process of its own, so that both clients are
//! measured through the same sidecar and workers in the same run.
//!
//! `client_loop <model> <shared|inline> <bytes>`, with `REMOTEMEDIA_SIDECAR` set: fills a tensor
//! of `bytes` bytes (byte i is i % 251) in a brokered region from the `SharedMemoryAllocator`
//! (`shared`) or in a buffer of this process (`inline`), connects to that sidecar
//! (`ModelWorkerClient::from_env`) and makes one untimed call. Then, for each line `<passes>`
//! read from stdin (a round), it makes `passes` timed calls, each checked against the checksum,
//! and prints their nanoseconds on one line. It exits when stdin closes.
//!
//! A call takes its input by value, so each one is handed a new tensor over the same bytes,
//! exactly as the Python binding does for the tensor it is given: the region opened again by
//! id (`shared`), or a heap copy of the buffer (`inline`).
use std::error::Error;
use std::io::{BufRead, Write};
use std::time::Instant;

use remotemedia_runtime_core::model_worker::{InferOptions, ModelWorkerClient};
use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator, TensorBuffer};

const USAGE: &str = "usage: client_loop <model> <shared|inline> <bytes>, then <passes> per line of stdin (with REMOTEMEDIA_SIDECAR set)";

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, placement, bytes] = &args[..] else {
        return Err(USAGE.into());
    };
    let len: usize = bytes
        .parse()
        .map_err(|e| format!("failed to parse <bytes> {bytes:?}: {e}"))?;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let expected: u64 = data.iter().map(|&b| u64::from(b)).sum();

    let allocator = SharedMemoryAllocator::new(Default::default());
    // The allocated tensor stays alive (and its region with it) for the whole loop.
    let (shared, region_id) = match placement.as_str() {
        "shared" => {
            let mut tensor = allocator.allocate_tensor(len, None)?;
            tensor.as_mut_slice().copy_from_slice(&data);
            let id = tensor.storage().region_id()?;
            if !tensor.storage().region().is_some_and(|r| r.is_brokered()) {
                return Err(
                    "failed to allocate a brokered region: is REMOTEMEDIA_SIDECAR set?".into(),
                );
            }
            (Some(tensor), id.to_string())
        }
        "inline" => (None, String::new()),
        other => return Err(format!("failed to parse placement {other:?}: {USAGE}").into()),
    };
    let input = || match shared {
        Some(_) => TensorBuffer::from_shared_memory(&region_id, 0, len, vec![len], DataType::U8),
        None => TensorBuffer::copy_from_bytes(&data, vec![len], DataType::U8),
    };

    let client = ModelWorkerClient::from_env()
        .await?
        .ok_or("failed to connect: REMOTEMEDIA_SIDECAR is not set")?;
    let call = async || -> Result<(), Box<dyn Error>> {
        let options = InferOptions {
            model: Some(model.clone()),
            ..Default::default()
        };
        let output = client.infer(input(), options).await?;
        match output.as_u64_slice()? {
            [sum] if *sum == expected => Ok(()),
            other => Err(format!("checksum {other:?}, expected {expected}").into()),
        }
    };
    call().await?;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let passes: usize = line
            .trim()
            .parse()
            .map_err(|e| format!("failed to parse <passes> {line:?}: {e}"))?;
        let mut times = Vec::with_capacity(passes);
        for _ in 0..passes {
            let start = Instant::now();
            call().await?;
            times.push(start.elapsed().as_nanos().to_string());
        }
        writeln!(out, "{}", times.join(" "))?;
        out.flush()?;
    }
    Ok(())
}
