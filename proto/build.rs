//! Generates the tonic/prost code and the file-descriptor set from the `.proto` files.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "inference/grpc_service.proto",
    "inference/model_config.proto",
];
const BROKER_PROTO: &str = "remotemedia/broker/v1/broker.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    // A vendored protoc keeps the build free of a system package; PROTOC still wins if set.
    if env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    // Tensor payloads decode as `Bytes` slices of the received buffer instead of fresh vectors.
    config.bytes([
        ".inference.ModelInferRequest.raw_input_contents",
        ".inference.ModelInferResponse.raw_output_contents",
    ]);
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("descriptors.bin"))
        .compile_with_config(config, PROTOS, &["."])?;
    // The broker's messages travel over SOCK_SEQPACKET, not gRPC: messages only, and kept out of
    // the inference descriptor set that is diffed against Triton's.
    let mut broker = prost_build::Config::new();
    if env::var_os("PROTOC").is_none() {
        broker.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    broker.compile_protos(&[BROKER_PROTO], &["."])?;
    Ok(())
}
