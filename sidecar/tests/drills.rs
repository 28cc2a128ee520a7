//! Failure drills with real processes: a client, a worker and the sidecar each killed with
//! SIGKILL at the worst moment, and a long run checking that the sidecar and the worker do not
//! grow (RSS read from `/proc/<pid>/status`, descriptors counted in `/proc/<pid>/fd`).

mod processes;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use processes::*;
use remotemedia_proto::inference::ServerLiveRequest;
use remotemedia_runtime_core::shm::broker::BrokerClient;

/// The broker's `/debug/sessions` table from the admin port.
async fn sessions(sidecar: &Sidecar) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", sidecar.admin_port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /debug/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `RssAnon + RssShmem` of `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            matches!(key, "RssAnon" | "RssShmem").then(|| {
                let kib: u64 = value.trim().trim_end_matches(" kB").parse().unwrap();
                kib * 1024
            })
        })
        .sum()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_killed_mid_request_loses_its_session_and_regions_and_the_worker_serves_on() {
    let dir = TempDir::new("client-kill");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let mut worker = Worker::start(
        &dir,
        "slow",
        "builtin://checksum?infer_delay_ms=1000",
        Some(&dir.0),
    )
    .await;
    sidecar.discover(&[("slow", &worker, NODE)]);
    let unmapped = worker.memfd_mappings();
    let len = 4 * MIB;
    let mut client = Process(
        Command::new(built("examples/drill_client"))
            .arg(&dir.0)
            .arg("slow")
            .arg(len.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(client.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("sent "), "client said {line:?}");
    eventually("the client's region is at the broker", async || {
        sessions(&sidecar)
            .await
            .contains(&format!("drill\t1\t1\t{len}"))
    })
    .await;
    // 300 ms on, the request is at the worker, which answers only after a second.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(client.alive(), "the client finished before the kill");
    client.kill(); // SIGKILL, then reaped

    eventually("the client's session and regions are gone", async || {
        !sessions(&sidecar).await.contains("drill\t")
    })
    .await;
    assert!(worker.process.alive(), "the worker died with the client");
    // The worker's grant cache lets the dead client's region go too (its orphan sweep), and
    // with it the last hold: the node has no region left.
    eventually("the worker unmaps the dead client's region", async || {
        worker.memfd_mappings() == unmapped
            && sidecar.metric("remotemedia_sidecar_shm_regions").await == 0.0
    })
    .await;
    let broker = BrokerClient::connect(&dir.0, "app").unwrap();
    let (handle, _mapped) = region(&broker, 1000, |_| 3);
    let response = sidecar
        .unix_client()
        .await
        .model_infer(with_session(
            brokered_request("slow", handle.key(), 0, 1000),
            &broker,
        ))
        .await
        .unwrap();
    assert_eq!(checksum(response.get_ref()), 3000);
}

#[tokio::test(flavor = "multi_thread")]
async fn colocated_requests_fail_over_when_a_worker_is_killed_mid_request() {
    let dir = TempDir::new("worker-kill");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let model = "builtin://checksum?infer_delay_ms=1500";
    let mut first = Worker::start(&dir, "slow", model, Some(&dir.0)).await;
    let second = Worker::start(&dir, "slow", model, Some(&dir.0)).await;
    sidecar.discover(&[("slow", &first, NODE), ("slow", &second, NODE)]);
    let broker = BrokerClient::connect(&dir.0, "app").unwrap();
    let client = sidecar.unix_client().await;
    let regions: Vec<_> = (1..=6u8)
        .map(|n| region(&broker, MIB, move |_| n))
        .collect();
    let calls: Vec<_> = regions
        .iter()
        .map(|(handle, _)| {
            let mut client = client.clone();
            let request = with_session(brokered_request("slow", handle.key(), 0, MIB), &broker);
            tokio::spawn(async move { client.model_infer(request).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.process.kill();
    for (n, call) in calls.into_iter().enumerate() {
        let response = call
            .await
            .unwrap()
            .unwrap_or_else(|status| panic!("request {n}: {status:?}"));
        assert_eq!(checksum(response.get_ref()), (n as u64 + 1) * MIB as u64);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_the_sidecar_is_killed_clients_adopt_their_regions_at_the_next_one_and_requests_resume()
 {
    let dir = TempDir::new("sidecar-kill");
    let mut sidecar = Sidecar::start(&dir, &[]).await;
    let worker = Worker::start(&dir, "near", "builtin://checksum", Some(&dir.0)).await;
    sidecar.discover(&[("near", &worker, NODE)]);
    let broker = BrokerClient::connect(&dir.0, "app").unwrap();
    let len = 8 * MIB;
    let (handle, _mapped) = region(&broker, len, |i| (i % 7) as u8);
    let expected: u64 = (0..len).map(|i| (i % 7) as u64).sum();
    let infer = |broker: &BrokerClient| {
        with_session(brokered_request("near", handle.key(), 0, len), broker)
    };
    let response = sidecar
        .unix_client()
        .await
        .model_infer(infer(&broker))
        .await
        .unwrap();
    assert_eq!(checksum(response.get_ref()), expected);
    let old_token = broker.session_token();

    sidecar.process.kill(); // SIGKILL, then reaped
    let next = Sidecar::start(&dir, &[]).await;
    next.discover(&[("near", &worker, NODE)]);
    eventually(
        "the client adopts its region at the new sidecar",
        async || sessions(&next).await.contains(&format!("app\t1\t1\t{len}")),
    )
    .await;
    assert_ne!(broker.session_token(), old_token, "a new session");
    let mut client = next.unix_client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let response = loop {
        // Held until the new sidecar has read the discovery file; the worker reconnects to the
        // new broker on its first redeem.
        match client.model_infer(infer(&broker)).await {
            Ok(response) => break response,
            Err(status) => {
                assert!(
                    Instant::now() < deadline,
                    "requests did not resume: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(checksum(response.get_ref()), expected);
    client.server_live(ServerLiveRequest {}).await.unwrap();
}

/// 1 000 warm-up requests, then 10 000 more, alternating a colocated brokered request and an
/// inline one to a remote worker, four at a time.
#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_requests_after_warm_up_grow_neither_memory_nor_descriptors() {
    const SLACK: u64 = 8 << 20;
    let dir = TempDir::new("steady");
    let sidecar = Sidecar::start(&dir, &[]).await;
    let near = Worker::start(&dir, "near", "builtin://checksum", Some(&dir.0)).await;
    let far = Worker::start(&dir, "far", "builtin://checksum", None).await;
    sidecar.discover(&[("near", &near, NODE), ("far", &far, "node-b")]);
    let broker = BrokerClient::connect(&dir.0, "app").unwrap();
    let len = 64 << 10;
    let (handle, _mapped) = region(&broker, len, |i| i as u8);
    let expected: u64 = (0..len).map(|i| u64::from(i as u8)).sum();
    let client = sidecar.unix_client().await;
    let run = |count: usize| {
        let lanes: Vec<_> = (0..4)
            .map(|lane| {
                let mut client = client.clone();
                let session = with_session((), &broker).metadata().clone();
                let key = handle.key();
                tokio::spawn(async move {
                    for n in 0..count / 4 {
                        let response = if (n + lane) % 2 == 0 {
                            let mut request =
                                tonic::Request::new(brokered_request("near", key, 0, len));
                            *request.metadata_mut() = session.clone();
                            client.model_infer(request).await
                        } else {
                            let data = (0..len).map(|i| i as u8).collect();
                            client.model_infer(inline_request("far", data)).await
                        };
                        let response = response.unwrap_or_else(|status| {
                            panic!("request {n} of lane {lane} failed: {status:?}")
                        });
                        assert_eq!(checksum(response.get_ref()), expected);
                    }
                })
            })
            .collect::<Vec<_>>();
        async move {
            for lane in lanes {
                lane.await.unwrap();
            }
        }
    };
    let started = Instant::now();
    run(1_000).await;
    let pids = [sidecar.process.pid(), near.process.pid(), far.process.pid()];
    let warm: Vec<u64> = pids.iter().map(|&pid| rss(pid)).collect();
    let fds = open_fds(sidecar.process.pid());
    run(10_000).await;
    let after: Vec<u64> = pids.iter().map(|&pid| rss(pid)).collect();
    eprintln!(
        "11 000 requests in {:?}; RssAnon+RssShmem after warm-up {warm:?}, after {after:?} (sidecar, near, far); sidecar fds {fds} -> {}",
        started.elapsed(),
        open_fds(sidecar.process.pid())
    );
    for ((name, warm), after) in ["sidecar", "colocated worker", "remote worker"]
        .iter()
        .zip(&warm)
        .zip(&after)
    {
        assert!(
            after.abs_diff(*warm) <= SLACK,
            "{name}: {warm} bytes after warm-up, {after} after 10 000 more"
        );
    }
    assert_eq!(open_fds(sidecar.process.pid()), fds, "sidecar descriptors");
}
