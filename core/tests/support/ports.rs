//! Ports for the servers that tests start, chosen below the kernel's ephemeral port range. One
//! copy, included by `#[path]` from the tests of several crates (and the e2e helpers).
//!
//! Asking the kernel for port 0 and handing the number to a child process races with every
//! outgoing connection on the machine: the kernel takes their source ports from the ephemeral
//! range, and in CI one took the port a worker was about to bind ("Address already in use").
//! Below that range only servers bind. Each test process walks the stretch from its own
//! pid-derived start, so parallel test threads and processes do not hand out the same number,
//! and skips ports that something is bound to right now.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out: above the well-known and commonly configured service ports.
const FIRST: u16 = 10_000;

/// A TCP port that nothing is bound to now, distinct from every other one this process got.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(ephemeral_start() - FIRST);
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + ((start + step) % span) as u16;
        // The wildcard address conflicts with a listener on any local address.
        if TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port between {FIRST} and the ephemeral range");
}

/// The first port of the kernel's ephemeral range (Linux's default when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
        .max(FIRST + 1_000)
}
