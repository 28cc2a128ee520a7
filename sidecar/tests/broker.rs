//! The broker with real processes: the sidecar binary, client processes (`broker_peer`, and the
//! quickstart programs of `examples/quickstart`, unchanged, given `REMOTEMEDIA_SIDECAR`), each test in its own
//! socket directory. Leaks are judged from outside: `/proc/*/maps`, the sidecar's descriptor
//! count, its admin port.

#[path = "../../core/tests/support/built.rs"]
mod support;
use support::built;
#[path = "../../core/tests/support/ports.rs"]
mod ports;
use ports::free_port;

use std::io::{BufRead, BufReader, Lines, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use remotemedia_runtime_core::shm::broker::socket::{self, RecvError};
use remotemedia_runtime_core::shm::broker::wire::{self, Request, Response};

const MIB: u64 = 1 << 20;

/// A fresh socket directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let random = remotemedia_runtime_core::shm::broker::RegionKey::random()
            .unwrap()
            .to_hex();
        let path = std::env::temp_dir().join(format!("rm-broker-{name}-{}", &random[..8]));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn env(&self) -> String {
        format!("unix://{}", self.0.display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Sidecar {
    child: Child,
    admin_port: u16,
}

impl Sidecar {
    fn start(dir: &TempDir, args: &[&str]) -> Self {
        Self::start_with(
            Command::new(env!("CARGO_BIN_EXE_remotemedia-sidecar")),
            dir,
            args,
        )
    }

    /// Starts `command` (the sidecar, or a wrapper that execs it) and waits for its socket.
    fn start_with(mut command: Command, dir: &TempDir, args: &[&str]) -> Self {
        let admin_port = free_port();
        let child = command
            .arg("--socket-dir")
            .arg(&dir.0)
            .args(["--admin-address", "127.0.0.1", "--admin-port"])
            .arg(admin_port.to_string())
            .args(args)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn sidecar");
        let mut sidecar = Self { child, admin_port };
        let path = dir.0.join("broker.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while socket::connect(&path).is_err() || sidecar.get("/readyz").is_none() {
            if let Some(status) = sidecar.child.try_wait().unwrap() {
                panic!("sidecar exited early: {status}");
            }
            assert!(Instant::now() < deadline, "sidecar did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        sidecar
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// `GET path` on the admin port: the body, or `None` if it is not answering yet.
    fn get(&self, path: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.admin_port)).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    }

    /// A metric's value from `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").expect("metrics");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client process driven line by line; killed on drop.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    fn spawn(dir: &TempDir) -> Self {
        let mut child = Command::new(built("examples/broker_peer"))
            .env("REMOTEMEDIA_SIDECAR", dir.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn broker_peer");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            stdout,
        }
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        self.stdout.next().expect("peer closed stdout").unwrap()
    }

    /// Asks and expects `ok`, returning the rest.
    fn ok(&mut self, command: &str) -> String {
        let answer = self.ask(command);
        answer
            .strip_prefix("ok")
            .unwrap_or_else(|| panic!("{command}: {answer}"))
            .trim()
            .to_owned()
    }

    /// Allocates and returns (tensor index, region id).
    fn alloc(&mut self, bytes: u64, label: &str) -> (usize, String) {
        let answer = self.ok(&format!("alloc {bytes} {label}"));
        let (index, id) = answer.split_once(' ').unwrap();
        (index.parse().unwrap(), id.to_owned())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `check` holds, up to 10 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Inodes of the brokered regions a process maps (`/memfd:remotemedia-region (deleted)`).
fn mapped_regions(pid: &str) -> Vec<u64> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut inodes: Vec<u64> = maps
        .lines()
        .filter(|line| line.contains("/memfd:remotemedia-region"))
        .filter_map(|line| line.split_whitespace().nth(4)?.parse().ok())
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    inodes
}

/// Every process on the machine that maps one of `inodes`.
fn processes_mapping(inodes: &[u64]) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            mapped_regions(pid)
                .iter()
                .any(|inode| inodes.contains(inode))
        })
        .collect()
}

#[test]
fn the_quickstart_producer_and_consumer_exchange_a_tensor_through_the_broker() {
    let dir = TempDir::new("seed");
    let sidecar = Sidecar::start(&dir, &[]);
    let mut producer = Command::new(built("quickstart-producer"))
        .env("REMOTEMEDIA_SIDECAR", dir.env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(producer.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let (region, checksum) = first
        .strip_prefix("region=")
        .and_then(|rest| rest.split_once(" checksum="))
        .unwrap_or_else(|| panic!("unexpected producer output {first:?}"));
    assert!(
        region.len() == 32 && region.bytes().all(|b| b.is_ascii_hexdigit()),
        "a brokered id, not a /dev/shm name: {region}"
    );
    assert!(
        !mapped_regions(&producer.id().to_string()).is_empty(),
        "the producer maps a broker memfd"
    );

    let consumer = Command::new(built("quickstart-consumer"))
        .arg(region)
        .env("REMOTEMEDIA_SIDECAR", dir.env())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&consumer.stdout);
    assert!(
        consumer.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&consumer.stderr)
    );
    assert!(
        stdout.contains(&format!("read 1048576 bytes checksum={checksum}")),
        "{stdout}"
    );
    assert!(stdout.contains("refused:"), "{stdout}");

    drop(producer.stdin.take());
    assert!(producer.wait().unwrap().success());
    eventually("the sidecar frees the region", || {
        sidecar.metric("remotemedia_sidecar_shm_regions") == 0.0
    });
}

#[test]
fn quotas_and_the_node_cap_answer_resource_exhausted_and_allocate_nothing() {
    let dir = TempDir::new("quota");
    let sidecar = Sidecar::start(
        &dir,
        &[
            "--max-shm-bytes",
            &(12 * MIB).to_string(),
            "--session-quota-bytes",
            &(8 * MIB).to_string(),
            "--label-quota-bytes",
            &(4 * MIB).to_string(),
        ],
    );
    let mut a = Peer::spawn(&dir);
    a.alloc(4 * MIB, "l1");
    let label = a.ask(&format!("alloc {} l1", MIB));
    assert!(
        label.starts_with("err ") && label.contains("RESOURCE_EXHAUSTED"),
        "{label}"
    );
    a.alloc(4 * MIB, "l2");
    let session = a.ask(&format!("alloc {} l3", MIB));
    assert!(session.contains("RESOURCE_EXHAUSTED"), "{session}");

    let mut b = Peer::spawn(&dir);
    b.alloc(4 * MIB, "-");
    let fds = sidecar.open_fds();
    let node = b.ask(&format!("alloc {} -", 4 * MIB));
    assert!(
        node.contains("RESOURCE_EXHAUSTED") && node.contains("node"),
        "{node}"
    );
    assert_eq!(sidecar.open_fds(), fds, "a refusal creates no region");
    assert_eq!(
        sidecar.metric("remotemedia_sidecar_shm_bytes"),
        (12 * MIB) as f64
    );
    assert_eq!(
        a.ok("stats"),
        format!("held_regions=2 held_bytes={0} charged_bytes={0}", 8 * MIB)
    );
}

#[test]
fn a_client_killed_with_sigkill_leaves_nothing_behind() {
    let dir = TempDir::new("kill");
    let sidecar = Sidecar::start(&dir, &[]);
    let mut witness = Peer::spawn(&dir);
    witness.ok("stats");
    let baseline = sidecar.open_fds();

    let mut victim = Peer::spawn(&dir);
    let (_, first) = victim.alloc(MIB, "victim");
    victim.alloc(2 * MIB, "-");
    victim.ok(&format!("open {first} 4096"));
    let inodes = mapped_regions(&victim.pid().to_string());
    assert_eq!(inodes.len(), 2, "two regions mapped (one of them twice)");
    assert!(sidecar.open_fds() > baseline);
    assert!(
        sidecar
            .get("/debug/sessions")
            .unwrap()
            .contains(&format!("broker_peer\t2\t2\t{}", 3 * MIB))
    );

    drop(victim); // SIGKILL, then reaped
    eventually("the sidecar closes the victim's regions", || {
        sidecar.open_fds() == baseline
    });
    assert!(
        processes_mapping(&inodes).is_empty(),
        "still mapped by {:?}",
        processes_mapping(&inodes)
    );
    assert_eq!(sidecar.metric("remotemedia_sidecar_shm_regions"), 0.0);
    assert_eq!(sidecar.metric("remotemedia_sidecar_shm_bytes"), 0.0);
    assert!(
        sidecar
            .get("/debug/sessions")
            .unwrap()
            .contains("broker_peer\t1\t0\t0"),
        "only the witness's empty session is left"
    );
    assert_eq!(
        witness.ok("stats"),
        "held_regions=0 held_bytes=0 charged_bytes=0"
    );
}

#[test]
fn a_forged_id_is_not_found_exactly_like_a_released_one() {
    let dir = TempDir::new("forged");
    let _sidecar = Sidecar::start(&dir, &[]);
    let mut owner = Peer::spawn(&dir);
    let mut other = Peer::spawn(&dir);
    let (index, id) = owner.alloc(4096, "-");
    other.ok(&format!("open {id} 4096"));
    owner.ok(&format!("free {index}"));
    other.ok("free 0");

    let forged = "0123456789abcdef0123456789abcdef";
    let never = other.ask(&format!("open {forged} 4096"));
    let gone = other.ask(&format!("open {id} 4096"));
    assert!(
        never.starts_with("err ") && never.contains("NOT_FOUND"),
        "{never}"
    );
    assert_eq!(never, gone, "the answers must not tell the two apart");
    assert!(
        !never.contains(forged) && !gone.contains(&id),
        "no id in the answer"
    );
}

#[test]
fn after_a_sidecar_restart_a_client_keeps_and_adopts_its_regions() {
    let dir = TempDir::new("restart");
    let cap = ["--max-shm-bytes", &(3 * MIB).to_string()];
    let mut first = Sidecar::start(&dir, &cap);
    let mut client = Peer::spawn(&dir);
    let (index, id) = client.alloc(2 * MIB, "kept");
    client.ok(&format!("write {index} 42"));
    first.kill();

    let second = Sidecar::start(&dir, &cap);
    // The client reconnects and adopts its region by itself, without a call of its own: a
    // reader can open the region by id straight away.
    eventually("the client adopts its region back", || {
        second.metric("remotemedia_sidecar_shm_bytes") == (2 * MIB) as f64
    });
    let mut reader = Peer::spawn(&dir);
    let opened = reader.ok(&format!("open {id} {}", 2 * MIB));
    assert_eq!(reader.ok(&format!("read {opened}")), "42");
    assert_eq!(
        client.ok(&format!("read {index}")),
        "42",
        "the mapping survives"
    );
    assert_eq!(
        client.ok("stats"),
        format!("held_regions=1 held_bytes={0} charged_bytes={0}", 2 * MIB)
    );
    let over = client.ask(&format!("alloc {} -", 2 * MIB));
    assert!(
        over.contains("RESOURCE_EXHAUSTED"),
        "the node cap counts it: {over}"
    );
}

/// A raw connection for sending what no well-behaved client sends.
struct Raw(std::os::fd::OwnedFd);

impl Raw {
    fn connect(dir: &TempDir, hello: bool) -> Self {
        let raw = Self(socket::connect(&dir.0.join("broker.sock")).unwrap());
        if hello {
            let request = Request::<std::os::fd::BorrowedFd<'_>>::Hello {
                label: "raw".into(),
            };
            let reply = socket::round_trip(raw.0.as_fd(), &request.encode(), None).unwrap();
            assert!(matches!(
                wire::decode_response(&reply.bytes, reply.fds),
                Ok(Response::Hello { .. })
            ));
        }
        raw
    }

    /// Sends and expects the sidecar to close the connection instead of answering.
    fn expect_closed(self, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        use std::mem::MaybeUninit;
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        // An oversized packet may be refused by the kernel's own limits; the sidecar must then
        // still be fine, which the caller checks.
        if rustix::net::sendmsg(
            &self.0,
            &[std::io::IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .is_err()
        {
            return;
        }
        match socket::recv(self.0.as_fd()) {
            Err(RecvError::Closed) => {}
            Err(RecvError::Io(error)) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the connection to close, got {other:?}"),
        }
    }
}

#[test]
fn bad_packets_close_only_their_own_connection() {
    let dir = TempDir::new("bad");
    let sidecar = Sidecar::start(&dir, &[]);
    let mut good = Peer::spawn(&dir);
    let (index, _) = good.alloc(4096, "good");
    good.ok(&format!("write {index} 7"));
    let memfd = rustix::fs::memfd_create("stray", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let stats = Request::<std::os::fd::BorrowedFd<'_>>::Stats.encode();
    let allocate = Request::<std::os::fd::BorrowedFd<'_>>::Allocate {
        size: std::num::NonZeroU64::new(4096).unwrap(),
        label: "x".into(),
    }
    .encode();

    Raw::connect(&dir, true).expect_closed(&[0xff; 32], &[]); // malformed
    Raw::connect(&dir, true).expect_closed(&allocate[..allocate.len() - 2], &[]); // truncated
    Raw::connect(&dir, true).expect_closed(&vec![0x0a; wire::MAX_PACKET_BYTES + 64], &[]);
    Raw::connect(&dir, false).expect_closed(&stats, &[]); // before Hello
    Raw::connect(&dir, true).expect_closed(
        &Request::<std::os::fd::BorrowedFd<'_>>::Hello {
            label: "again".into(),
        }
        .encode(),
        &[],
    );
    Raw::connect(&dir, true).expect_closed(&stats, &[memfd.as_fd()]); // stray descriptor
    let fd = memfd.as_fd();
    // Extra descriptors are refused whether they still fit the control buffer's alignment slack
    // (by the decoder) or not (MSG_CTRUNC).
    Raw::connect(&dir, true).expect_closed(&stats, &[fd, fd]);
    Raw::connect(&dir, true).expect_closed(&stats, &[fd; 8]);
    Raw::connect(&dir, true).expect_closed(&[], &[]); // empty

    assert_eq!(good.ok(&format!("read {index}")), "7");
    assert_eq!(
        good.ok("stats"),
        "held_regions=1 held_bytes=4096 charged_bytes=4096"
    );
    let closed = |reason: &str| {
        sidecar.metric(&format!(
            "remotemedia_sidecar_broker_protocol_errors_total{{reason=\"{reason}\"}}"
        ))
    };
    assert_eq!(
        closed("malformed"),
        4.0,
        "garbage, truncated, stray and extra descriptors"
    );
    assert_eq!(closed("oversized"), 1.0);
    assert_eq!(closed("out_of_order"), 2.0);
    assert_eq!(closed("control_truncated"), 1.0);
    eventually("raw sessions are gone", || {
        sidecar.metric("remotemedia_sidecar_broker_sessions") == 1.0
    });
}

#[test]
fn a_budget_over_the_memory_limit_refuses_to_start_before_binding() {
    let dir = TempDir::new("budget");
    let output = Command::new(env!("CARGO_BIN_EXE_remotemedia-sidecar"))
        .arg("--socket-dir")
        .arg(&dir.0)
        .args([
            "--max-shm-bytes",
            "1073741824",
            "--memory-limit-bytes",
            "1073741824",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("does not fit under the container memory limit"),
        "{stderr}"
    );
    assert!(!dir.0.join("broker.sock").exists());
}

/// A child memory cgroup with `limit` bytes, if this machine lets us make one (v2 `memory.max`,
/// else v1 `memory.limit_in_bytes`); removed on drop.
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    fn create(limit: u64) -> Option<Self> {
        let name = format!("rm-broker-test-{}", std::process::id());
        for (root, file) in [
            ("/sys/fs/cgroup", "memory.max"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes"),
        ] {
            let dir = Path::new(root).join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            // On a cgroup v1 host `/sys/fs/cgroup` is a tmpfs where mkdir makes a plain folder.
            if !dir.join("cgroup.procs").exists() {
                let _ = std::fs::remove_dir(&dir);
                continue;
            }
            let cgroup = Self { dir };
            if std::fs::write(cgroup.dir.join(file), limit.to_string()).is_ok() {
                return Some(cgroup);
            }
        }
        None
    }

    fn usage(&self) -> u64 {
        ["memory.current", "memory.usage_in_bytes"]
            .iter()
            .find_map(|file| std::fs::read_to_string(self.dir.join(file)).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn inside_a_memory_cgroup_the_node_cap_refuses_before_the_oom_killer_acts() {
    let Some(cgroup) = Cgroup::create(96 * MIB) else {
        eprintln!("SKIPPED: this machine does not let us create a memory cgroup");
        return;
    };
    let dir = TempDir::new("cgroup");
    // The wrapper moves itself into the cgroup, then becomes the sidecar: the limit applies from
    // the first instruction, and the sidecar finds it itself (no --memory-limit-bytes).
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$1" "${@:2}""#)
        .arg(&cgroup.dir)
        .arg(env!("CARGO_BIN_EXE_remotemedia-sidecar"));
    let refused = Command::new("bash")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$1" --socket-dir "$2" --max-shm-bytes 100000000"#)
        .arg(&cgroup.dir)
        .arg(env!("CARGO_BIN_EXE_remotemedia-sidecar"))
        .arg(&dir.0)
        .output()
        .unwrap();
    assert_eq!(
        refused.status.code(),
        Some(2),
        "the cgroup limit is found and enforced"
    );

    let sidecar = Sidecar::start_with(
        command,
        &dir,
        &[
            "--max-shm-bytes",
            &(48 * MIB).to_string(),
            "--memory-headroom-bytes",
            &(32 * MIB).to_string(),
        ],
    );
    let before = cgroup.usage();
    let mut client = Peer::spawn(&dir);
    for _ in 0..3 {
        client.alloc(16 * MIB, "-");
    }
    assert!(
        cgroup.usage() >= 48 * MIB,
        "pre-faulted pages are charged to the sidecar's cgroup ({} -> {})",
        before,
        cgroup.usage()
    );
    let over = client.ask(&format!("alloc {} -", 16 * MIB));
    assert!(over.contains("RESOURCE_EXHAUSTED"), "{over}");
    assert_eq!(
        client.ok("stats"),
        format!("held_regions=3 held_bytes={0} charged_bytes={0}", 48 * MIB)
    );
    assert!(
        sidecar.get("/healthz").is_some(),
        "the sidecar was not OOM-killed"
    );
    drop(client);
    drop(sidecar);
}
