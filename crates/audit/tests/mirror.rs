//! A log with a mirror (the shared database on PostgreSQL, here a copy in memory): an append is
//! acknowledged only once the mirror holds it, a mirror that failed gets what it lacks before
//! anything more is acknowledged, a restart sends what a crash left out, and a file rolled back
//! behind its mirror is refused. The mirror's copy verifies on its own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use twinguard_audit::log::{AuditError, AuditLog, Mirror, MirrorWait, Options};
use twinguard_audit::note::{NoteSigner, NoteVerifier};
use twinguard_audit::verify::verify_entries;

const ORIGIN: &str = "twinguard.test/audit";

/// A mirror in memory that can be made to fail.
#[derive(Default)]
struct Copy {
    entries: Mutex<Vec<Vec<u8>>>,
    checkpoints: Mutex<Vec<(u64, String)>>,
    failing: AtomicBool,
}

impl Mirror for Copy {
    fn size(&self) -> Result<u64, String> {
        Ok(self.entries.lock().unwrap().len() as u64)
    }
    fn append(&self, first: u64, lines: Vec<Vec<u8>>) -> MirrorWait {
        let failing = self.failing.load(Ordering::SeqCst);
        let result = if failing {
            Err("the database is unreachable".to_owned())
        } else {
            let mut entries = self.entries.lock().unwrap();
            for (i, line) in lines.into_iter().enumerate() {
                let index = (first as usize) + i;
                match entries.get(index) {
                    Some(held) => {
                        assert_eq!(*held, line, "entry {index} stored twice, differently")
                    }
                    None => {
                        assert_eq!(entries.len(), index, "a gap before entry {index}");
                        entries.push(line);
                    }
                }
            }
            Ok(())
        };
        Box::new(move || result)
    }
    fn checkpoint(&self, size: u64, note: &str) -> Result<(), String> {
        if self.failing.load(Ordering::SeqCst) {
            return Err("the database is unreachable".to_owned());
        }
        assert!(size <= self.entries.lock().unwrap().len() as u64);
        self.checkpoints
            .lock()
            .unwrap()
            .push((size, note.to_owned()));
        Ok(())
    }
}

impl Copy {
    /// The mirror's copy, verified on its own with the log's key.
    fn verify(&self, key: &NoteVerifier) -> Result<u64, String> {
        let entries = self.entries.lock().unwrap();
        let lines: Vec<&[u8]> = entries.iter().map(Vec::as_slice).collect();
        let notes: Vec<(String, String)> = self
            .checkpoints
            .lock()
            .unwrap()
            .iter()
            .map(|(size, note)| (format!("the checkpoint of size {size}"), note.clone()))
            .collect();
        verify_entries(&lines, &notes, key)
            .map(|r| r.entries)
            .map_err(|f| f.to_string())
    }

    /// Waits until the mirror holds a checkpoint of `size` entries.
    fn wait_for_checkpoint(&self, size: u64) {
        for _ in 0..1_000 {
            if self
                .checkpoints
                .lock()
                .unwrap()
                .iter()
                .any(|(s, _)| *s == size)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no checkpoint of {size} entries reached the mirror");
    }
}

fn key() -> (String, NoteVerifier) {
    let (signer, text) = NoteSigner::generate(ORIGIN).unwrap();
    (text, NoteVerifier::parse(&signer.verifier_key()).unwrap())
}

fn open(dir: &Path, key: &str, mirror: Option<Arc<Copy>>) -> Result<AuditLog, AuditError> {
    AuditLog::open_mirrored(
        dir,
        NoteSigner::from_key(key).unwrap(),
        Options {
            origin: ORIGIN.into(),
            checkpoint_every: Duration::from_millis(5),
            witness: None,
        },
        mirror.map(|m| m as Arc<dyn Mirror>),
    )
}

fn entry(i: u64) -> Vec<u8> {
    format!(r#"{{"kind":"request","principal":"user-{i}","status":200}}"#).into_bytes()
}

/// The file's entries, as recorded.
fn file_lines(dir: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(dir.join("entries.jsonl")).unwrap();
    twinguard_audit::log::recorded(&bytes)
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

#[test]
fn every_acknowledged_entry_is_in_the_mirror_and_its_copy_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (key, verifier) = key();
    let copy = Arc::new(Copy::default());
    let log = open(dir.path(), &key, Some(copy.clone())).unwrap();
    for i in 0..50 {
        let index = log.append(entry(i)).unwrap();
        // Acknowledged: the mirror holds it already.
        assert!(copy.entries.lock().unwrap().len() as u64 > index);
    }
    copy.wait_for_checkpoint(50);
    assert_eq!(*copy.entries.lock().unwrap(), file_lines(dir.path()));
    assert_eq!(copy.verify(&verifier), Ok(50));
}

#[test]
fn a_failing_mirror_refuses_appends_unwritten_and_gets_what_it_lacks_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let (key, verifier) = key();
    let copy = Arc::new(Copy::default());
    let log = open(dir.path(), &key, Some(copy.clone())).unwrap();
    for i in 0..10 {
        log.append(entry(i)).unwrap();
    }
    copy.failing.store(true, Ordering::SeqCst);
    // The first refused group is in the file; the file grows no further while the mirror
    // lacks it, however many requests come (each would cost disk and, waiting for the
    // mirror, memory).
    for i in 10..210 {
        assert!(
            log.append(entry(i)).is_err(),
            "acknowledged without the mirror"
        );
    }
    assert_eq!(file_lines(dir.path()).len(), 11, "refused entries written");
    assert!(
        !log.healthy(),
        "readiness must fail while the mirror lacks entries"
    );
    copy.failing.store(false, Ordering::SeqCst);
    // With no traffic the writer sends the refused entries on its own and is healthy again.
    for _ in 0..1_000 {
        if log.healthy() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(log.healthy());
    assert_eq!(copy.entries.lock().unwrap().len(), 11);
    assert_eq!(log.append(entry(11)).unwrap(), 11);
    copy.wait_for_checkpoint(12);
    assert_eq!(*copy.entries.lock().unwrap(), file_lines(dir.path()));
    assert_eq!(copy.verify(&verifier), Ok(12));
}

#[test]
fn a_restart_sends_the_mirror_what_it_lacks_and_a_file_behind_its_mirror_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (key, verifier) = key();
    // Entries recorded before there was a mirror (or that a crash kept from it).
    let log = open(dir.path(), &key, None).unwrap();
    for i in 0..20 {
        log.append(entry(i)).unwrap();
    }
    drop(log);
    let copy = Arc::new(Copy::default());
    copy.entries
        .lock()
        .unwrap()
        .extend(file_lines(dir.path()).into_iter().take(7));
    let log = open(dir.path(), &key, Some(copy.clone())).unwrap();
    assert_eq!(copy.entries.lock().unwrap().len(), 20);
    assert_eq!(log.append(entry(20)).unwrap(), 20);
    copy.wait_for_checkpoint(21);
    assert_eq!(copy.verify(&verifier), Ok(21));
    drop(log);

    // The node's file rolled back to an older copy: the mirror holds more than it.
    let old = tempfile::tempdir().unwrap();
    let lines = file_lines(dir.path());
    let mut text = Vec::new();
    for line in &lines[..12] {
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    std::fs::write(old.path().join("entries.jsonl"), text).unwrap();
    let refused = open(old.path(), &key, Some(copy.clone())).unwrap_err();
    assert!(
        refused.to_string().contains("holds 21 entries") && refused.to_string().contains("only 12"),
        "{refused}"
    );
}

#[test]
fn the_mirrors_copy_altered_fails_verification_with_the_entry_named() {
    let dir = tempfile::tempdir().unwrap();
    let (key, verifier) = key();
    let copy = Arc::new(Copy::default());
    let log = open(dir.path(), &key, Some(copy.clone())).unwrap();
    for i in 0..30 {
        log.append(entry(i)).unwrap();
    }
    copy.wait_for_checkpoint(30);
    drop(log);
    assert_eq!(copy.verify(&verifier), Ok(30));

    let original = copy.entries.lock().unwrap().clone();
    // One byte of entry 17.
    copy.entries.lock().unwrap()[17] = String::from_utf8(original[17].clone())
        .unwrap()
        .replace("user-17", "user-71")
        .into_bytes();
    let finding = copy.verify(&verifier).unwrap_err();
    assert!(finding.contains("was modified"), "{finding}");
    // Entry 9 deleted.
    *copy.entries.lock().unwrap() = original.clone();
    copy.entries.lock().unwrap().remove(9);
    let finding = copy.verify(&verifier).unwrap_err();
    assert!(finding.contains("entry 9 is missing"), "{finding}");
    // Signed by another key.
    *copy.entries.lock().unwrap() = original;
    let (_, stranger) = self::key();
    let finding = copy.verify(&stranger).unwrap_err();
    assert!(finding.contains("checkpoint"), "{finding}");
}
