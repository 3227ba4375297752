//! The Merkle implementation against every inclusion and consistency vector of
//! transparency-dev/merkle in `../shared/data/merkle` (happy paths and tampered variants), and
//! proof generation against the happy paths it can rebuild: the vectors' tree is RFC 6962's
//! eight-leaf test tree, whose leaves are known.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use twinguard_audit::merkle::{
    Hash, MemoryTree, consistency_proof, inclusion_proof, leaf_hash, verify_consistency,
    verify_inclusion,
};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/merkle")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// A 32-byte hash, or `None` for anything else (absent, empty, malformed, wrong length).
fn hash(v: &Value) -> Option<Hash> {
    let bytes = STANDARD.decode(v.as_str()?).ok()?;
    bytes.try_into().ok()
}

fn proof(v: &Value) -> Option<Vec<Hash>> {
    match v {
        Value::Null => Some(vec![]),
        Value::Array(items) => items.iter().map(hash).collect(),
        _ => None,
    }
}

/// RFC 6962's test leaves (from its reference implementation's tests).
fn reference_tree() -> MemoryTree {
    let leaves: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];
    let mut tree = MemoryTree::default();
    for l in leaves {
        tree.push(leaf_hash(l));
    }
    tree
}

fn number(v: &Value) -> Option<u64> {
    v.as_u64()
}

#[test]
fn every_inclusion_vector() {
    let tree = reference_tree();
    let cases = files(&data_dir().join("inclusion"));
    assert!(cases.len() > 50, "vectors missing: {}", cases.len());
    let mut generated = 0;
    for path in &cases {
        let case: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let want_err = case["wantErr"].as_bool().unwrap();
        let verdict = (|| {
            let index = number(&case["leafIdx"])?;
            let size = number(&case["treeSize"])?;
            let leaf = hash(&case["leafHash"])?;
            let root = hash(&case["root"])?;
            let proof = proof(&case["proof"])?;
            Some(verify_inclusion(index, size, &leaf, &proof, &root).is_ok())
        })()
        .unwrap_or(false);
        assert_eq!(verdict, !want_err, "{}", path.display());
        // Rebuild the happy paths on the reference tree.
        if !want_err {
            let (index, size) = (
                number(&case["leafIdx"]).unwrap(),
                number(&case["treeSize"]).unwrap(),
            );
            if size <= 8 && tree.root_at(size) == hash(&case["root"]).unwrap() {
                let ours = inclusion_proof(&tree, index, size).unwrap();
                assert_eq!(Some(ours), proof(&case["proof"]), "{}", path.display());
                generated += 1;
            }
        }
    }
    assert!(generated >= 5, "only {generated} proofs regenerated");
}

#[test]
fn every_consistency_vector() {
    let tree = reference_tree();
    let cases = files(&data_dir().join("consistency"));
    assert!(cases.len() > 50, "vectors missing: {}", cases.len());
    let mut generated = 0;
    for path in &cases {
        let case: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let want_err = case["wantErr"].as_bool().unwrap();
        let verdict = (|| {
            let size1 = number(&case["size1"])?;
            let size2 = number(&case["size2"])?;
            // Roots are compared as bytes when the sizes are equal, whatever their length.
            let root1 = STANDARD.decode(case["root1"].as_str()?).ok()?;
            let root2 = STANDARD.decode(case["root2"].as_str()?).ok()?;
            let proof = proof(&case["proof"])?;
            Some(verify_consistency(size1, size2, &root1, &root2, &proof).is_ok())
        })()
        .unwrap_or(false);
        assert_eq!(verdict, !want_err, "{}", path.display());
        if !want_err {
            let (m, n) = (
                number(&case["size1"]).unwrap(),
                number(&case["size2"]).unwrap(),
            );
            if n <= 8 && Some(tree.root_at(n)) == hash(&case["root2"]) {
                let ours = consistency_proof(&tree, m, n).unwrap();
                assert_eq!(Some(ours), proof(&case["proof"]), "{}", path.display());
                generated += 1;
            }
        }
    }
    assert!(generated >= 3, "only {generated} proofs regenerated");
}

/// Every inclusion and consistency proof of a 300-leaf tree verifies, and none verifies against
/// a neighbouring leaf or size.
#[test]
fn generated_proofs_verify_exhaustively() {
    let mut tree = MemoryTree::default();
    for i in 0..300u32 {
        tree.push(leaf_hash(&i.to_be_bytes()));
    }
    for size in [1u64, 2, 3, 7, 8, 9, 64, 100, 255, 256, 257, 300] {
        let root = tree.root_at(size);
        for index in 0..size {
            let leaf = leaf_hash(&(index as u32).to_be_bytes());
            let proof = inclusion_proof(&tree, index, size).unwrap();
            verify_inclusion(index, size, &leaf, &proof, &root).unwrap();
            if index + 1 < size {
                assert!(verify_inclusion(index + 1, size, &leaf, &proof, &root).is_err());
            }
        }
        for old in 1..=size {
            let proof = consistency_proof(&tree, old, size).unwrap();
            verify_consistency(old, size, &tree.root_at(old), &root, &proof).unwrap();
            if old > 0 && old < size {
                assert!(
                    verify_consistency(old, size, &tree.root_at(old - 1), &root, &proof).is_err()
                );
            }
        }
    }
}

/// The Merkle Tree Certificates draft's subtree proofs, also in the vector set.
#[test]
fn every_subtree_inclusion_vector() {
    let cases = files(&data_dir().join("subtreeinclusion"));
    assert!(cases.len() > 50, "vectors missing: {}", cases.len());
    for path in &cases {
        let case: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let want_err = case["wantErr"].as_bool().unwrap();
        let verdict = (|| {
            let root = STANDARD.decode(case["root"].as_str()?).ok()?;
            Some(
                twinguard_audit::merkle::verify_subtree_inclusion(
                    number(&case["leafIdx"])?,
                    number(&case["start"])?,
                    number(&case["end"])?,
                    &hash(&case["leafHash"])?,
                    &proof(&case["proof"])?,
                    &root,
                )
                .is_ok(),
            )
        })()
        .unwrap_or(false);
        assert_eq!(verdict, !want_err, "{}", path.display());
    }
}

#[test]
fn every_subtree_consistency_vector() {
    let cases = files(&data_dir().join("subtreeconsistency"));
    assert!(cases.len() > 50, "vectors missing: {}", cases.len());
    for path in &cases {
        let case: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let want_err = case["wantErr"].as_bool().unwrap();
        let verdict = (|| {
            let root1 = STANDARD.decode(case["root1"].as_str()?).ok()?;
            let root2 = STANDARD.decode(case["root2"].as_str()?).ok()?;
            Some(
                twinguard_audit::merkle::verify_subtree_consistency(
                    number(&case["start"])?,
                    number(&case["end"])?,
                    number(&case["size"])?,
                    &root1,
                    &root2,
                    &proof(&case["proof"])?,
                )
                .is_ok(),
            )
        })()
        .unwrap_or(false);
        assert_eq!(verdict, !want_err, "{}", path.display());
    }
}
