use proptest::prelude::*;

use super::*;

fn signer() -> (NoteSigner, NoteVerifier) {
    let (signer, _) = NoteSigner::generate("twinguard/test-instance/audit").unwrap();
    let verifier = NoteVerifier::parse(&signer.verifier_key()).unwrap();
    (signer, verifier)
}

fn header() -> Header {
    Header {
        format: FORMAT,
        instance_id: "test-instance".into(),
        issuer: "https://127.0.0.1:8443".into(),
        created: "2026-12-06T04:00:00Z".into(),
        source: "redb".into(),
    }
}

/// Names and lengths as a [`Summary`] lists files.
fn files(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter()
        .map(|(name, len)| ((*name).to_owned(), *len))
        .collect()
}

/// A small bundle with records in two stores and two audit files, one of them empty.
fn bundle(signer: &NoteSigner) -> Vec<u8> {
    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    writer
        .record(Part::Main, Table::Models, "dtmi:x:A;1", b"{\"a\":1}")
        .unwrap();
    writer
        .record(Part::Main, Table::Twins, "pump-1", b"{\"flow\":1}")
        .unwrap();
    writer
        .record(Part::Main, Table::Twins, "pump-2", b"")
        .unwrap();
    writer
        .record(
            Part::History,
            Table::History,
            "pump-1\u{1f}flow\u{1f}t",
            b"1.5",
        )
        .unwrap();
    writer.file("entries.jsonl", &b"{\"seq\":0}\n"[..]).unwrap();
    writer.file("checkpoint", &b""[..]).unwrap();
    writer.finish(signer).unwrap()
}

fn read_all(bytes: &[u8], verifier: &NoteVerifier) -> Result<(Vec<Item>, Summary), BackupError> {
    let mut reader = Reader::open(bytes, verifier)?;
    let mut items = Vec::new();
    while let Some(item) = reader.next_item()? {
        items.push(item);
    }
    Ok((items, reader.summary().unwrap()))
}

#[test]
fn a_bundle_reads_back_every_record_and_file_in_order() {
    let (signer, verifier) = signer();
    let bytes = bundle(&signer);
    let (items, summary) = read_all(&bytes, &verifier).unwrap();
    assert_eq!(items.len(), 6);
    assert_eq!(
        items[1],
        Item::Record {
            part: Part::Main,
            table: Table::Twins,
            key: "pump-1".into(),
            value: b"{\"flow\":1}".to_vec()
        }
    );
    assert_eq!(
        items[5],
        Item::Chunk {
            file: "checkpoint".into(),
            bytes: Vec::new()
        }
    );
    assert_eq!(summary.records, 4);
    assert_eq!(
        summary.files,
        files(&[("entries.jsonl", 10), ("checkpoint", 0)])
    );
    assert_eq!(summary.header, header());
    let expected = hex::encode(Sha256::digest(&bytes));
    assert_eq!(summary.sha256, expected);

    let mut copy = Vec::new();
    assert_eq!(verify(&bytes[..], &verifier, &mut copy).unwrap(), summary);
    assert_eq!(copy, bytes, "verify copies exactly what it read");
}

#[test]
fn a_file_larger_than_a_chunk_is_written_in_pieces_and_read_back_whole() {
    let (signer, verifier) = signer();
    let content: Vec<u8> = (0..(MAX_CHUNK as usize * 2 + 7)).map(|i| i as u8).collect();
    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    assert_eq!(
        writer.file("entries.jsonl", &content[..]).unwrap(),
        content.len() as u64
    );
    let (bytes, digest) = writer.finish_with_digest(&signer).unwrap();
    let (items, summary) = read_all(&bytes, &verifier).unwrap();
    assert_eq!(
        digest, summary.sha256,
        "the writer's digest is the reader's"
    );
    assert_eq!(items.len(), 3);
    let joined: Vec<u8> = items
        .into_iter()
        .flat_map(|item| match item {
            Item::Chunk { bytes, .. } => bytes,
            Item::Record { .. } => panic!("no records were written"),
        })
        .collect();
    assert_eq!(joined, content);
    assert_eq!(
        summary.files,
        files(&[("entries.jsonl", content.len() as u64)])
    );
}

#[test]
fn every_single_byte_change_anywhere_in_a_bundle_is_refused() {
    let (signer, verifier) = signer();
    let bytes = bundle(&signer);
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80] {
            let mut altered = bytes.clone();
            altered[i] ^= flip;
            assert!(
                verify(&altered[..], &verifier, io::sink()).is_err(),
                "byte {i} ^ {flip:#x} was accepted"
            );
        }
    }
}

#[test]
fn every_truncation_and_any_appended_byte_is_refused() {
    let (signer, verifier) = signer();
    let bytes = bundle(&signer);
    for len in 0..bytes.len() {
        assert!(
            verify(&bytes[..len], &verifier, io::sink()).is_err(),
            "cut at {len} was accepted"
        );
    }
    let mut longer = bytes.clone();
    longer.push(b'\n');
    assert!(matches!(
        verify(&longer[..], &verifier, io::sink()),
        Err(BackupError::Malformed(_))
    ));
}

#[test]
fn a_bundle_signed_by_another_key_is_refused() {
    let (signer, _) = signer();
    let (_, other) = self::signer();
    let bytes = bundle(&signer);
    assert!(matches!(
        verify(&bytes[..], &other, io::sink()),
        Err(BackupError::NotVerified(_))
    ));
}

/// A bundle with `frames` after the header, signed by `signer` with a note that states
/// `records` and `files`: what a holder of the key could write by hand.
fn hand_made(signer: &NoteSigner, frames: &[u8], records: u64, files: u64) -> Vec<u8> {
    testing::sign_frames_counted(&header(), frames, signer, records, files)
}

fn record_frame(part: u8, table: &str, key: &str, value: &[u8]) -> Vec<u8> {
    let mut frame = vec![b'R', part, table.len() as u8];
    frame.extend_from_slice(table.as_bytes());
    frame.extend_from_slice(&(key.len() as u32).to_be_bytes());
    frame.extend_from_slice(key.as_bytes());
    frame.extend_from_slice(&(value.len() as u32).to_be_bytes());
    frame.extend_from_slice(value);
    frame
}

fn file_frame(name: &str, bytes: &[u8]) -> Vec<u8> {
    let mut frame = vec![b'F', name.len() as u8];
    frame.extend_from_slice(name.as_bytes());
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.extend_from_slice(bytes);
    frame
}

#[test]
fn the_hand_made_bundle_of_the_checks_below_verifies_when_it_keeps_the_rules() {
    // The control for the refusals below: the same construction, rules kept, verifies.
    let (signer, verifier) = signer();
    let frames = [
        record_frame(0, "twins", "a", b"1"),
        record_frame(0, "twins", "b", b"2"),
        file_frame("entries.jsonl", &vec![b'x'; MAX_CHUNK as usize]),
        file_frame("entries.jsonl", b"y"),
        file_frame("checkpoint", b"z"),
        file_frame("nodes/0a1b/entries.jsonl", b"n"),
        file_frame("nodes/0a1b/checkpoint.pub", b"k"),
        file_frame("nodes/ff/checkpoints.log", b"c"),
    ]
    .concat();
    let bytes = hand_made(&signer, &frames, 2, 5);
    let summary = verify(&bytes[..], &verifier, io::sink()).unwrap();
    assert_eq!(summary.records, 2);
    assert_eq!(
        summary.files,
        files(&[
            ("entries.jsonl", u64::from(MAX_CHUNK) + 1),
            ("checkpoint", 1),
            ("nodes/0a1b/entries.jsonl", 1),
            ("nodes/0a1b/checkpoint.pub", 1),
            ("nodes/ff/checkpoints.log", 1),
        ])
    );
    assert_eq!(testing::sign_frames(&header(), &frames, &signer), bytes);
}

#[test]
fn a_signed_bundle_that_breaks_the_format_is_refused() {
    let (signer, verifier) = signer();
    let cases: Vec<(&str, Vec<u8>, u64, u64)> = vec![
        (
            "a repeated key (a record shadowing another)",
            [
                record_frame(0, "twins", "a", b"1"),
                record_frame(0, "twins", "a", b"2"),
            ]
            .concat(),
            2,
            0,
        ),
        (
            "keys out of order",
            [
                record_frame(0, "twins", "b", b"1"),
                record_frame(0, "twins", "a", b"2"),
            ]
            .concat(),
            2,
            0,
        ),
        (
            "tables out of order",
            [
                record_frame(0, "twins", "a", b"1"),
                record_frame(0, "models", "a", b"2"),
            ]
            .concat(),
            2,
            0,
        ),
        (
            "history before the main store",
            [
                record_frame(1, "history", "a", b"1"),
                record_frame(0, "twins", "a", b"2"),
            ]
            .concat(),
            2,
            0,
        ),
        (
            "an unknown table",
            record_frame(0, "nosuchtable", "a", b"1"),
            1,
            0,
        ),
        (
            "sealed instance material",
            record_frame(0, "secrets", "token-keys", b"1"),
            1,
            0,
        ),
        (
            "another table in the history store",
            record_frame(1, "twins", "a", b"1"),
            1,
            0,
        ),
        (
            "an unknown store",
            record_frame(2, "twins", "a", b"1"),
            1,
            0,
        ),
        (
            "a file off the list",
            file_frame("../../secrets/token-keys.json", b"x"),
            0,
            1,
        ),
        (
            "a node's file whose node is a path",
            file_frame("nodes/../entries.jsonl", b"x"),
            0,
            1,
        ),
        (
            "a node's file under a name that is not lower-case letters and digits",
            file_frame("nodes/Ab/entries.jsonl", b"x"),
            0,
            1,
        ),
        (
            "a node's file with an empty node name",
            file_frame("nodes//entries.jsonl", b"x"),
            0,
            1,
        ),
        (
            "a node's file with a node name past its limit",
            file_frame(&node_file(&"a".repeat(65), "entries.jsonl"), b"x"),
            0,
            1,
        ),
        (
            "a node's file off its list",
            file_frame("nodes/ab/audit-key", b"x"),
            0,
            1,
        ),
        (
            "a node's file deeper down",
            file_frame("nodes/ab/cd/entries.jsonl", b"x"),
            0,
            1,
        ),
        (
            "a node's file before the trail's own",
            [
                file_frame("nodes/ab/entries.jsonl", b"x"),
                file_frame("checkpoint", b"y"),
            ]
            .concat(),
            0,
            2,
        ),
        (
            "nodes out of order",
            [
                file_frame("nodes/b/entries.jsonl", b"x"),
                file_frame("nodes/a/entries.jsonl", b"y"),
            ]
            .concat(),
            0,
            2,
        ),
        (
            "a node's files out of order",
            [
                file_frame("nodes/a/checkpoint.pub", b"x"),
                file_frame("nodes/a/entries.jsonl", b"y"),
            ]
            .concat(),
            0,
            2,
        ),
        (
            "a node's file twice",
            [
                file_frame("nodes/a/entries.jsonl", b"x"),
                file_frame("nodes/a/entries.jsonl", b"y"),
            ]
            .concat(),
            0,
            1,
        ),
        (
            "a file in two places",
            [
                file_frame("entries.jsonl", b"x"),
                file_frame("checkpoint", b"y"),
                file_frame("entries.jsonl", b"z"),
            ]
            .concat(),
            0,
            2,
        ),
        (
            "a file in two short pieces (only a full piece is followed by more)",
            [
                file_frame("checkpoint", b"y"),
                file_frame("checkpoint", b"z"),
            ]
            .concat(),
            0,
            1,
        ),
        (
            "a file cut short (a full piece, then the end)",
            file_frame("checkpoint", &vec![0u8; MAX_CHUNK as usize]),
            0,
            1,
        ),
        (
            "a file cut short (a full piece, then another file)",
            [
                file_frame("entries.jsonl", &vec![0u8; MAX_CHUNK as usize]),
                file_frame("checkpoint", b"z"),
            ]
            .concat(),
            0,
            2,
        ),
        (
            "a record after the files",
            [
                file_frame("checkpoint", b"y"),
                record_frame(0, "twins", "a", b"1"),
            ]
            .concat(),
            1,
            1,
        ),
        ("an unknown frame", vec![b'X'], 0, 0),
        (
            "a key that is not UTF-8",
            {
                let mut frame = record_frame(0, "twins", "ab", b"1");
                frame[3 + 5 + 4] = 0xff;
                frame
            },
            1,
            0,
        ),
        (
            "a summary that counts wrong",
            record_frame(0, "twins", "a", b"1"),
            2,
            0,
        ),
    ];
    for (what, frames, records, files) in cases {
        let bytes = hand_made(&signer, &frames, records, files);
        assert!(
            verify(&bytes[..], &verifier, io::sink()).is_err(),
            "{what} was accepted"
        );
    }
}

#[test]
fn a_length_past_its_limit_is_refused_before_anything_is_allocated_for_it() {
    let (signer, verifier) = signer();
    let mut frame = vec![b'R', 0, 5];
    frame.extend_from_slice(b"twins");
    frame.extend_from_slice(&u32::MAX.to_be_bytes());
    let bytes = hand_made(&signer, &frame, 1, 0);
    let error = verify(&bytes[..], &verifier, io::sink()).unwrap_err();
    assert!(error.to_string().contains("longer than"), "{error}");
    // A length within the limit but past the end of the input: cut short, not allocated.
    let mut frame = vec![b'F', 10];
    frame.extend_from_slice(b"checkpoint");
    frame.extend_from_slice(&MAX_CHUNK.to_be_bytes());
    let mut bytes = MAGIC.to_vec();
    let json = serde_json::to_vec(&header()).unwrap();
    bytes.push(b'H');
    bytes.extend_from_slice(&(json.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&json);
    bytes.extend_from_slice(&frame);
    let error = verify(&bytes[..], &verifier, io::sink()).unwrap_err();
    assert!(error.to_string().contains("ends early"), "{error}");
}

#[test]
fn the_writer_refuses_what_the_reader_would() {
    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    writer.record(Part::Main, Table::Twins, "b", b"").unwrap();
    assert!(writer.record(Part::Main, Table::Twins, "b", b"").is_err());
    assert!(writer.record(Part::Main, Table::Twins, "a", b"").is_err());
    assert!(writer.record(Part::Main, Table::Models, "z", b"").is_err());
    assert!(
        writer
            .record(Part::History, Table::Twins, "z", b"")
            .is_err()
    );
    assert!(writer.file("secrets/audit-key", &b""[..]).is_err());
    assert!(writer.file("nodes/../audit-key", &b""[..]).is_err());
    writer.file("checkpoint", &b""[..]).unwrap();
    assert!(writer.file("entries.jsonl", &b""[..]).is_err());
    writer
        .file(&node_file("b", "checkpoints.log"), &b""[..])
        .unwrap();
    assert!(
        writer
            .file(&node_file("b", "entries.jsonl"), &b""[..])
            .is_err()
    );
    assert!(
        writer
            .file(&node_file("a", "entries.jsonl"), &b""[..])
            .is_err()
    );
    assert!(writer.file("checkpoint.pub", &b""[..]).is_err());
    writer
        .file(&node_file("b", "checkpoint.pub"), &b""[..])
        .unwrap();
    assert!(
        writer
            .record(Part::History, Table::History, "z", b"")
            .is_err()
    );
}

#[test]
fn a_verified_bundle_gives_its_items_from_its_own_copy() {
    let (signer, verifier) = signer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bundle");
    std::fs::write(&path, bundle(&signer)).unwrap();
    let verified =
        VerifiedBundle::verify(std::fs::File::open(&path).unwrap(), &verifier, dir.path()).unwrap();
    // The file is replaced after verification: the items still come from what verified.
    std::fs::write(&path, b"something else").unwrap();
    assert_eq!(verified.summary().records, 4);
    let mut reader = verified.items().unwrap();
    let mut count = 0;
    while reader.next_item().unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, 6);
    // Nothing but the bundle itself was left in the directory (the copy has no name).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_refused_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (_, verifier) = signer();
        let mut input = MAGIC.to_vec();
        input.extend_from_slice(&bytes);
        prop_assert!(verify(&input[..], &verifier, io::sink()).is_err());
        prop_assert!(verify(&bytes[..], &verifier, io::sink()).is_err());
    }

    #[test]
    fn any_splice_into_a_valid_bundle_is_refused(
        at in any::<prop::sample::Index>(),
        cut in 0usize..16,
        insert in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let (signer, verifier) = signer();
        let bytes = bundle(&signer);
        let start = at.index(bytes.len());
        let end = (start + cut).min(bytes.len());
        prop_assume!(bytes[start..end] != insert[..]);
        let mut altered = bytes[..start].to_vec();
        altered.extend_from_slice(&insert);
        altered.extend_from_slice(&bytes[end..]);
        prop_assert!(verify(&altered[..], &verifier, io::sink()).is_err());
    }

    /// Every bundle that verifies is the one the writer makes of its items: nothing in a
    /// bundle is there but what its records and files say (checked on signed, hand-made
    /// frames: records of random tables, parts and keys, file pieces, stray bytes).
    #[test]
    fn a_bundle_that_verifies_is_the_one_its_items_write(
        frames in proptest::collection::vec(
            prop_oneof![
                (0u8..3, prop::sample::select(vec!["twins", "models", "history", "meta", "x"]),
                 "[a-c]{0,2}", proptest::collection::vec(any::<u8>(), 0..4))
                    .prop_map(|(part, table, key, value)| record_frame(part, table, &key, &value)),
                (prop::sample::select(vec![
                    "entries.jsonl", "checkpoint", "checkpoint.pub", "nodes/a/entries.jsonl",
                    "nodes/a/checkpoint.pub", "nodes/b/checkpoints.log", "nodes/B/checkpoints.log",
                ]), proptest::collection::vec(any::<u8>(), 0..4))
                    .prop_map(|(name, bytes)| file_frame(name, &bytes)),
                proptest::collection::vec(any::<u8>(), 1..3),
            ],
            0..8,
        ),
    ) {
        let (signer, verifier) = signer();
        let bytes = testing::sign_frames(&header(), &frames.concat(), &signer);
        if verify(&bytes[..], &verifier, io::sink()).is_ok() {
            let mut reader = Reader::open(&bytes[..], &verifier).unwrap();
            let mut writer = Writer::new(Vec::new(), reader.header()).unwrap();
            while let Some(item) = reader.next_item().unwrap() {
                match item {
                    Item::Record { part, table, key, value } => {
                        writer.record(part, table, &key, &value).unwrap();
                    }
                    Item::Chunk { file, bytes } => {
                        writer.file(&file, &bytes[..]).unwrap();
                    }
                }
            }
            prop_assert_eq!(writer.finish(&signer).unwrap(), bytes);
        }
    }
}
