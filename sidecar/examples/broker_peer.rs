//! A client process for the broker's integration tests, driven line by line on stdin. It uses
//! only `remotemedia-runtime-core`'s public API with `REMOTEMEDIA_SIDECAR` set, as an
//! application would. Commands, each answered by one line (`ok …` or `err <message>`):
//!
//! - `alloc <bytes> <label|->`: allocate a tensor (kept), answers `ok <index> <region-id>`
//! - `open <region-id> <bytes>`: map a region by id (kept), answers `ok <index>`
//! - `write <index> <byte>` / `read <index>`: first byte of a kept tensor
//! - `free <index>`: drop a kept tensor
//! - `stats`: this process's session usage at the broker
//!
//! It exits on end of input.

use std::io::BufRead;

use remotemedia_runtime_core::shm::broker::BrokerClient;
use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator, TensorBuffer};

fn main() {
    let allocator = SharedMemoryAllocator::new(Default::default());
    let mut tensors: Vec<Option<TensorBuffer>> = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match run(&allocator, &mut tensors, &words) {
            Ok(answer) => format!("ok {answer}"),
            Err(error) => format!("err {error}"),
        };
        println!("{}", answer.trim_end());
    }
}

fn run(
    allocator: &SharedMemoryAllocator,
    tensors: &mut Vec<Option<TensorBuffer>>,
    words: &[&str],
) -> Result<String, Box<dyn std::error::Error>> {
    let tensor = |tensors: &mut Vec<Option<TensorBuffer>>, index: &str| {
        let index: usize = index.parse()?;
        tensors
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| format!("no tensor {index}").into())
            .map(|tensor| (index, tensor))
    };
    match words {
        ["alloc", bytes, label] => {
            let label = (*label != "-").then_some(*label);
            let tensor = allocator.allocate_tensor(bytes.parse()?, label)?;
            let id = tensor.storage().region_id()?;
            tensors.push(Some(tensor));
            Ok(format!("{} {id}", tensors.len() - 1))
        }
        ["open", id, bytes] => {
            let bytes: usize = bytes.parse()?;
            let tensor = TensorBuffer::from_shared_memory(id, 0, bytes, vec![bytes], DataType::U8)?;
            tensors.push(Some(tensor));
            Ok(format!("{}", tensors.len() - 1))
        }
        ["write", index, byte] => {
            let (index, mut t) = tensor(tensors, index)?;
            t.as_mut_slice()[0] = byte.parse()?;
            tensors[index] = Some(t);
            Ok(String::new())
        }
        ["read", index] => {
            let (index, t) = tensor(tensors, index)?;
            let byte = t.as_bytes()[0];
            tensors[index] = Some(t);
            Ok(byte.to_string())
        }
        ["free", index] => tensor(tensors, index).map(|_| String::new()),
        ["stats"] => {
            let client = BrokerClient::from_env()?.ok_or("REMOTEMEDIA_SIDECAR is not set")?;
            let stats = client.stats()?;
            Ok(format!(
                "held_regions={} held_bytes={} charged_bytes={}",
                stats.held_regions, stats.held_bytes, stats.charged_bytes
            ))
        }
        _ => Err(format!("unknown command {words:?}").into()),
    }
}
