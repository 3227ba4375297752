//! The tamper suite: a real log is written, then changed the ways an attacker with access to the
//! files would change it; the offline verifier must catch each change and name where it is.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use twinguard_audit::log::{AuditLog, Options, PREALLOCATE, recorded};
use twinguard_audit::note::{NoteSigner, NoteVerifier};
use twinguard_audit::verify::verify;

const ORIGIN: &str = "twinguard.test/audit";

fn open(dir: &Path, key: &str, witness: Option<PathBuf>) -> AuditLog {
    AuditLog::open(
        dir,
        NoteSigner::from_key(key).unwrap(),
        Options {
            origin: ORIGIN.into(),
            checkpoint_every: Duration::from_millis(5),
            witness,
        },
    )
    .unwrap()
}

fn append(log: &AuditLog, from: u64, to: u64) {
    for i in from..to {
        let entry = format!(r#"{{"kind":"request","principal":"user-{i}","status":200}}"#);
        assert_eq!(log.append(entry.into_bytes()).unwrap(), i);
    }
}

/// Opens an existing log again with a fresh signer that checkpoints rarely (the tests read it
/// without new checkpoints getting in the way).
fn reopen(dir: &Path) -> AuditLog {
    let (signer, _) = NoteSigner::generate(ORIGIN).unwrap();
    AuditLog::open(
        dir,
        signer,
        Options {
            origin: ORIGIN.into(),
            checkpoint_every: Duration::from_secs(60),
            witness: None,
        },
    )
    .unwrap()
}

/// Waits until the latest checkpoint covers the whole log.
fn checkpointed(log: &AuditLog, verifier: &NoteVerifier) -> String {
    for _ in 0..400 {
        if let Some(note) = log.latest_checkpoint()
            && let Ok(text) = verifier.verify(&note)
            && text.lines().nth(1) == Some(log.head().size.to_string().as_str())
        {
            return note;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no checkpoint covers the log");
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    verifier: NoteVerifier,
    /// A checkpoint kept elsewhere after the whole log was written.
    witness: String,
}

/// 100 entries written in three sessions (a restart in between), checkpointed along the way.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let (signer, key) = NoteSigner::generate(ORIGIN).unwrap();
    let verifier = NoteVerifier::parse(&signer.verifier_key()).unwrap();
    drop(signer);
    let witness_path = tmp.path().join("witness-checkpoint");
    for (from, to) in [(0, 30), (30, 60), (60, 100)] {
        let log = open(&dir, &key, Some(witness_path.clone()));
        append(&log, from, to);
        checkpointed(&log, &verifier);
    }
    let witness = std::fs::read_to_string(&witness_path).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        verifier,
        witness,
    }
}

fn lines(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join("entries.jsonl")).unwrap();
    String::from_utf8(recorded(&bytes).to_vec())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(dir: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(dir.join("entries.jsonl"), text).unwrap();
}

fn finding(f: &Fixture) -> String {
    match verify(&f.dir, &f.verifier, Some(&f.witness)) {
        Ok(report) => panic!("tampering went unnoticed: {report:?}"),
        Err(e) => e.0,
    }
}

#[test]
fn an_intact_log_verifies_with_its_checkpoints_and_the_witness() {
    let f = fixture();
    let report = verify(&f.dir, &f.verifier, Some(&f.witness)).unwrap();
    assert_eq!(report.entries, 100);
    assert!(report.checkpoints >= 4, "{report:?}");
    // Every line names its own position.
    for (i, line) in lines(&f.dir).iter().enumerate() {
        assert!(line.starts_with(&format!(r#"{{"seq":{i},"#)), "{line}");
    }
}

#[test]
fn space_written_ahead_and_scraps_of_an_unacknowledged_group_are_not_entries() {
    let f = fixture();
    let path = f.dir.join("entries.jsonl");
    let bytes = std::fs::read(&path).unwrap();
    let record = recorded(&bytes).len();
    assert!(
        bytes.len() as u64 >= record as u64 + PREALLOCATE / 2,
        "no space written ahead"
    );
    // A crash can leave pages of a group that was never acknowledged past the zeros.
    let mut crashed = bytes.clone();
    let scrap = b"{\"seq\":999}\n";
    crashed[record + 4096..record + 4096 + scrap.len()].copy_from_slice(scrap);
    std::fs::write(&path, &crashed).unwrap();
    let report = verify(&f.dir, &f.verifier, Some(&f.witness)).unwrap();
    assert_eq!(report.entries, 100);
    // Reopened, the log cuts them off and continues at 100.
    let log = reopen(&f.dir);
    assert_eq!(log.head().size, 100);
    append(&log, 100, 101);
    let after = lines(&f.dir);
    assert_eq!(after.len(), 101);
    assert!(after[100].starts_with(r#"{"seq":100,"#), "{}", after[100]);
    assert!(!after.iter().any(|l| l.contains("999")));
}

#[test]
fn a_flipped_byte_is_named() {
    let f = fixture();
    let mut all = lines(&f.dir);
    all[37] = all[37].replace("user-37", "user-38");
    write_lines(&f.dir, &all);
    let found = finding(&f);
    assert!(found.contains("entry 37 was modified"), "{found}");
}

#[test]
fn a_deleted_entry_is_named() {
    let f = fixture();
    let mut all = lines(&f.dir);
    all.remove(50);
    write_lines(&f.dir, &all);
    let found = finding(&f);
    assert!(found.contains("entry 50 is missing"), "{found}");
}

#[test]
fn swapped_entries_are_named() {
    let f = fixture();
    let mut all = lines(&f.dir);
    all.swap(10, 11);
    write_lines(&f.dir, &all);
    let found = finding(&f);
    assert!(found.contains("entry 10 is out of order"), "{found}");
}

#[test]
fn truncation_is_named() {
    let f = fixture();
    let all = lines(&f.dir);
    write_lines(&f.dir, &all[..80]);
    let found = finding(&f);
    assert!(
        found.contains("truncated") && found.contains("entries 80 to 99 are missing"),
        "{found}"
    );
}

#[test]
fn a_shorter_consistent_log_is_caught_by_the_witness() {
    let f = fixture();
    // The attacker rolls everything back to the state after the first session: the first 30
    // entries, their hashes, and only the checkpoints issued up to then. Alone, that log is
    // self-consistent.
    let all = lines(&f.dir);
    write_lines(&f.dir, &all[..30]);
    let hashes = std::fs::read(f.dir.join("hashes/level-00")).unwrap();
    std::fs::write(f.dir.join("hashes/level-00"), &hashes[..30 * 32]).unwrap();
    let checkpoints = std::fs::read_to_string(f.dir.join("checkpoints.log")).unwrap();
    let verifier = &f.verifier;
    let kept: Vec<&str> = checkpoints
        .split("\x0c\n")
        .filter(|n| !n.is_empty())
        .filter(|n| {
            let size: u64 = verifier
                .verify(n)
                .unwrap()
                .lines()
                .nth(1)
                .unwrap()
                .parse()
                .unwrap();
            size <= 30
        })
        .collect();
    let mut rolled_back = kept.join("\x0c\n");
    rolled_back.push_str("\x0c\n");
    std::fs::write(f.dir.join("checkpoints.log"), rolled_back).unwrap();
    std::fs::write(f.dir.join("checkpoint"), kept.last().unwrap()).unwrap();
    assert!(
        verify(&f.dir, &f.verifier, None).is_ok(),
        "without a witness it looks fine"
    );
    let found = finding(&f);
    assert!(
        found.contains("truncated") && found.contains("witness"),
        "{found}"
    );
}

#[test]
fn a_modification_with_rewritten_hashes_is_bounded_by_the_checkpoints() {
    let f = fixture();
    let mut all = lines(&f.dir);
    all[70] = all[70].replace("user-70", "user-07");
    write_lines(&f.dir, &all);
    std::fs::remove_file(f.dir.join("hashes/level-00")).unwrap();
    let found = finding(&f);
    // Checkpoints are frequent, so the range is narrow; it must contain entry 70.
    let range: Vec<u64> = found
        .split("an entry between ")
        .nth(1)
        .and_then(|r| r.split(" was modified").next())
        .map(|r| r.split(" and ").filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    assert!(
        range.len() == 2 && range[0] <= 70 && 70 <= range[1],
        "{found}"
    );
}

#[test]
fn a_forged_checkpoint_is_refused() {
    let f = fixture();
    let (other, _) = NoteSigner::generate(ORIGIN).unwrap();
    // The genuine checkpoint text, signed by a key that is not the log's.
    let text = f.verifier.verify(&f.witness).unwrap().to_owned();
    std::fs::write(f.dir.join("checkpoint"), other.sign(&text)).unwrap();
    let found = finding(&f);
    assert!(found.contains("no valid signature"), "{found}");
}

#[test]
fn proofs_served_by_the_log_verify() {
    let f = fixture();
    let log = reopen(&f.dir);
    let head = log.head();
    assert_eq!(head.size, 100);
    for index in [0u64, 1, 37, 64, 99] {
        let entry = log.entry(index).unwrap();
        let proof = log.inclusion_proof(index, head.size).unwrap();
        twinguard_audit::merkle::verify_inclusion(
            index,
            head.size,
            &twinguard_audit::merkle::leaf_hash(&entry),
            &proof,
            &head.root,
        )
        .unwrap();
    }
    for old in [1u64, 30, 60, 99] {
        let proof = log.consistency_proof(old, head.size).unwrap();
        twinguard_audit::merkle::verify_consistency(
            old,
            head.size,
            &log.root_at(old).unwrap(),
            &head.root,
            &proof,
        )
        .unwrap();
    }
}
