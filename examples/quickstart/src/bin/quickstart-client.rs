//! Quickstart, client side: calls a model worker serving `builtin://identity`, first with the
//! issue's snippet (a 512-token tensor, inline), then with a 4 MiB tensor in shared memory and
//! its output written into another, which go by reference when the worker shares this
//! machine's `/dev/shm`. The calls are the same either way.
//!
//! `quickstart-client [endpoint]` (default `grpc://localhost:50051`, the README's worker); with
//! `REMOTEMEDIA_SIDECAR` set the shared-memory tensors come from the node broker instead.

use remotemedia_runtime_core::model_worker::{InferOptions, ModelWorkerClient};
use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator, TensorBuffer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "grpc://localhost:50051".to_owned());
    let input_data: Vec<i32> = (0..512).collect();
    let tokens = snippet(&endpoint, input_data.clone()).await?;
    assert_eq!(tokens, input_data, "the identity model returns its input");
    println!("inline: {} tokens back", tokens.len());

    // The same call with tensors in shared memory: 1 Mi INT32 elements in, and out into a
    // tensor of ours.
    let elements = 1024 * 1024;
    let allocator = SharedMemoryAllocator::new(Default::default());
    let mut input = allocator
        .allocate_tensor(elements * 4, Some("quickstart"))?
        .reshape(vec![1, elements], DataType::I32)?;
    for (i, x) in input.as_mut_slice_of::<i32>()?.iter_mut().enumerate() {
        *x = i as i32 * 7;
    }
    let output = allocator.allocate_tensor(elements * 4, Some("quickstart"))?;
    let client = ModelWorkerClient::connect(&endpoint).await?;
    let options = InferOptions {
        output: Some(output),
        ..Default::default()
    };
    let output = client.infer(input, options).await?;
    let values = output.as_i32_slice()?;
    assert_eq!(output.shape(), &[1, elements]);
    assert!(values.iter().enumerate().all(|(i, &x)| x == i as i32 * 7));
    println!(
        "shared memory: {} elements back in region {}",
        values.len(),
        output.storage().region_id()?
    );
    client.close().await?;
    Ok(())
}

/// The snippet, verbatim but for the endpoint, which comes from the command line.
#[rustfmt::skip]
async fn snippet(endpoint: &str, input_data: Vec<i32>) -> Result<Vec<i32>, Box<dyn std::error::Error>> {
    let client = ModelWorkerClient::connect(endpoint).await?;   // or "unix:///run/remotemedia/infer.sock"
    let input = TensorBuffer::from_vec(input_data, vec![1, 512], DataType::I32);
    let output = client.infer(input, Default::default()).await?;
    let tokens = output.as_i32_slice()?;
    Ok(tokens.to_vec())
}
