//! RemoteMedia's wire protocol: generated code, and the parameter names of [`params`].
//!
//! - [`inference`]: Triton's `inference.GRPCInferenceService` (the KServe v2 / Open Inference
//!   Protocol plus Triton's statistics, model-configuration and system-shared-memory extensions),
//!   restricted to the RPCs RemoteMedia implements. Any other RPC of the published service
//!   answers UNIMPLEMENTED.
//! - [`broker`]: the node broker's messages (region descriptors over a Unix socket).
//! - [`health`]: `grpc.health.v1`, re-exported from `tonic-health`.
//! - [`stream`]: how the worker and the sidecar serve ModelStreamInfer.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of every message above, for reflection,
//!   protobuf text format (`config.pbtxt`) and the wire-compatibility test.

/// The `inference` package (`proto/inference/*.proto`).
#[allow(clippy::all, missing_docs)]
pub mod inference {
    tonic::include_proto!("inference");
}

/// `remotemedia.broker.v1`: the node broker's messages (`proto/remotemedia/broker/v1`), sent
/// one per packet over `SOCK_SEQPACKET`; no gRPC service.
#[allow(clippy::all, missing_docs)]
pub mod broker {
    include!(concat!(env!("OUT_DIR"), "/remotemedia.broker.v1.rs"));
}

pub mod http2;
pub mod params;
pub mod stream;

/// `grpc.health.v1`, as served by `tonic-health`.
pub use tonic_health as health;

/// Encoded `google.protobuf.FileDescriptorSet` of the `inference` package.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

#[cfg(test)]
mod tests {
    use prost::{Message, bytes::Bytes};

    use super::inference::{ModelInferRequest, model_infer_request::InferInputTensor};

    #[test]
    fn raw_input_contents_decode_as_slices_of_the_received_buffer() {
        let payload = vec![7u8; 4096];
        let request = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "UINT8".into(),
                shape: vec![4096],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from(payload.clone())],
            ..Default::default()
        };
        let wire = Bytes::from(request.encode_to_vec());
        let decoded = ModelInferRequest::decode(wire.clone()).expect("decodes");
        let raw = &decoded.raw_input_contents[0];
        assert_eq!(raw.as_ref(), payload.as_slice());
        // The tensor bytes must point into the wire buffer: a copy would double the memory and
        // time of every large inline request.
        let wire_range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        assert!(wire_range.contains(&(raw.as_ptr() as usize)));
    }
}
