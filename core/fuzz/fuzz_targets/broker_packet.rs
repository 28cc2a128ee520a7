//! The broker's packet decoder on arbitrary bytes: the first byte says how many descriptors came
//! with the packet (0–3), the rest is the packet. Decoding must never panic, and whatever it
//! accepts must re-encode to a packet that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remotemedia_runtime_core::shm::broker::wire::{decode_request, decode_response};

fuzz_target!(|data: &[u8]| {
    let Some((&fds, bytes)) = data.split_first() else {
        return;
    };
    let fds = usize::from(fds % 4);
    if let Ok(request) = decode_request(bytes, vec![(); fds]) {
        let again = decode_request(
            &request.encode(),
            request.descriptor().into_iter().copied().collect(),
        );
        assert_eq!(again.ok(), Some(request));
    }
    if let Ok(response) = decode_response(bytes, vec![(); fds]) {
        let again = decode_response(
            &response.encode(),
            response.descriptor().into_iter().copied().collect(),
        );
        assert_eq!(again.ok(), Some(response));
    }
});
