//! TorchScript models (the `torch` feature) served by the real binary and compared with torch's
//! own outputs, and the start-up errors of models and configurations that cannot be served.
//!
//! The models come from `scripts/make_models.py`, run once per test binary with the project's
//! Python environment, into a folder keyed by the script's contents.
//!
//! Tolerances: every output but FP32 is compared byte for byte (FP16 and BF16 come from
//! element-wise operations). FP32 outputs of matrix products (mlp, heavy, tokens) may differ by
//! libtorch's choice of kernel for a thread count: |got − want| ≤ 1e-6 · max(1, |want|).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use remotemedia_proto::inference::{
    DataType as ConfigDataType, ModelConfigRequest, ModelMetadataRequest,
    model_config::SchedulingChoice,
};
use tonic::Code;

use crate::{
    cases::{Case, read_cases},
    support::{Worker, free_ports, request, run_to_exit},
};

/// Relative tolerance of FP32 outputs (see the top).
pub const RTOL: f32 = 1e-6;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/make_models.py");

/// The generated models' folder, made on first use.
fn models() -> &'static Path {
    static MODELS: OnceLock<PathBuf> = OnceLock::new();
    MODELS.get_or_init(|| {
        let script = std::fs::read(SCRIPT).unwrap();
        // FNV-1a: a changed script gets a fresh folder.
        let key = script.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("models-{key:016x}"));
        if dir.join(".complete").exists() {
            return dir;
        }
        let building = dir.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&building);
        let status = Command::new(python())
            .arg(SCRIPT)
            .arg(&building)
            .status()
            .unwrap();
        assert!(status.success(), "make_models.py failed: {status}");
        std::fs::write(building.join(".complete"), b"").unwrap();
        // Another test process may have finished first; either folder is complete.
        if std::fs::rename(&building, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&building);
        }
        dir
    })
}

/// The project's Python (with torch): `REMOTEMEDIA_PYTHON` as `scripts/test.sh` sets it, else
/// the environment `scripts/venv.sh` prints.
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("REMOTEMEDIA_PYTHON") {
        return python.into();
    }
    let venv = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/venv.sh"))
        .output()
        .unwrap();
    assert!(venv.status.success(), "scripts/venv.sh failed");
    PathBuf::from(String::from_utf8(venv.stdout).unwrap().trim()).join("bin/python")
}

pub fn model_file(name: &str) -> String {
    models().join(name).join("model.pt").display().to_string()
}

/// Every case of a generated model.
pub fn cases(model: &str) -> Vec<Case> {
    read_cases(&models().join(model)).unwrap()
}

/// Serves `model` and checks every case against torch's outputs; returns the worker.
async fn assert_serves_like_torch(model: &str) -> Worker {
    let worker = Worker::start(&model_file(model), &["--drain-delay", "0s"]).await;
    let mut client = worker.client().await;
    for case in cases(model) {
        let response = client
            .model_infer(case.request(model))
            .await
            .unwrap_or_else(|status| panic!("{model}: {status:?}\n{}", worker.stderr()))
            .into_inner();
        case.compare(&response, RTOL).unwrap();
    }
    worker
}

#[tokio::test]
async fn mlp_answers_as_torch_does() {
    assert_serves_like_torch("mlp").await;
}

#[tokio::test]
async fn model_with_two_inputs_and_two_outputs_answers_as_torch_does() {
    assert_serves_like_torch("two_io").await;
}

#[tokio::test]
async fn token_id_model_answers_as_torch_does() {
    assert_serves_like_torch("tokens").await;
}

#[tokio::test]
async fn heavy_model_answers_as_torch_does() {
    assert_serves_like_torch("heavy").await;
}

#[tokio::test]
async fn every_datatype_goes_in_and_out_exactly() {
    let worker = assert_serves_like_torch("dtypes").await;
    let mut client = worker.client().await;
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "dtypes".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let datatypes: Vec<&str> = metadata
        .inputs
        .iter()
        .map(|t| t.datatype.as_str())
        .collect();
    assert_eq!(
        datatypes,
        [
            "FP32", "FP16", "BF16", "INT8", "INT16", "INT32", "INT64", "UINT8", "BOOL"
        ]
    );
}

#[tokio::test]
async fn in_place_model_gives_torchs_answer_every_time() {
    // The model doubles its input in place: a second identical request must see the client's
    // bytes, not the doubled ones.
    let worker = assert_serves_like_torch("inplace").await;
    drop(worker);
    let worker = Worker::start(&model_file("inplace"), &[]).await;
    let mut client = worker.client().await;
    let case = cases("inplace").remove(0);
    for _ in 0..2 {
        let response = client
            .model_infer(case.request("inplace"))
            .await
            .unwrap()
            .into_inner();
        case.compare(&response, 0.0).unwrap();
    }
}

#[tokio::test]
async fn metadata_and_config_answer_from_config_pbtxt() {
    let worker = Worker::start(&model_file("mlp"), &["--intra-op-threads", "1"]).await;
    let mut client = worker.client().await;
    let metadata = client
        .model_metadata(ModelMetadataRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metadata.platform, "pytorch_libtorch");
    assert_eq!(metadata.inputs[0].name, "input");
    assert_eq!(metadata.inputs[0].shape, [-1, 16]);
    assert_eq!(metadata.outputs[0].shape, [-1, 4]);
    let config = client
        .model_config(ModelConfigRequest {
            name: "mlp".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(config.max_batch_size, 8);
    assert!(
        matches!(
            &config.scheduling_choice,
            Some(SchedulingChoice::DynamicBatching(batching))
                if batching.max_queue_delay_microseconds == 500
        ),
        "{config:?}"
    );
    assert_eq!(config.input[0].dims, [16]);
    assert_eq!(config.output[0].data_type, ConfigDataType::TypeFp32 as i32);
    // dynamic_batching is acted on (above): no field of this config is ignored.
    let log = worker.stderr();
    assert!(!log.contains("does not act on"), "{log}");
}

#[tokio::test]
async fn intra_op_threads_sizes_libtorchs_thread_pool() {
    // Seen from outside: after the same forward pass, a worker allowed 4 intra-op threads runs
    // at least 3 more threads than one allowed 1: the pool's workers, the caller being the 4th.
    // (Measured here: 2 more per allowed thread, the OpenMP team's and the BLAS library's.)
    let case = &cases("heavy")[1];
    let mut threads = Vec::new();
    for intra_op in ["1", "4"] {
        let worker = Worker::start(&model_file("heavy"), &["--intra-op-threads", intra_op]).await;
        let mut client = worker.client().await;
        let response = client.model_infer(case.request("heavy")).await.unwrap();
        case.compare(&response.into_inner(), RTOL).unwrap();
        threads.push(worker.threads());
    }
    assert!(threads[1] >= threads[0] + 3, "threads: {threads:?}");
}

#[tokio::test]
async fn requests_the_model_cannot_take_are_invalid_arguments() {
    let worker = Worker::start(&model_file("mlp"), &[]).await;
    let mut client = worker.client().await;
    let mut too_big = request("mlp", "FP32", &[9, 16], vec![0; 9 * 16 * 4]);
    too_big.inputs[0].name = "input".into();
    let status = client.model_infer(too_big).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("max_batch_size 8"), "{status:?}");
    // Still serving after refusals.
    client
        .model_infer(cases("mlp")[0].request("mlp"))
        .await
        .unwrap();

    let dtypes = Worker::start(&model_file("dtypes"), &[]).await;
    let mut case = cases("dtypes").remove(0);
    let bools = case
        .inputs
        .iter_mut()
        .find(|input| input.datatype == "BOOL")
        .unwrap();
    bools.data[0] = 2;
    let status = dtypes
        .client()
        .await
        .model_infer(case.request("dtypes"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("BOOL"), "{status:?}");
}

/// Runs the worker on `model_path`: it must exit non-zero, its last stderr line the one error
/// line, containing `expected` and written to the termination log. (A model that fails to load
/// does so after the ports were bound and logged.)
fn assert_refused(model_path: &str, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let [port, admin_port] = free_ports().map(|port| port.to_string());
    let args = [
        "--model-path",
        model_path,
        "--port",
        &port,
        "--admin-port",
        &admin_port,
    ];
    let (status, stderr) = run_to_exit(&args, dir.path());
    assert!(!status.success(), "{model_path} started");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error"))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "{stderr}");
    assert!(errors[0].contains(expected), "{expected}: {stderr}");
    let log = std::fs::read_to_string(dir.path().join("termination-log")).unwrap();
    assert_eq!(log.trim_end(), errors[0]);
}

/// A copy of `model`'s folder whose config.pbtxt `edit` rewrites (or removes, on `None`).
fn altered(
    model: &str,
    edit: impl FnOnce(String) -> Option<String>,
) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        models().join(model).join("model.pt"),
        dir.path().join("model.pt"),
    )
    .unwrap();
    let config = std::fs::read_to_string(models().join(model).join("config.pbtxt")).unwrap();
    if let Some(config) = edit(config) {
        std::fs::write(dir.path().join("config.pbtxt"), config).unwrap();
    }
    let path = dir.path().join("model.pt").display().to_string();
    (dir, path)
}

#[test]
fn model_without_config_pbtxt_refuses_to_start() {
    let (_dir, path) = altered("mlp", |_| None);
    assert_refused(&path, "has no config.pbtxt beside it");
}

#[test]
fn corrupt_model_file_refuses_to_start() {
    let (dir, path) = altered("mlp", Some);
    std::fs::write(
        dir.path().join("model.pt"),
        b"PK\x03\x04 not a TorchScript archive",
    )
    .unwrap();
    assert_refused(&path, "failed to load the model file");
}

#[test]
fn missing_model_file_refuses_to_start() {
    let (dir, path) = altered("mlp", Some);
    std::fs::remove_file(dir.path().join("model.pt")).unwrap();
    assert_refused(&path, "does not exist");
}

#[test]
fn unknown_config_field_refuses_to_start_naming_it() {
    let (_dir, path) = altered("mlp", |config| Some(config + "warmup_count: 3\n"));
    assert_refused(&path, "warmup_count");
}

#[test]
fn config_that_disagrees_with_the_model_refuses_to_start() {
    // (model, text of its config.pbtxt, replaced by, expected in the error)
    let cases = [
        // One input declared, the model takes two.
        (
            "two_io",
            "input { name: \"b\" data_type: TYPE_FP32 dims: [8] }\n",
            "",
            "failed to warm up the model",
        ),
        // FP64 input to FP32 weights.
        (
            "mlp",
            "input { name: \"input\" data_type: TYPE_FP32",
            "input { name: \"input\" data_type: TYPE_FP64",
            "failed to warm up the model",
        ),
        // The model returns FP32.
        (
            "mlp",
            "output { name: \"output\" data_type: TYPE_FP32",
            "output { name: \"output\" data_type: TYPE_INT64",
            "output 'output' is FP32, the configuration says INT64",
        ),
        // The model returns 4 features.
        (
            "mlp",
            "dims: [4]",
            "dims: [5]",
            "has shape [1, 4], the configuration says [-1, 5]",
        ),
    ];
    for (model, from, to, expected) in cases {
        let (_dir, path) = altered(model, |config| {
            assert!(config.contains(from), "{model}: {config}");
            Some(config.replace(from, to))
        });
        assert_refused(&path, expected);
    }
}

#[test]
fn datatype_libtorch_cannot_hold_refuses_to_start() {
    let (_dir, path) = altered("mlp", |config| {
        Some(config.replacen("TYPE_FP32", "TYPE_UINT32", 1))
    });
    assert_refused(&path, "libtorch tensors cannot hold");
}
