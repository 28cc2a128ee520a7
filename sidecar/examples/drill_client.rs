//! A client process for the failure drills (`tests/drills.rs`): it allocates a region of
//! `<bytes>` through the broker (`REMOTEMEDIA_SIDECAR`, label `drill`), fills it, sends one
//! colocated inference naming it to `<model>` through `<socket-dir>/infer.sock`, prints
//! `sent <region-id>` and then waits for the answer, so the test can kill it mid-request.
//!
//! Usage: `drill_client <socket-dir> <model> <bytes>`

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use remotemedia_proto::inference::{
    InferParameter, ModelInferRequest, grpc_inference_service_client::GrpcInferenceServiceClient,
    infer_parameter::ParameterChoice, model_infer_request::InferInputTensor,
};
use remotemedia_proto::params::{
    BROKERED_BYTE_SIZE, BROKERED_OFFSET, BROKERED_REGION, SESSION_METADATA,
};
use remotemedia_runtime_core::shm::broker::BrokerClient;
use remotemedia_runtime_core::shm::{Access, Region};
use tonic::transport::{Endpoint, Uri};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(model), Some(bytes)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: drill_client <socket-dir> <model> <bytes>");
    };
    let dir = PathBuf::from(dir);
    let len: usize = bytes.parse()?;
    let broker = BrokerClient::connect(&dir, "drill")?;
    let handle = broker.allocate(len as u64, "drill")?;
    let mut mapped = Region::from_handle(handle.clone(), Access::Shared)?;
    mapped.as_mut_slice()[..len].fill(1);

    let path = dir.join("infer.sock");
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://sidecar.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?;
    let param = |choice| InferParameter {
        parameter_choice: Some(choice),
    };
    let message = ModelInferRequest {
        model_name: model,
        inputs: vec![InferInputTensor {
            name: "INPUT0".into(),
            datatype: "UINT8".into(),
            shape: vec![len as i64],
            parameters: HashMap::from([
                (
                    BROKERED_REGION.into(),
                    param(ParameterChoice::StringParam(handle.key().to_hex())),
                ),
                (
                    BROKERED_OFFSET.into(),
                    param(ParameterChoice::Int64Param(0)),
                ),
                (
                    BROKERED_BYTE_SIZE.into(),
                    param(ParameterChoice::Int64Param(len as i64)),
                ),
            ]),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut request = tonic::Request::new(message);
    let token = broker
        .session_token()
        .ok_or_else(|| anyhow::anyhow!("failed to get a session token"))?;
    request
        .metadata_mut()
        .insert(SESSION_METADATA, token.to_hex().parse()?);
    let call = tokio::spawn(async move {
        GrpcInferenceServiceClient::new(channel)
            .model_infer(request)
            .await
    });
    // Sent, or about to be: the test waits a little more before the kill.
    println!("sent {}", handle.key().to_hex());
    std::io::stdout().flush()?;
    let response = call.await??;
    println!("answered {}", response.get_ref().raw_output_contents.len());
    Ok(())
}
