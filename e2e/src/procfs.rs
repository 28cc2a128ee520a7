//! What a process did, read from outside it (`/proc/<pid>/…`): zero-copy claims are proven here,
//! never by a counter the process reports about itself.

/// `rchar + wchar` of `pid` (`/proc/<pid>/io`): bytes through its system calls. Socket bytes
/// show on the sending side only: `recv(2)` is not counted.
pub fn io_bytes(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/<pid>/io");
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(": ")?;
            matches!(key, "rchar" | "wchar").then(|| value.trim().parse::<u64>().ok())?
        })
        .sum()
}

/// The mappings of brokered regions (the sidecar's memfds) in `pid` (`/proc/<pid>/maps`).
pub fn mapped_regions(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .expect("/proc/<pid>/maps")
        .lines()
        .filter(|line| line.contains("/memfd:remotemedia-region"))
        .count()
}
