//! The offline verifier: recomputes the tree from the entries, checks every checkpoint's
//! signature and that each one is consistent with the recomputed log and with the checkpoints
//! before it, and names the first bad entry. It trusts nothing the server wrote but the
//! checkpoint signatures, checked with a key the auditor holds.
//!
//! What it catches, and how it names it:
//! - a deleted, inserted or reordered entry: entry `i` must carry `"seq": i`;
//! - a modified entry: its leaf hash differs from the one recorded beside it (`hashes/level-00`),
//!   or, if that was rewritten too, the first checkpoint it breaks bounds it to a range;
//! - truncation or rollback: a checkpoint (from the log or from a witness) covers more entries
//!   than the log has.

use std::path::Path;

use crate::log::CHECKPOINT_SEPARATOR;
use crate::merkle::{self, Hash, MemoryTree};
use crate::note::{Checkpoint, NoteVerifier};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub entries: u64,
    pub checkpoints: usize,
    pub root: Hash,
}

/// The first problem found, in words an auditor can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Finding(pub String);

fn finding(message: impl Into<String>) -> Finding {
    Finding(message.into())
}

/// Verifies the log in `dir` against checkpoints signed by `key`; `witness` is a checkpoint kept
/// elsewhere (it proves the log was not rolled back past it).
pub fn verify(dir: &Path, key: &NoteVerifier, witness: Option<&str>) -> Result<Report, Finding> {
    let bytes = std::fs::read(dir.join("entries.jsonl"))
        .map_err(|e| finding(format!("cannot read entries.jsonl: {e}")))?;
    // The record ends at the first NUL: the server writes zeros ahead of it. Bytes other than
    // zeros past that point are pages of a group that a crash cut short (never acknowledged).
    let content = crate::log::recorded(&bytes);
    let scraps = bytes[content.len()..].iter().any(|b| *b != 0);
    let mut lines: Vec<&[u8]> = content.split(|b| *b == b'\n').collect();
    // The text ends with a newline, leaving an empty last piece; anything else there is a torn
    // write that was never acknowledged, checked against the checkpoints below.
    let torn = lines.pop().filter(|l| !l.is_empty()).is_some() || scraps;
    let recorded = std::fs::read(dir.join("hashes/level-00")).unwrap_or_default();

    let mut notes: Vec<(String, String)> = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("checkpoints.log")) {
        for (k, note) in text
            .split(CHECKPOINT_SEPARATOR)
            .filter(|n| !n.is_empty())
            .enumerate()
        {
            notes.push((
                format!("checkpoint {k} of checkpoints.log"),
                note.to_owned(),
            ));
        }
    }
    if let Ok(latest) = std::fs::read_to_string(dir.join("checkpoint")) {
        notes.push(("the latest checkpoint".into(), latest));
    }
    if let Some(w) = witness {
        notes.push(("the witness checkpoint".into(), w.to_owned()));
    }
    check(&lines, &recorded, torn, &notes, key)
}

/// Verifies a log kept elsewhere than in a directory (a node's copy in the shared database):
/// its entries in order, as recorded, and its signed checkpoints, each with a name for the
/// findings.
pub fn verify_entries(
    lines: &[&[u8]],
    notes: &[(String, String)],
    key: &NoteVerifier,
) -> Result<Report, Finding> {
    check(lines, &[], false, notes, key)
}

/// The checks of [`verify`]: `recorded` holds the leaf hashes written beside the entries (empty
/// where there are none), `torn` says the entries ended in a torn line.
fn check(
    lines: &[&[u8]],
    recorded: &[u8],
    torn: bool,
    notes: &[(String, String)],
    key: &NoteVerifier,
) -> Result<Report, Finding> {
    let mut tree = MemoryTree::default();
    for (i, line) in lines.iter().enumerate() {
        let entry: serde_json::Value = serde_json::from_slice(line)
            .map_err(|_| finding(format!("entry {i} is not valid JSON (modified)")))?;
        match entry.get("seq").and_then(serde_json::Value::as_u64) {
            Some(seq) if seq == i as u64 => {}
            Some(seq) => {
                // Entry i elsewhere in the file means the order was changed; nowhere, deleted.
                let needle = format!("{{\"seq\":{i},");
                let moved = lines[i + 1..]
                    .iter()
                    .any(|l| l.starts_with(needle.as_bytes()));
                let what = if moved {
                    "is out of order (entries were reordered)"
                } else if seq > i as u64 {
                    "is missing (entries were deleted)"
                } else {
                    "is out of order (entries were duplicated or reordered)"
                };
                return Err(finding(format!(
                    "entry {i} {what}: the entry at that position carries sequence number {seq}"
                )));
            }
            None => {
                return Err(finding(format!(
                    "entry {i} has no sequence number (modified)"
                )));
            }
        }
        let leaf = merkle::leaf_hash(line);
        if let Some(stored) = recorded.get(i * 32..i * 32 + 32)
            && stored != leaf
        {
            return Err(finding(format!(
                "entry {i} was modified after it was recorded (its hash differs from the recorded one)"
            )));
        }
        tree.push(leaf);
    }
    let size = tree.size();

    if notes.is_empty() {
        return Err(finding("no signed checkpoint: nothing vouches for the log"));
    }

    // Signatures first: nothing below trusts an unsigned checkpoint.
    let mut checkpoints: Vec<(&str, Checkpoint)> = Vec::new();
    for (name, note) in notes {
        let text = key
            .verify(note)
            .map_err(|e| finding(format!("{name}: {e}")))?;
        let checkpoint = Checkpoint::parse(text).map_err(|e| finding(format!("{name}: {e}")))?;
        if let Some((_, first)) = checkpoints.first()
            && checkpoint.origin != first.origin
        {
            return Err(finding(format!(
                "{name} names another log ({})",
                checkpoint.origin
            )));
        }
        checkpoints.push((name, checkpoint));
    }
    if let Some((name, longest)) = checkpoints.iter().max_by_key(|(_, c)| c.size)
        && longest.size > size
    {
        return Err(finding(format!(
            "the log is truncated: {name} covers {} entries but the log has {size}; entries {size} to {} are missing{}",
            longest.size,
            longest.size - 1,
            if torn { " (the last line is torn)" } else { "" }
        )));
    }
    // Each checkpoint must match the recomputed tree; the first that does not bounds the change
    // between the largest size already vouched for and its own.
    let mut ordered: Vec<&Checkpoint> = checkpoints.iter().map(|(_, c)| c).collect();
    ordered.sort_by_key(|c| c.size);
    for (name, checkpoint) in &checkpoints {
        if tree.root_at(checkpoint.size) != checkpoint.root {
            let below = ordered
                .iter()
                .filter(|c| c.size < checkpoint.size && tree.root_at(c.size) == c.root)
                .map(|c| c.size)
                .max()
                .unwrap_or(0);
            return Err(finding(format!(
                "an entry between {below} and {} was modified: the log no longer matches {name}",
                checkpoint.size.saturating_sub(1)
            )));
        }
    }
    // Consecutive checkpoints are consistent (RFC 9162 proofs over the recomputed tree).
    for pair in ordered.windows(2) {
        let (old, new) = (pair[0], pair[1]);
        if old.size == 0 || old.size == new.size {
            continue;
        }
        let proof = merkle::consistency_proof(&tree, old.size, new.size)
            .map_err(|e| finding(e.to_string()))?;
        merkle::verify_consistency(old.size, new.size, &old.root, &new.root, &proof).map_err(
            |e| {
                finding(format!(
                    "the checkpoints of sizes {} and {} are not consistent: {e}",
                    old.size, new.size
                ))
            },
        )?;
    }
    Ok(Report {
        entries: size,
        checkpoints: checkpoints.len(),
        root: tree.root(),
    })
}
