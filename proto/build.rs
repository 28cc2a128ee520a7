//! Generates the tonic/prost code and the file-descriptor set from the `.proto` files.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "inference/grpc_service.proto",
    "inference/model_config.proto",
];

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
    Ok(())
}
