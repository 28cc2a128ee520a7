//! Two real processes share tensors by region id. The other process is the crate's example
//! `shm_peer` or one of the quickstart programs (`examples/quickstart`: `quickstart-producer`,
//! `quickstart-consumer`, built into the same target directory); `scripts/test.sh` builds both
//! before this tier runs.

#[path = "support/built.rs"]
mod support;
use support::built;

use std::io::{BufRead, BufReader, Lines, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use remotemedia_runtime_core::shm::{ShmError, cleanup_dead_regions};
use remotemedia_runtime_core::tensor::{
    DataType, SharedMemoryAllocator, TensorBuffer, TensorError,
};

fn region_exists(id: &str) -> bool {
    Path::new("/dev/shm").join(id).exists()
}

/// A child process driven line by line over its stdin and stdout; killed if a test fails.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    fn spawn(program: &str, args: &[&str]) -> Self {
        let mut child = Command::new(built(program))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn example");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn line(&mut self) -> String {
        self.stdout
            .next()
            .expect("child closed stdout")
            .expect("read child stdout")
    }

    fn ask(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").expect("write child stdin");
        stdin.flush().expect("flush child stdin");
        self.line()
    }

    /// Closes stdin (the children exit on EOF) and waits for a clean exit.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait child");
        assert!(status.success(), "child exited with {status}");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One `Key: value kB` field of /proc/<pid>/status, in bytes.
fn status_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find(|line| line.starts_with(key))
        .unwrap_or_else(|| panic!("{key} missing from /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

/// Bytes the process read through system calls (`rchar` of /proc/<pid>/io).
fn bytes_read(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read io");
    io.lines()
        .find_map(|line| line.strip_prefix("rchar: "))
        .and_then(|n| n.parse().ok())
        .expect("rchar")
}

#[test]
fn quickstart_consumer_sees_the_producers_mebibyte_and_refuses_an_out_of_range_slice() {
    let mut producer = Peer::spawn("quickstart-producer", &[]);
    let announced = producer.line();
    let (region, checksum) = announced
        .strip_prefix("region=")
        .and_then(|rest| rest.split_once(" checksum="))
        .unwrap_or_else(|| panic!("unexpected producer output {announced:?}"));
    assert!(region_exists(region));

    let output = Command::new(built("quickstart-consumer"))
        .arg(region)
        .output()
        .expect("run consumer");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "consumer failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("read 1048576 bytes checksum={checksum}\n")),
        "consumer saw other bytes: {stdout} (producer checksum {checksum})"
    );
    assert!(
        stdout.contains("refused: failed to build tensor: offset 4096 + size 1048576 is beyond the end of the 1048576-byte region"),
        "{stdout}"
    );

    let region = region.to_owned();
    producer.finish();
    assert!(
        !region_exists(&region),
        "the producer's exit frees its region"
    );
}

#[test]
fn a_write_in_either_process_is_seen_by_the_other() {
    let mut peer = Peer::spawn("examples/shm_peer", &["create", "65536"]);
    let announced = peer.line();
    let region = announced
        .strip_prefix("region ")
        .expect("region line")
        .to_owned();
    let mut local =
        TensorBuffer::from_shared_memory(&region, 0, 65536, vec![65536], DataType::U8).unwrap();

    assert_eq!(peer.ask("fill 7"), "filled");
    assert!(local.as_bytes().iter().all(|&b| b == 7));

    local.as_mut_slice()[0] = 1;
    local.as_mut_slice()[65535] = 2;
    assert_eq!(peer.ask("read"), "bytes 1 2");
    peer.finish();
}

#[test]
fn a_producer_killed_with_sigkill_leaves_no_region_after_cleanup() {
    let mut peer = Peer::spawn("examples/shm_peer", &["create", "1048576"]);
    let announced = peer.line();
    let region = announced
        .strip_prefix("region ")
        .expect("region line")
        .to_owned();
    assert_eq!(peer.ask("fill 3"), "filled");

    // Child::kill sends SIGKILL: no destructor runs, the name stays in /dev/shm.
    peer.child.kill().expect("kill");
    peer.child.wait().expect("reap");
    assert!(
        region_exists(&region),
        "a killed owner cannot unlink its region"
    );

    // Another test's allocator may run the same cleanup first; either way the region must go.
    cleanup_dead_regions().expect("cleanup");
    assert!(!region_exists(&region));
    assert!(matches!(
        TensorBuffer::from_shared_memory(&region, 0, 16, vec![16], DataType::U8),
        Err(TensorError::Shm(ShmError::NotFound { .. }))
    ));
}

#[test]
fn a_consumer_reads_64_mib_in_place_without_copying_it() {
    const SIZE: usize = 64 << 20;
    let allocator = SharedMemoryAllocator::new(Default::default());
    let mut tensor = allocator.allocate_tensor(SIZE, Some("bench")).unwrap();
    tensor.as_mut_slice().fill(1);
    let region = tensor.storage().region_id().unwrap();

    let mut peer = Peer::spawn("examples/shm_peer", &["open", &region, &SIZE.to_string()]);
    assert_eq!(peer.line(), "opened");
    let pid = peer.pid();
    let (anon, shmem, peak, read) = (
        status_bytes(pid, "RssAnon:"),
        status_bytes(pid, "RssShmem:"),
        status_bytes(pid, "VmHWM:"),
        bytes_read(pid),
    );

    assert_eq!(peer.ask("sum"), format!("sum {SIZE}"));

    let anon_growth = status_bytes(pid, "RssAnon:").saturating_sub(anon);
    let shmem_growth = status_bytes(pid, "RssShmem:").saturating_sub(shmem);
    let peak_growth = status_bytes(pid, "VmHWM:").saturating_sub(peak);
    let read_growth = bytes_read(pid) - read;
    // Read in place: the pages it touched are the shared ones, not private copies (none kept,
    // and none made even for a moment: the peak grew by the shared pages only), and no system
    // call carried the bytes.
    assert!(
        shmem_growth >= (SIZE as u64) * 9 / 10,
        "RssShmem grew by {shmem_growth}"
    );
    assert!(anon_growth < 4 << 20, "RssAnon grew by {anon_growth}");
    assert!(
        peak_growth < (SIZE as u64) + (8 << 20),
        "peak RSS grew by {peak_growth}"
    );
    assert!(
        read_growth < 64 << 10,
        "read {read_growth} bytes through system calls"
    );
    peer.finish();
}
