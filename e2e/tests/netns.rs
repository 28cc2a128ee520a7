//! The pod-network fixture (`remotemedia_e2e::netns`) on this machine: a worker process in a
//! network namespace serves on a pod IP the host reaches through the namespace's veth pair and
//! routed CIDR; dropping the network removes the namespace, its route and the process; set-up
//! removes what a crashed earlier run of the same cluster left, and nothing of another's.
//! Needs root and iproute2, like the flow it serves; no cluster.

use std::{net::Ipv4Addr, path::Path, process::Command, time::Duration};

use remotemedia_e2e::{
    Error, Probe,
    netns::{PodNetwork, cluster_key},
    operator::{Component, binary},
    wait_until,
};

/// The routes the host has for `cidr`, as `ip -o route` prints them.
fn host_routes(cidr: &str) -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "route", "show", cidr])
        .output()
        .expect("ip runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// The process's state letter from `/proc/<pid>/stat`, `None` once it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// The listening sockets of a `/proc/.../net/tcp` table (that of the reader's network namespace).
fn listening(table: &str) -> Vec<(Ipv4Addr, u16)> {
    let text = std::fs::read_to_string(table).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // State 0A is LISTEN; addresses are hex, the IP in host (little-endian) order.
            (fields.get(3) == Some(&"0A")).then_some(())?;
            let (ip, port) = fields.get(1)?.split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            Some((
                Ipv4Addr::from(ip.to_le_bytes()),
                u16::from_str_radix(port, 16).ok()?,
            ))
        })
        .collect()
}

fn first_pod_ip(network: &PodNetwork) -> Ipv4Addr {
    let base: Ipv4Addr = network
        .cidr()
        .trim_end_matches("/24")
        .parse()
        .expect("a /24 CIDR");
    let [a, b, c, _] = base.octets();
    Ipv4Addr::new(a, b, c, 1)
}

#[tokio::test]
async fn a_worker_in_a_pod_network_serves_on_its_pod_ip_until_the_network_is_dropped()
-> Result<(), Error> {
    let key = cluster_key();
    let network = PodNetwork::create(&key, 0)?;
    let other = PodNetwork::create(&key, 1)?;
    assert_ne!(network.cidr(), other.cidr(), "two networks share a CIDR");
    let cidr = network.cidr();
    let routes = host_routes(&cidr);
    assert!(routes.contains("src 169.254.251.1"), "{cidr}: {routes}");

    let ip = first_pod_ip(&network);
    assert!(
        other.add_address(ip).is_err(),
        "{ip} was added outside its network's CIDR"
    );
    network.add_address(ip)?;
    network.add_address(ip)?;
    let mut command = network.command(binary("remotemedia-model-worker")?);
    command.args([
        "--model-path",
        "builtin://identity",
        "--listen-address",
        &ip.to_string(),
        "--port",
        "50051",
        "--admin-port",
        "9090",
        "--termination-log",
        "/dev/null",
    ]);
    let worker = Component::spawn_command(command, "worker", "netns-test", (ip, 9090).into())?;
    let worker = &worker;
    wait_until(
        &format!("the worker at {ip} to answer"),
        Duration::from_secs(30),
        || async move {
            Ok(match worker.get("/readyz") {
                Some((200, _)) => Probe::Done(()),
                seen => Probe::Waiting(format!("{seen:?}")),
            })
        },
    )
    .await?;
    // Bound to the pod IP, in the namespace's own socket table and not in the host's.
    let inside = listening(&format!("/proc/{}/net/tcp", worker.pid()));
    assert!(
        inside.contains(&(ip, 9090)) && inside.contains(&(ip, 50051)),
        "{inside:?}"
    );
    assert!(!listening("/proc/self/net/tcp").contains(&(ip, 9090)));

    let name = network.namespace().to_owned();
    let pid = worker.pid();
    drop(network);
    assert!(!netns_exists(&name), "{name} is left");
    assert_eq!(host_routes(&cidr), "", "the route to {cidr} is left");
    // Killed with the namespace; the zombie stays until the handle reaps it.
    wait_until(
        "the worker killed",
        Duration::from_secs(10),
        || async move {
            Ok(match process_state(pid) {
                None | Some('Z') => Probe::Done(()),
                state => Probe::Waiting(format!("state {state:?}")),
            })
        },
    )
    .await?;
    Ok(())
}

#[test]
fn set_up_deletes_what_a_crashed_run_of_the_same_cluster_left_and_nothing_else() {
    // A key of this test's own: the other test's set-up must not clean up first.
    let key = format!("{}c", cluster_key());
    // A pid no process has now: one that just exited.
    let mut gone = Command::new("true").spawn().expect("true runs");
    gone.wait().expect("true exits");
    let dead = gone.id();
    let ours = format!("rme2e-{key}-{dead}-0");
    let theirs = format!("rme2e-{key}x-{dead}-0");
    for name in [&ours, &theirs] {
        let added = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip runs");
        assert!(added.success(), "failed to add {name}");
    }
    // Its veth pair, whose host end is named after the crashed process.
    let link = format!("rm{dead:x}n0");
    let added = Command::new("ip")
        .args([
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ours,
        ])
        .status()
        .expect("ip runs");
    assert!(added.success(), "failed to add {link}");
    // The crashed run's worker, still running inside.
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &ours, "sleep", "600"])
        .spawn()
        .expect("sleep runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_state(orphan.id()).is_some_and(|_| {
        !std::fs::read_link(format!("/proc/{}/exe", orphan.id()))
            .is_ok_and(|exe| exe.ends_with("sleep"))
    }) {
        assert!(std::time::Instant::now() < deadline, "sleep never started");
        std::thread::sleep(Duration::from_millis(50));
    }

    let network = PodNetwork::create(&key, 2).expect("a pod network");
    assert!(!netns_exists(&ours), "the crashed run's {ours} is left");
    assert!(
        !Path::new("/sys/class/net").join(&link).exists(),
        "the crashed run's {link} is left"
    );
    let status = orphan.wait().expect("the orphan is reaped");
    assert!(!status.success(), "the orphan exited by itself: {status}");
    assert!(
        netns_exists(&theirs),
        "another cluster's {theirs} was deleted"
    );
    drop(network);
    let deleted = Command::new("ip")
        .args(["netns", "delete", &theirs])
        .status()
        .expect("ip runs");
    assert!(deleted.success());
}
