//! Sends every case `scripts/make_models.py` wrote for a model to a running worker and compares
//! the answers with torch's outputs. The GPU check runs it where no Python gRPC client exists.
//!
//! Usage: check_cases URL MODEL_ID MODEL_DIR RTOL
//! e.g.   check_cases http://127.0.0.1:50051 mlp models/mlp 1e-5

#[path = "../tests/process/cases.rs"]
mod cases;

use anyhow::{Context as _, bail};
use remotemedia_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, model, dir, rtol] = args.as_slice() else {
        bail!("usage: check_cases URL MODEL_ID MODEL_DIR RTOL");
    };
    let rtol: f32 = rtol.parse().context("failed to parse RTOL")?;
    let cases = cases::read_cases(dir.as_ref()).map_err(anyhow::Error::msg)?;
    let mut client = GrpcInferenceServiceClient::connect(url.clone())
        .await
        .with_context(|| format!("failed to connect to {url}"))?
        .max_decoding_message_size(usize::MAX);
    for case in &cases {
        let response = client
            .model_infer(case.request(model))
            .await
            .with_context(|| format!("failed to infer {}", case.dir.display()))?
            .into_inner();
        case.compare(&response, rtol).map_err(anyhow::Error::msg)?;
    }
    println!("{model}: {} cases match torch (rtol {rtol})", cases.len());
    Ok(())
}
