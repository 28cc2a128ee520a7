//! A scriptable second process for the cross-process tests and for trying regions by hand.
//!
//! `shm_peer create <bytes>` allocates a tensor and prints `region <id>`;
//! `shm_peer open <id> <bytes>` maps an existing region by id and prints `opened`.
//! Then, one command per stdin line, each answered on stdout:
//! `fill <byte>` → `filled`, `read` → `bytes <first> <last>`, `sum` → `sum <n>` (reads every
//! byte in place). It exits when stdin closes.
use std::io::{BufRead, Write};

use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator, TensorBuffer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let allocator = SharedMemoryAllocator::new(Default::default());
    let mut tensor = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["create", bytes] => {
            let tensor = allocator.allocate_tensor(bytes.parse()?, None)?;
            println!("region {}", tensor.storage().region_id()?);
            tensor
        }
        ["open", id, bytes] => {
            let size: usize = bytes.parse()?;
            let tensor = TensorBuffer::from_shared_memory(id, 0, size, vec![size], DataType::U8)?;
            println!("opened");
            tensor
        }
        _ => return Err("usage: shm_peer create <bytes> | shm_peer open <id> <bytes>".into()),
    };
    let mut out = std::io::stdout().lock();
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["fill", byte] => {
                tensor.as_mut_slice().fill(byte.parse()?);
                writeln!(out, "filled")?;
            }
            ["read"] => {
                let bytes = tensor.as_bytes();
                let (first, last) = (bytes.first(), bytes.last());
                writeln!(out, "bytes {} {}", first.unwrap_or(&0), last.unwrap_or(&0))?;
            }
            ["sum"] => {
                let sum: u64 = tensor.as_bytes().iter().map(|&b| u64::from(b)).sum();
                writeln!(out, "sum {sum}")?;
            }
            _ => writeln!(out, "unknown command {line:?}")?,
        }
        out.flush()?;
    }
    Ok(())
}
