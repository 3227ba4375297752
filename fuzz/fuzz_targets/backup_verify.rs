#![no_main]
//! Backup bundles on arbitrary bytes (`twinguard_backup::verify`): never a panic, and memory
//! bounded by the input, not by the lengths it claims. The first byte picks the mode: even,
//! the bytes are a bundle as they are (signed by nobody the target knows, so only the format
//! checks before the end are reached); odd, the rest are the frames of a bundle that the target
//! signs with its own key, so the signature verifies and the checks after it are reached. A
//! bundle that verifies must be canonical: its items written again give the same bytes.

use libfuzzer_sys::fuzz_target;
use twinguard_audit::note::{NoteSigner, NoteVerifier};
use twinguard_backup::{Header, Item, Reader, Writer};

/// A fixed test key (seed 0, 1, ..., 31); the ID field is recomputed from the key.
const KEY: &str = "PRIVATE+KEY+fuzz+00000000+AQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f";

fuzz_target!(|data: &[u8]| {
    let (Ok(signer), Some((mode, rest))) = (NoteSigner::from_key(KEY), data.split_first()) else {
        return;
    };
    let Ok(verifier) = NoteVerifier::parse(&signer.verifier_key()) else {
        return;
    };
    let header = Header {
        format: twinguard_backup::FORMAT,
        instance_id: "fuzz".into(),
        issuer: "urn:twinguard:fuzz".into(),
        created: "2026-12-06T00:00:00Z".into(),
        source: "redb".into(),
    };
    let bundle = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        twinguard_backup::testing::sign_frames(&header, rest, &signer)
    };
    let Ok(summary) = twinguard_backup::verify(&bundle[..], &verifier, std::io::sink()) else {
        return;
    };
    assert!(summary.records <= bundle.len() as u64);
    // Canonical: the items, written again, are the same bundle.
    let Ok(mut reader) = Reader::open(&bundle[..], &verifier) else {
        panic!("a bundle that verified does not open");
    };
    let Ok(mut writer) = Writer::new(Vec::new(), reader.header()) else {
        panic!("the header of a bundle that verified cannot be written");
    };
    let mut file: Option<(String, Vec<u8>)> = None;
    let flush = |writer: &mut Writer<Vec<u8>>, file: &mut Option<(String, Vec<u8>)>| {
        if let Some((name, bytes)) = file.take() {
            assert!(writer.file(&name, &bytes[..]).is_ok());
        }
    };
    while let Ok(Some(item)) = reader.next_item() {
        match item {
            Item::Record { part, table, key, value } => {
                assert!(writer.record(part, table, &key, &value).is_ok());
            }
            Item::Chunk { file: name, bytes } => match file.as_mut() {
                Some((open, content)) if *open == name => content.extend_from_slice(&bytes),
                _ => {
                    flush(&mut writer, &mut file);
                    file = Some((name, bytes));
                }
            },
        }
    }
    flush(&mut writer, &mut file);
    let Ok(again) = writer.finish(&signer) else {
        panic!("a bundle that verified cannot be written again");
    };
    assert_eq!(again, bundle);
});
