//! Quickstart, consumer side: `quickstart-consumer <region-id>` maps the producer's 1 MiB
//! tensor by id, reads it in place and prints `checksum=<n>`; then shows that a slice past the
//! end of the region is refused.
use remotemedia_runtime_core::tensor::{DataType, TensorBuffer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let region_id = std::env::args()
        .nth(1)
        .ok_or("usage: quickstart-consumer <region-id>")?;

    let shared = TensorBuffer::from_shared_memory(
        &region_id,
        0,
        1024 * 1024,
        vec![256, 1024],
        DataType::F32,
    )?;
    let bytes: &[u8] = shared.as_bytes(); // a view of the mapping, no copy
    let checksum: f64 = shared
        .as_f32_slice()?
        .iter()
        .enumerate()
        .map(|(i, &x)| (i + 1) as f64 * f64::from(x))
        .sum();
    println!("read {} bytes checksum={checksum}", bytes.len());

    match TensorBuffer::from_shared_memory(
        &region_id,
        4096,
        1024 * 1024,
        vec![256, 1024],
        DataType::F32,
    ) {
        Ok(_) => Err("a slice past the end of the region was accepted".into()),
        Err(error) => {
            println!("refused: {error}");
            Ok(())
        }
    }
}
