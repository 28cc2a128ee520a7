//! Runs every quickstart program as a user would: the registry pair, the producer and consumer
//! sharing a tensor by region id, and the client against a real `remotemedia-model-worker`
//! process started here (`REMOTEMEDIA_WORKER_BIN`, or the one the workspace built into the
//! same target directory).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn run(program: &str, args: &[&str]) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(program).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    assert!(
        status.success(),
        "{program} failed ({status}): {stdout}{}",
        String::from_utf8_lossy(&stderr)
    );
    stdout
}

#[test]
fn two_registry_users_share_one_model_loaded_once() {
    let stdout = run(env!("CARGO_BIN_EXE_quickstart-registry"), &[]);
    assert!(
        stdout.contains("ok: one load, one instance shared by two handles"),
        "{stdout}"
    );
}

#[test]
fn the_consumer_reads_the_producers_tensor_by_region_id() {
    let mut producer = Command::new(env!("CARGO_BIN_EXE_quickstart-producer"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(producer.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let (region, checksum) = line
        .trim_end()
        .strip_prefix("region=")
        .and_then(|rest| rest.split_once(" checksum="))
        .unwrap_or_else(|| panic!("unexpected producer output {line:?}"));
    let stdout = run(env!("CARGO_BIN_EXE_quickstart-consumer"), &[region]);
    assert!(
        stdout.contains(&format!("read 1048576 bytes checksum={checksum}\n")),
        "{stdout}"
    );
    assert!(
        stdout.contains("refused: failed to build tensor"),
        "{stdout}"
    );
    producer.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(producer.wait().unwrap().success());
}

#[test]
fn the_client_calls_a_worker_inline_and_through_shared_memory_over_tcp_and_a_unix_socket() {
    let worker = Worker::start();
    for endpoint in [
        format!("grpc://127.0.0.1:{}", worker.port),
        format!("unix://{}", worker.dir.display()),
    ] {
        let stdout = run(env!("CARGO_BIN_EXE_quickstart-client"), &[&endpoint]);
        assert!(stdout.contains("inline: 512 tokens back"), "{stdout}");
        assert!(
            stdout.contains("shared memory: 1048576 elements back in region remotemedia-"),
            "{stdout}"
        );
    }
}

/// A worker serving `builtin://identity` on free ports and on `<dir>/infer.sock`.
struct Worker {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Worker {
    fn start() -> Worker {
        let listeners = [(); 2].map(|()| TcpListener::bind("127.0.0.1:0").unwrap());
        let [port, admin_port] = listeners.map(|l| l.local_addr().unwrap().port());
        let dir = std::env::temp_dir().join(format!("rm-quickstart-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(worker_binary())
            .args([
                "--model-id",
                "identity",
                "--model-path",
                "builtin://identity",
            ])
            .args(["--device", "cpu", "--port", &port.to_string()])
            .args(["--admin-port", &admin_port.to_string()])
            .arg("--uds")
            .arg(dir.join("infer.sock"))
            .arg("--termination-log")
            .arg(dir.join("termination-log"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .unwrap();
        let worker = Worker { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !health_ok(port) {
            assert!(
                Instant::now() < deadline,
                "the worker did not become ready: {}",
                std::fs::read_to_string(worker.dir.join("stderr")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        worker
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `curl http://localhost:<port>/health` answers 200.
fn health_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let request = "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut response = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.starts_with("HTTP/1.1 200")
}

fn worker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REMOTEMEDIA_WORKER_BIN") {
        return path.into();
    }
    // Tests run from <target>/debug/deps; the workspace's binaries sit in <target>/debug.
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("remotemedia-model-worker");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p remotemedia-model-worker` in the repository (or set REMOTEMEDIA_WORKER_BIN)",
        path.display()
    );
    path
}
