//! Feeds arbitrary bytes, decoded as a `ModelInferRequest`, to the worker's request decoder
//! against a constrained and an unconstrained signature. The decoder must never panic, and any
//! request it accepts must carry exactly shape × element size bytes per input, with and without
//! system shared memory (one registered region).

#![no_main]

use std::{num::NonZeroUsize, sync::LazyLock};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use remotemedia_model_worker::{
    decode::decode_request,
    model::{ModelSignature, TensorSpec},
    shm::{Resolve, SharedMemoryRegistry},
    tensor::DataType,
};
use remotemedia_proto::inference::ModelInferRequest;
use remotemedia_runtime_core::shm::Region;

fn signatures() -> [ModelSignature; 2] {
    let spec = |name: &str, datatype, dims| TensorSpec {
        name: name.into(),
        datatype,
        dims,
    };
    [
        ModelSignature {
            inputs: vec![spec("INPUT0", None, None)],
            outputs: vec![spec("OUTPUT0", None, None)],
        },
        ModelSignature {
            inputs: vec![
                spec("A", Some(DataType::Fp32), Some(vec![-1, 4])),
                spec("B", Some(DataType::Int8), Some(vec![2])),
            ],
            outputs: vec![spec("X", None, None), spec("Y", None, None)],
        },
    ]
}

/// A 4 KiB region registered as "r", so requests that name it reach the range checks.
static SHARED_MEMORY: LazyLock<(Region, SharedMemoryRegistry)> = LazyLock::new(|| {
    let region = Region::create_named(NonZeroUsize::new(4096).unwrap()).unwrap();
    let registry = SharedMemoryRegistry::unmeasured();
    registry.register("r", region.id(), 0, 4096).unwrap();
    (region, registry)
});

fuzz_target!(|data: &[u8]| {
    let Ok(request) = ModelInferRequest::decode(data) else {
        return;
    };
    for signature in signatures() {
        for shared_memory in [None, Some(&SHARED_MEMORY.1 as &dyn Resolve)] {
            let Ok(decoded) = decode_request(request.clone(), &signature, shared_memory) else {
                continue;
            };
            assert_eq!(decoded.inputs.len(), signature.inputs.len());
            for input in &decoded.inputs {
                let elements: u128 = input.shape.iter().map(|&dim| dim as u128).product();
                let size = input.datatype.element_size().expect("BYTES is refused") as u128;
                assert_eq!(elements * size, input.data.len() as u128);
            }
            assert!(
                decoded
                    .outputs
                    .iter()
                    .all(|output| output.index < signature.outputs.len())
            );
        }
    }
});
