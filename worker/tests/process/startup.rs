//! Bad configuration: a non-zero exit with one clear line, before anything is served.

use std::net::TcpListener;

use crate::support::{BINARY, run_to_exit};

/// Runs the worker with `args`; it must fail with one stderr line containing `expected`, also
/// written to the termination log.
fn assert_refused(args: &[&str], expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = run_to_exit(args, dir.path());
    assert!(!status.success(), "{args:?} started");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    let log = std::fs::read_to_string(dir.path().join("termination-log")).unwrap();
    assert_eq!(log.trim(), stderr.trim());
}

#[test]
fn bad_flags_are_refused_with_one_line() {
    let [port, admin] = crate::support::free_ports().map(|port| port.to_string());
    let base = ["--port", &port, "--admin-port", &admin];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            with(&["--model-path", "/nonexistent/model.pt"]),
            "model file /nonexistent/model.pt does not exist",
        ),
        (
            with(&["--model-path", "builtin://resnet"]),
            "unknown built-in model 'resnet'",
        ),
        (
            with(&["--model-path", "builtin://identity?infer_delay_ms=soon"]),
            "infer_delay_ms",
        ),
        (
            with(&["--model-path", "builtin://identity", "--device", "tpu"]),
            "unknown device 'tpu'",
        ),
        (
            with(&[
                "--model-path",
                "builtin://identity",
                "--model-id",
                "ns/model",
            ]),
            "invalid --model-id",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if expected.starts_with("unknown device") {
            // clap refuses the value itself; no termination log path is trusted before parsing.
            let (status, stderr) = run_to_exit(&args, tempfile::tempdir().unwrap().path());
            assert_eq!(status.code(), Some(2));
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert!(stderr.contains(expected), "{stderr}");
        } else {
            assert_refused(&args, expected);
        }
    }
}

#[test]
fn cuda_device_the_machine_lacks_is_refused() {
    let gpus = std::fs::read_dir("/proc/driver/nvidia/gpus").map_or(0, |dir| dir.count());
    let device = format!("cuda:{gpus}");
    assert_refused(
        &["--model-path", "builtin://identity", "--device", &device],
        &format!("invalid --device {device}"),
    );
}

#[cfg(not(feature = "torch"))]
#[test]
fn model_file_is_refused_without_the_torch_feature() {
    let file = tempfile::NamedTempFile::new().unwrap();
    assert_refused(
        &["--model-path", file.path().to_str().unwrap()],
        "no TorchScript backend",
    );
}

#[test]
fn port_in_use_is_refused() {
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let [admin, _] = crate::support::free_ports().map(|port| port.to_string());
    assert_refused(
        &[
            "--model-path",
            "builtin://identity",
            "--port",
            &port,
            "--admin-port",
            &admin,
        ],
        &format!("failed to bind the gRPC port {port}"),
    );
}

#[test]
fn version_is_printed() {
    let output = std::process::Command::new(BINARY)
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        format!("remotemedia-model-worker {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn flags_can_come_from_environment_twins() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(BINARY)
        .env("REMOTEMEDIA_WORKER_MODEL_PATH", "builtin://resnet")
        .env(
            "REMOTEMEDIA_WORKER_TERMINATION_LOG",
            dir.path().join("termination-log"),
        )
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown built-in model 'resnet'"));
    let log = std::fs::read_to_string(dir.path().join("termination-log")).unwrap();
    assert!(log.contains("resnet"), "{log}");
}
