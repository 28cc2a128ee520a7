//! The memory budget: `--max-shm-bytes` must fit under the container's memory limit minus
//! headroom, because brokered pages are charged to the sidecar's cgroup and going over the
//! limit would be an OOM kill instead of a RESOURCE_EXHAUSTED answer.

use std::path::{Path, PathBuf};

/// Memory the sidecar keeps for itself on top of the regions.
pub const DEFAULT_HEADROOM_BYTES: u64 = 256 << 20;

/// cgroup v1 reports "no limit" as a huge page-aligned number rather than `max`.
const V1_UNLIMITED: u64 = 1 << 62;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "failed to start: --max-shm-bytes {max_shm_bytes} plus headroom {headroom} does not fit under the container memory limit of {limit} bytes"
)]
pub struct BudgetError {
    pub max_shm_bytes: u64,
    pub headroom: u64,
    pub limit: u64,
}

/// Checks the budget against `limit` (none: unlimited).
pub fn check(max_shm_bytes: u64, headroom: u64, limit: Option<u64>) -> Result<(), BudgetError> {
    match limit {
        Some(limit)
            if max_shm_bytes
                .checked_add(headroom)
                .is_none_or(|need| need > limit) =>
        {
            Err(BudgetError {
                max_shm_bytes,
                headroom,
                limit,
            })
        }
        _ => Ok(()),
    }
}

/// This process's memory cgroup limit, from `/proc/self/cgroup` and `/proc/self/mountinfo`
/// (cgroup v2 `memory.max`, else v1 `memory.limit_in_bytes`); `None` when unlimited or unknown.
pub fn cgroup_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let file = limit_file(&cgroups, &mounts)?;
    parse_limit(&std::fs::read_to_string(file).ok()?)
}

/// The file that holds the memory limit of the cgroup `/proc/self/cgroup` names.
fn limit_file(cgroups: &str, mountinfo: &str) -> Option<PathBuf> {
    // v2: "0::/path"; v1: "4:memory:/path" (controllers may be comma-joined).
    let (version, path) = cgroups
        .lines()
        .find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            if controllers.split(',').any(|c| c == "memory") {
                Some((1, path))
            } else {
                None
            }
        })
        .or_else(|| {
            cgroups
                .lines()
                .find_map(|line| line.strip_prefix("0::").map(|path| (2, path)))
        })?;
    for line in mountinfo.lines() {
        // "id parent major:minor root mount-point options ... - fstype source super-options"
        let (left, right) = line.split_once(" - ")?;
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mount_point), Some(fstype)) =
            (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let matches = match version {
            2 => *fstype == "cgroup2",
            _ => {
                *fstype == "cgroup"
                    && right
                        .get(2)
                        .is_some_and(|o| o.split(',').any(|o| o == "memory"))
            }
        };
        if !matches {
            continue;
        }
        let relative = path
            .strip_prefix(root)
            .unwrap_or(path)
            .trim_start_matches('/');
        let file = if version == 2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        return Some(Path::new(mount_point).join(relative).join(file));
    }
    None
}

fn parse_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse::<u64>()
        .ok()
        .filter(|&limit| limit < V1_UNLIMITED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_must_fit_under_the_limit_minus_headroom() {
        assert!(check(1 << 30, 256 << 20, None).is_ok());
        assert!(check(768 << 20, 256 << 20, Some(1 << 30)).is_ok());
        assert_eq!(
            check(768 << 20, 256 << 20, Some((1 << 30) - 1)),
            Err(BudgetError {
                max_shm_bytes: 768 << 20,
                headroom: 256 << 20,
                limit: (1 << 30) - 1
            })
        );
        assert!(check(u64::MAX, 1, Some(u64::MAX)).is_err(), "no overflow");
    }

    #[test]
    fn finds_the_v2_memory_max_of_our_cgroup() {
        let cgroups = "0::/kubepods/pod1/sidecar\n";
        let mounts = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            limit_file(cgroups, mounts).unwrap(),
            Path::new("/sys/fs/cgroup/kubepods/pod1/sidecar/memory.max")
        );
    }

    #[test]
    fn finds_the_v1_memory_limit_relative_to_the_mount_root() {
        let cgroups = "5:cpu,cpuacct:/x\n4:memory:/pod/abc/child\n0::/\n";
        let mounts = "\
32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
35 31 0:32 /pod /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            limit_file(cgroups, mounts).unwrap(),
            Path::new("/sys/fs/cgroup/memory/abc/child/memory.limit_in_bytes")
        );
    }

    #[test]
    fn unlimited_and_garbage_read_as_no_limit() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("nonsense"), None);
        assert_eq!(parse_limit("67108864\n"), Some(64 << 20));
    }
}
