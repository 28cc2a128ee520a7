//! Shared-memory benchmarks: allocating from the pool vs creating a fresh region, and reading a
//! 64 MiB tensor by region id vs copying it. Prints tables with ratios to a baseline measured in
//! the same run. `--quick` runs one pass per row (CI runs it so the benchmark cannot rot).
//!
//! `make bench` (or `cargo bench -p remotemedia-runtime-core --bench shm [-- --quick]`).

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use remotemedia_runtime_core::shm::{Access, AllocatorConfig, Region, open_region};
use remotemedia_runtime_core::tensor::{DataType, SharedMemoryAllocator, TensorBuffer};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const READ_SIZE: usize = 64 << 20;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; the only flag of ours is `--quick`.
    let quick = std::env::args().any(|arg| arg == "--quick");
    let (alloc_passes, read_passes) = if quick { (1, 1) } else { (200, 20) };
    println!(
        "shared-memory benchmarks ({} pass(es) per row; mean per operation)\n",
        if quick { 1 } else { alloc_passes }
    );
    allocation(alloc_passes)?;
    println!();
    reading(read_passes)?;
    Ok(())
}

/// Allocate-and-free cycles: a fresh region every time (create, size, lock, map; then unlink and
/// unmap) against the allocator's steady state (a pooled region; its pages released on free).
/// "written" rows also fill the tensor, so page faults and giving pages back are included.
fn allocation(passes: u32) -> Result<()> {
    println!("allocate + free, per cycle");
    println!(
        "{:<8} {:>10} {:>14} {:>14} {:>14}",
        "size", "", "fresh region", "pooled region", "fresh/pooled"
    );
    let allocator = SharedMemoryAllocator::new(AllocatorConfig::default());
    for (label, size) in [
        ("64 KiB", 64 << 10),
        ("1 MiB", 1 << 20),
        ("64 MiB", 64 << 20),
    ] {
        let len = NonZeroUsize::new(size).ok_or("empty size")?;
        drop(allocator.allocate_tensor(size, None)?); // warm the pool for this size class
        for written in [false, true] {
            let fresh = mean(passes, || {
                let mut region = Region::create_named(len)?;
                if written {
                    region.as_mut_slice().fill(1);
                }
                drop(black_box(region));
                Ok(())
            })?;
            let pooled = mean(passes, || {
                let mut tensor = allocator.allocate_tensor(size, None)?;
                if written {
                    tensor.as_mut_slice().fill(1);
                }
                drop(black_box(tensor));
                Ok(())
            })?;
            println!(
                "{label:<8} {:>10} {:>14} {:>14} {:>13.1}x",
                if written { "written" } else { "untouched" },
                show(fresh),
                show(pooled),
                ratio(fresh, pooled)
            );
        }
    }
    let stats = allocator.stats();
    println!(
        "pool: {} regions created for {} allocations",
        stats.regions_created,
        stats.regions_created + stats.pool_hits
    );
    Ok(())
}

/// Reading every byte of a 64 MiB tensor another party put in shared memory.
fn reading(passes: u32) -> Result<()> {
    let allocator = SharedMemoryAllocator::new(AllocatorConfig::default());
    let mut source = allocator.allocate_tensor(READ_SIZE, None)?;
    source.as_mut_slice().fill(1);
    let id = source.storage().region_id()?;

    let copy = mean(passes, || {
        let copied = source.as_bytes().to_vec();
        check(sum(black_box(&copied)))
    })?;
    let open = mean(passes, || {
        let tensor =
            TensorBuffer::from_shared_memory(&id, 0, READ_SIZE, vec![READ_SIZE], DataType::U8)?;
        check(sum(black_box(tensor.as_bytes())))
    })?;
    let held = open_region(&id, Access::Private)?;
    let cached = mean(passes, || {
        let region = open_region(&id, Access::Private)?;
        check(sum(black_box(&region.as_slice()[..READ_SIZE])))
    })?;
    drop(held);

    println!("read a 64 MiB tensor, per read");
    println!("{:<52} {:>12} {:>10}", "method", "time", "vs copy");
    for (method, time) in [
        ("copy into a new buffer, then read (baseline)", copy),
        ("open by region id (new mapping), read in place", open),
        ("open_region (mapping cached), read in place", cached),
    ] {
        println!(
            "{method:<52} {:>12} {:>9.2}x",
            show(time),
            ratio(copy, time)
        );
    }
    Ok(())
}

fn mean(passes: u32, mut op: impl FnMut() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    for _ in 0..passes {
        op()?;
    }
    Ok(start.elapsed() / passes)
}

fn sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|chunk| u64::from_ne_bytes(chunk.try_into().unwrap_or_default()))
        .fold(0u64, u64::wrapping_add)
}

/// Every byte is 1, so eight bytes sum to 0x0101010101010101: a read that saw other bytes fails.
fn check(total: u64) -> Result<()> {
    let expected = 0x0101_0101_0101_0101u64.wrapping_mul((READ_SIZE / 8) as u64);
    if total != expected {
        return Err(format!("read {total:#x}, expected {expected:#x}").into());
    }
    Ok(())
}

fn ratio(baseline: Duration, time: Duration) -> f64 {
    baseline.as_secs_f64() / time.as_secs_f64().max(1e-12)
}

fn show(time: Duration) -> String {
    let micros = time.as_secs_f64() * 1e6;
    if micros >= 1000.0 {
        format!("{:.2} ms", micros / 1000.0)
    } else {
        format!("{micros:.1} µs")
    }
}
