//! Any bytes on `rerank.v1`: decoding never panics, and a decoded request re-encodes and decodes
//! to itself (the worker's view of a request is stable).
#![no_main]

#[path = "../../src/wire/mod.rs"]
#[allow(dead_code, unused_imports)]
mod wire;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(request) = wire::decode_request(data) {
        let again = wire::decode_request(&wire::encode(&request)).expect("re-encoded request decodes");
        assert_eq!(again, request);
        let _ = wire::rank(&vec![0.0; request.documents.len().min(4096)], request.top_k);
    }
    let _ = wire::decode_reply(data);
});
