//! Broker benchmarks: what a brokered region costs against the named (POSIX) backend, and a
//! broker call against a bare seqpacket round trip, all measured in this run. The broker is
//! served in-process on its own runtime, as the sidecar serves it. `--quick` runs one pass per
//! row (CI runs it so the benchmark cannot rot).
//!
//! `make bench` (or `cargo bench -p remotemedia-sidecar --bench broker [-- --quick]`).

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use remotemedia_runtime_core::shm::broker::{BrokerClient, socket};
use remotemedia_runtime_core::shm::{Access, Region};
use remotemedia_sidecar::broker::{self, Books, Limits};
use remotemedia_sidecar::metrics::Metrics;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; the only flag of ours is `--quick`.
    let quick = std::env::args().any(|arg| arg == "--quick");
    let passes = if quick { 1 } else { 200 };
    let dir = std::env::temp_dir().join(format!("rm-broker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = start_broker(&dir).and_then(|client| {
        println!("broker benchmarks ({passes} pass(es) per row; mean per operation)\n");
        allocation(&client, passes)?;
        println!();
        opening(&client, passes)?;
        println!();
        round_trip(&client, passes * 10)
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Serves a broker with generous limits on `<dir>/broker.sock` from a background runtime.
fn start_broker(dir: &std::path::Path) -> Result<BrokerClient> {
    let listener = socket::listen(&dir.join("broker.sock"), 16)?;
    let books = Arc::new(Books::new(Limits {
        max_shm_bytes: 4 << 30,
        session_quota_bytes: 4 << 30,
        label_quota_bytes: 4 << 30,
        max_regions_per_session: 1024,
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(broker::serve(listener, books, Arc::new(Metrics::new())))
    });
    Ok(BrokerClient::connect(dir, "bench")?)
}

/// A fresh region, mapped, then freed: POSIX shm by name (create, size, lock, map, unlink)
/// against the broker (Allocate: create, size, pre-fault, seal, pass; verify seals, map;
/// Release). Brokered pages exist once allocated, so the baseline is "named, touched", which
/// also writes every page.
fn allocation(client: &BrokerClient, passes: u32) -> Result<()> {
    println!("allocate + map + free, per cycle");
    println!(
        "{:<8} {:>14} {:>16} {:>14} {:>16}",
        "size", "named", "named, touched", "brokered", "vs touched"
    );
    for (label, size) in [
        ("64 KiB", 64 << 10),
        ("1 MiB", 1 << 20),
        ("64 MiB", 64 << 20),
    ] {
        let len = NonZeroUsize::new(size).ok_or("empty size")?;
        let named = mean(passes, || {
            drop(black_box(Region::create_named(len)?));
            Ok(())
        })?;
        let touched = mean(passes, || {
            let mut region = Region::create_named(len)?;
            region
                .as_mut_slice()
                .iter_mut()
                .step_by(4096)
                .for_each(|b| *b = 1);
            drop(black_box(region));
            Ok(())
        })?;
        let brokered = mean(passes, || {
            let handle = client.allocate(size as u64, "")?;
            drop(black_box(Region::from_handle(handle, Access::Shared)?));
            Ok(())
        })?;
        println!(
            "{label:<8} {:>14} {:>16} {:>14} {:>15.2}x",
            show(named),
            show(touched),
            show(brokered),
            ratio(brokered, touched)
        );
    }
    Ok(())
}

/// Opening a region that already exists (another party created it) and mapping it, then
/// letting it go: by name against by id through the broker (Open, verify seals, map, Release).
fn opening(client: &BrokerClient, passes: u32) -> Result<()> {
    println!("open + map an existing region + close, per open");
    println!(
        "{:<8} {:>16} {:>16} {:>16}",
        "size", "named (base)", "brokered", "brokered/named"
    );
    for (label, size) in [("64 KiB", 64 << 10), ("64 MiB", 64 << 20)] {
        let len = NonZeroUsize::new(size).ok_or("empty size")?;
        let owner = Region::create_named(len)?;
        let named = mean(passes, || {
            drop(black_box(Region::open_named(owner.id(), Access::Shared)?));
            Ok(())
        })?;
        let held = client.allocate(size as u64, "")?;
        let brokered = mean(passes, || {
            let handle = client.open(held.key())?;
            drop(black_box(Region::from_handle(handle, Access::Shared)?));
            Ok(())
        })?;
        println!(
            "{label:<8} {:>16} {:>16} {:>15.2}x",
            show(named),
            show(brokered),
            ratio(brokered, named)
        );
    }
    Ok(())
}

/// A Stats call (encode, send, decode, look up the session, reply) against the floor: one
/// packet out and back on a seqpacket socket pair with a thread echoing it.
fn round_trip(client: &BrokerClient, passes: u32) -> Result<()> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let (near, far) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    std::thread::spawn(move || {
        while let Ok(packet) = socket::recv(far.as_fd()) {
            if socket::send(far.as_fd(), &packet.bytes, None).is_err() {
                break;
            }
        }
    });
    let ping = [0u8; 16];
    let echo = mean(passes, || {
        socket::round_trip(near.as_fd(), &ping, None)?;
        Ok(())
    })?;
    let stats = mean(passes, || {
        black_box(client.stats()?);
        Ok(())
    })?;
    println!("round trip, per call");
    println!("{:<44} {:>12} {:>10}", "call", "time", "vs echo");
    for (call, time) in [
        ("seqpacket echo, same host (baseline)", echo),
        ("broker Stats", stats),
    ] {
        println!("{call:<44} {:>12} {:>9.2}x", show(time), ratio(time, echo));
    }
    Ok(())
}

/// Mean time of `op` over `passes` calls, after one untimed call (first-use costs such as a
/// thread starting or a size class's first region are not what a row measures).
fn mean(passes: u32, mut op: impl FnMut() -> Result<()>) -> Result<Duration> {
    op()?;
    let start = Instant::now();
    for _ in 0..passes {
        op()?;
    }
    Ok(start.elapsed() / passes)
}

fn ratio(time: Duration, baseline: Duration) -> f64 {
    time.as_secs_f64() / baseline.as_secs_f64().max(1e-12)
}

fn show(time: Duration) -> String {
    let micros = time.as_secs_f64() * 1e6;
    if micros >= 1000.0 {
        format!("{:.2} ms", micros / 1000.0)
    } else {
        format!("{micros:.1} µs")
    }
}
