#![no_main]
//! Envelope decoding on arbitrary bytes: `decode`, `kid` and `claimed_device` must never panic,
//! whatever the bytes (COSE_Sign1 when the first byte is 0xd2 or 0x84, else JWS text). A decoded
//! envelope is also verified against a fixed key (the RFC 8037 test key; seed the corpus with
//! envelopes it signed so that payload parsing is reached) and a verified message must keep the
//! payload rules.

use libfuzzer_sys::fuzz_target;
use twinguard_telemetry::envelope::{DeviceKey, Envelope, MAX_ENVELOPE_BYTES, MAX_READINGS};

/// The Ed25519 public key of RFC 8037 appendix A.
const KEY: [u8; 32] = [
    0xd7, 0x5a, 0x98, 0x01, 0x82, 0xb1, 0x0a, 0xb7, 0xd5, 0x4b, 0xfe, 0xd3, 0xc9, 0x64, 0x07, 0x3a,
    0x0e, 0xe1, 0x72, 0xf3, 0xda, 0xa6, 0x23, 0x25, 0xaf, 0x02, 0x1a, 0x68, 0xf7, 0x07, 0x51, 0x1a,
];

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::decode(data) else {
        return;
    };
    assert!(data.len() <= MAX_ENVELOPE_BYTES);
    let _ = envelope.format();
    let kid = envelope.kid().map(str::to_owned);
    let claimed = envelope.claimed_device();
    if let Ok(key) = DeviceKey::from_bytes(&KEY) {
        let device = kid.or(claimed.ok()).unwrap_or_default();
        if let Ok(verified) = envelope.verify(&device, &key) {
            let message = verified.message();
            assert_eq!(message.device, device);
            assert!(message.seq >= 1);
            assert!((1..=MAX_READINGS).contains(&message.readings.len()));
        }
    }
});
