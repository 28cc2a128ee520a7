//! Pod networks for simulated nodes: a Linux network namespace per node, joined to the host by a
//! veth pair, with the node's pod CIDR routed into it. Processes started with
//! [`PodNetwork::command`] run inside (`ip netns exec`) and serve on pod IPs that
//! [`PodNetwork::add_address`] created there; the host (the sidecar, the tests) reaches them by
//! those IPs, as a node reaches a pod.
//!
//! The API server refuses loopback addresses in EndpointSlices, and kwok hands out pod IPs from
//! each node's `spec.podCIDR`; a CIDR routed here makes those IPs real.
//!
//! Every network is the host's, shared by every checkout on the machine, so nothing is taken by
//! a fixed name or number:
//! - a CIDR `10.251.K.0/24` is claimed by adding its route: the kernel refuses a second route to
//!   the same prefix, so two fixtures never take the same one, and CIDRs the machine already
//!   routes somewhere other than its default route are skipped;
//! - the namespace is `rme2e-<key>-<pid>-<slot>`: `key` names the caller's cluster (its
//!   kubeconfig), `pid` the test process. Set-up deletes this key's namespaces whose process is
//!   gone (a crashed earlier run) with everything still running in them; deleting a namespace
//!   deletes its veth pair and so its route. Other keys' namespaces are never touched.
//!
//! Needs root and iproute2 (`ip netns`). Without them [`PodNetwork::create`] fails naming what
//! is missing: a test of the flow that quietly skipped would prove nothing.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Output},
};

use crate::Error;

/// Prefix of every namespace this module makes.
const PREFIX: &str = "rme2e";
/// The host's end of every veth pair, and the pods' gateway: a link-local address that each
/// namespace routes to over its own link, so no pod CIDR loses an address to the host.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 251, 1);
/// Pod CIDRs are `10.251.K.0/24`.
const CIDR_BASE: [u8; 2] = [10, 251];
/// Where `ip netns add` keeps its names.
const NETNS_DIR: &str = "/run/netns";

/// A node's pod network; deleted, with every process still inside, when dropped.
#[derive(Debug)]
pub struct PodNetwork {
    namespace: String,
    /// The third octet of `10.251.K.0/24`.
    subnet: u8,
}

impl PodNetwork {
    /// Creates the namespace `rme2e-<key>-<this pid>-<slot>` with a pod CIDR of its own routed
    /// into it, first deleting what crashed earlier runs of `key` left. `key` is a short
    /// `[a-z0-9]` name of the caller's cluster; `slot` tells apart the networks of one process.
    pub fn create(key: &str, slot: usize) -> Result<Self, Error> {
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(Error::Process(format!(
                "failed to create a pod network: key '{key}' is not [a-z0-9]+"
            )));
        }
        run_ip(&["-V"]).map_err(|e| {
            Error::Process(format!(
                "{e}: the end-to-end flow runs workers in network namespaces and needs iproute2's `ip` (as root)"
            ))
        })?;
        remove_leftovers(key)?;
        let pid = std::process::id();
        let namespace = format!("{PREFIX}-{key}-{pid}-{slot}");
        let host_link = host_link(pid, slot);
        run_ip(&["netns", "add", &namespace]).map_err(|e| {
            Error::Process(format!(
                "{e}: creating network namespaces needs root (CAP_SYS_ADMIN) and a writable {NETNS_DIR}"
            ))
        })?;
        // From here on, dropping the value deletes the namespace, the veth pair and the route.
        let mut network = Self {
            namespace,
            subnet: 0,
        };
        let ns = network.namespace.clone();
        let gateway = GATEWAY.to_string();
        run_ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        run_ip(&["addr", "add", &format!("{gateway}/32"), "dev", &host_link])?;
        run_ip(&["link", "set", &host_link, "up"])?;
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "set", "eth0", "up"],
            &["route", "add", &gateway, "dev", "eth0", "scope", "link"],
            &["route", "add", "default", "via", &gateway, "dev", "eth0"],
        ] {
            run_ip(&[&["-n", &ns][..], args].concat())?;
        }
        network.subnet = claim_cidr(&host_link)?;
        Ok(network)
    }

    /// The namespace's name (`ip netns exec <name> ...`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The pod CIDR routed into the namespace, for the node's `spec.podCIDR`.
    pub fn cidr(&self) -> String {
        format!("{}/24", self.address(0))
    }

    /// Whether `ip` is one of this network's pod addresses.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let [a, b, c, _] = ip.octets();
        [a, b, c] == [CIDR_BASE[0], CIDR_BASE[1], self.subnet]
    }

    /// Makes `ip` (a pod IP of this network) an address of the namespace, so that processes
    /// inside can bind it and the host can reach it. Adding it twice is no error.
    pub fn add_address(&self, ip: Ipv4Addr) -> Result<(), Error> {
        if !self.contains(ip) || ip.octets()[3] == 0 || ip.octets()[3] == 255 {
            return Err(Error::Process(format!(
                "failed to add pod address {ip}: not a host address of {}",
                self.cidr()
            )));
        }
        let address = format!("{ip}/32");
        let shown = ip_output(&[
            "-n",
            &self.namespace,
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            "eth0",
        ])?;
        if shown.split_whitespace().any(|word| word == address) {
            return Ok(());
        }
        run_ip(&[
            "-n",
            &self.namespace,
            "addr",
            "add",
            &address,
            "dev",
            "eth0",
        ])
    }

    /// `program` to be run inside the namespace (through `ip netns exec`, which execs it: the
    /// child's pid is the program's).
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(program.as_ref());
        command
    }

    fn address(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(CIDR_BASE[0], CIDR_BASE[1], self.subnet, last)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Err(error) = delete(&self.namespace) {
            eprintln!(
                "failed to delete network namespace {}: {error}",
                self.namespace
            );
        }
    }
}

/// A short name of the cluster `KUBECONFIG` names (its file's path), for
/// [`PodNetwork::create`]: this checkout's namespaces are told apart from other checkouts'.
pub fn cluster_key() -> String {
    let config = std::env::var("KUBECONFIG").unwrap_or_default();
    let path = std::fs::canonicalize(&config).map_or(config, |p| p.display().to_string());
    // FNV-1a: stable across runs and toolchains, unlike the standard library's hasher.
    let hash = path.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{:08x}", hash as u32)
}

/// Routes the first free `10.251.K.0/24` to `link`; the route is the claim.
fn claim_cidr(link: &str) -> Result<u8, Error> {
    // Each process starts elsewhere, so concurrent fixtures rarely race for one CIDR.
    let start = (std::process::id() % 256) as u8;
    for step in 0..=255u8 {
        let subnet = start.wrapping_add(step);
        let cidr = format!("{}.{}.{subnet}.0/24", CIDR_BASE[0], CIDR_BASE[1]);
        // A route of the machine's own that covers the CIDR (other than the default route)
        // means its addresses belong to a real network: leave them alone.
        let covering = ip_output(&["-4", "-o", "route", "show", "match", &cidr])?;
        if covering.lines().any(|line| !line.starts_with("default")) {
            continue;
        }
        let added = run_ip(&[
            "route",
            "add",
            &cidr,
            "dev",
            link,
            "src",
            &GATEWAY.to_string(),
        ]);
        match added {
            Ok(()) => return Ok(subnet),
            // Another fixture claimed it between the check and the add.
            Err(Error::Process(message)) if message.contains("File exists") => continue,
            Err(error) => return Err(error),
        }
    }
    Err(Error::Process(format!(
        "failed to claim a pod CIDR: every {}.{}.K.0/24 is routed on this machine",
        CIDR_BASE[0], CIDR_BASE[1]
    )))
}

/// The host end of the veth pair of process `pid`'s network `slot`: at most 15 bytes, and unique
/// while the process lives.
fn host_link(pid: u32, slot: usize) -> String {
    format!("rm{pid:x}n{slot}")
}

/// Deletes `key`'s namespaces whose test process has exited.
fn remove_leftovers(key: &str) -> Result<(), Error> {
    let prefix = format!("{PREFIX}-{key}-");
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Ok(());
    };
    for name in entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Some((pid, _)) = name.strip_prefix(&prefix).and_then(owner) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("deleting network namespace {name}, left by an earlier run (pid {pid})");
            delete(&name)?;
        }
    }
    Ok(())
}

/// The pid and slot at the end of a namespace's name.
fn owner(name: &str) -> Option<(u32, usize)> {
    let mut parts = name.rsplit('-');
    let slot = parts.next()?.parse().ok()?;
    let pid = parts.next()?.parse().ok()?;
    Some((pid, slot))
}

/// Kills whatever still runs in namespace `name`, deletes its veth pair (and so its route) and
/// then the namespace. The kernel frees a namespace, and the pair inside it, only later, once
/// nothing holds it: deleting the host's end first makes the route go now.
fn delete(name: &str) -> Result<(), Error> {
    for pid in ip_output(&["netns", "pids", name])?.split_whitespace() {
        // It may have exited in between.
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    for _ in 0..50 {
        if ip_output(&["netns", "pids", name])?.trim().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if let Some((pid, slot)) = owner(name) {
        let link = host_link(pid, slot);
        if Path::new("/sys/class/net").join(&link).exists() {
            run_ip(&["link", "delete", &link])?;
        }
    }
    run_ip(&["netns", "delete", name])
}

/// Runs `ip args...`; its error output becomes the error.
fn run_ip(args: &[&str]) -> Result<(), Error> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> Result<String, Error> {
    let output: Output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| Error::Process(format!("failed to run `ip {}`: {e}", args.join(" "))))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Process(format!(
            "failed to run `ip {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}
