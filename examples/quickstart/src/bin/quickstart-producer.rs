//! Quickstart, producer side: puts a 1 MiB tensor (256 × 1024 `f32`, element `i` = `i`) in
//! shared memory, prints `region=<id> checksum=<n>`, and keeps the region alive until a line (or
//! the end) arrives on stdin. Run `quickstart-consumer <id>` meanwhile.

use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator, TensorBuffer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data: Vec<u8> = (0..256 * 1024)
        .flat_map(|i| (i as f32).to_ne_bytes())
        .collect();

    let allocator = SharedMemoryAllocator::new(Default::default());
    let mut tensor = allocator.allocate_tensor(1024 * 1024, Some("session-123"))?;
    tensor.as_mut_slice().copy_from_slice(&data);
    let region_id = tensor.storage().region_id()?; // hand this string to another process

    let tensor = tensor.reshape(vec![256, 1024], DataType::F32)?;
    println!("region={region_id} checksum={}", checksum(&tensor)?);
    std::io::stdin().read_line(&mut String::new())?;
    Ok(())
}

/// Σ (i + 1) · x_i over the elements: any moved, lost or changed element changes it.
fn checksum(tensor: &TensorBuffer) -> Result<f64, Box<dyn std::error::Error>> {
    Ok(tensor
        .as_f32_slice()?
        .iter()
        .enumerate()
        .map(|(i, &x)| (i + 1) as f64 * f64::from(x))
        .sum())
}
