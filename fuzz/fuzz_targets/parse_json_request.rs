//! Any bytes as an HTTP JSON body: parsing into the request type never panics, and what parses
//! survives a MessagePack round trip (the sidecar forwards it to NATS).
#![no_main]

#[path = "../../src/wire/mod.rs"]
#[allow(dead_code, unused_imports)]
mod wire;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<wire::RerankRequest>(data) {
        let decoded = wire::decode_request(&wire::encode(&request)).expect("forwarded request decodes");
        assert_eq!(decoded, request);
    }
});
