//! The Rust side of the Python client benchmark (`python/benches/client.py`): times the
//! calls a Python caller makes with `remotemedia.core.ModelWorkerClient`, made here with the
//! Rust client, so the two can be compared in one run.
//!
//! `infer_loop <endpoint> <model> <bytes> <repeats> shared|heap` sends a U8 tensor of `bytes`
//! `repeats` times and prints `median_us <n>`. `shared`: the tensor lives in one region of the
//! `SharedMemoryAllocator` (brokered when `REMOTEMEDIA_SIDECAR` is set) and each call opens it
//! again by id, as the Python binding does; `heap`: each call sends a new heap vector.
use std::time::Instant;

use remotemedia_runtime_core::model_worker::{InferOptions, ModelWorkerClient};
use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator, TensorBuffer};

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, model, bytes, repeats, place] = &args[..] else {
        return Err("usage: infer_loop <endpoint> <model> <bytes> <repeats> shared|heap".into());
    };
    let size: usize = bytes.parse()?;
    let repeats: usize = repeats.parse()?;
    let client = ModelWorkerClient::connect(endpoint).await?;
    let allocator = SharedMemoryAllocator::new(Default::default());
    let region = match place.as_str() {
        "shared" => {
            let mut tensor = allocator.allocate_tensor(size, None)?;
            tensor.as_mut_slice().fill(1);
            Some(tensor)
        }
        "heap" => None,
        other => return Err(format!("unknown place {other:?}: shared or heap").into()),
    };
    let mut samples = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        let input = match &region {
            Some(tensor) => TensorBuffer::from_shared_memory(
                &tensor.storage().region_id()?,
                0,
                size,
                vec![size],
                DataType::U8,
            )?,
            None => TensorBuffer::from_vec(vec![1u8; size], vec![size], DataType::U8)?,
        };
        let options = InferOptions {
            model: Some(model.clone()),
            ..Default::default()
        };
        client.infer(input, options).await?;
        samples.push(start.elapsed());
    }
    samples.sort();
    println!(
        "median_us {:.1}",
        samples[samples.len() / 2].as_secs_f64() * 1e6
    );
    Ok(())
}
