//! Merkle tree hashing and proofs of RFC 9162 section 2.1 (the same as RFC 6962): leaves hash
//! as `SHA-256(0x00 || data)`, interior nodes as `SHA-256(0x01 || left || right)`, and a tree of
//! `n` leaves splits at the largest power of two below `n`.
//!
//! Proof generation reads node hashes through [`NodeSource`], so a log can serve proofs from
//! stored complete subtrees without holding the tree in memory. Verification follows the
//! algorithms of RFC 9162 sections 2.1.3.2 and 2.1.4.2 step by step.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Largest power of two strictly below `n` (`n` > 1).
fn split(n: u64) -> u64 {
    debug_assert!(n > 1);
    1 << (63 - (n - 1).leading_zeros())
}

/// Where proof generation reads hashes of complete, aligned subtrees: `level` 0 are leaf
/// hashes, and node `index` of `level` covers leaves `[index << level, (index + 1) << level)`.
pub trait NodeSource {
    fn node(&self, level: u32, index: u64) -> std::io::Result<Hash>;
}

/// The Merkle tree hash of leaves `[start, end)`, where `start` is a multiple of the largest
/// power of two not above `end - start` (true of every subtree a proof needs).
pub fn subtree_root(src: &dyn NodeSource, start: u64, end: u64) -> std::io::Result<Hash> {
    let n = end - start;
    if n == 0 {
        return Ok(empty_root());
    }
    if n.is_power_of_two() && start.is_multiple_of(n) {
        return src.node(n.trailing_zeros(), start >> n.trailing_zeros());
    }
    let k = split(n);
    let left = subtree_root(src, start, start + k)?;
    let right = subtree_root(src, start + k, end)?;
    Ok(node_hash(&left, &right))
}

/// The audit path of leaf `index` in the tree of `size` leaves (RFC 9162 2.1.3.1, `PATH`).
pub fn inclusion_proof(src: &dyn NodeSource, index: u64, size: u64) -> std::io::Result<Vec<Hash>> {
    let mut proof = Vec::new();
    path(src, index, 0, size, &mut proof)?;
    Ok(proof)
}

fn path(
    src: &dyn NodeSource,
    m: u64,
    start: u64,
    end: u64,
    out: &mut Vec<Hash>,
) -> std::io::Result<()> {
    let n = end - start;
    if n <= 1 {
        return Ok(());
    }
    let k = split(n);
    if m < k {
        path(src, m, start, start + k, out)?;
        out.push(subtree_root(src, start + k, end)?);
    } else {
        path(src, m - k, start + k, end, out)?;
        out.push(subtree_root(src, start, start + k)?);
    }
    Ok(())
}

/// The consistency proof between the trees of `old` and `new` leaves (RFC 9162 2.1.4.1).
pub fn consistency_proof(src: &dyn NodeSource, old: u64, new: u64) -> std::io::Result<Vec<Hash>> {
    let mut proof = Vec::new();
    if old > 0 && old < new {
        subproof(src, old, 0, new, true, &mut proof)?;
    }
    Ok(proof)
}

fn subproof(
    src: &dyn NodeSource,
    m: u64,
    start: u64,
    end: u64,
    complete: bool,
    out: &mut Vec<Hash>,
) -> std::io::Result<()> {
    let n = end - start;
    if m == n {
        if !complete {
            out.push(subtree_root(src, start, end)?);
        }
        return Ok(());
    }
    let k = split(n);
    if m <= k {
        subproof(src, m, start, start + k, complete, out)?;
        out.push(subtree_root(src, start + k, end)?);
    } else {
        subproof(src, m - k, start + k, end, false, out)?;
        out.push(subtree_root(src, start, start + k)?);
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the leaf index is not below the tree size")]
    IndexOutOfRange,
    #[error("the proof has the wrong length")]
    WrongLength,
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
    #[error("the old tree is larger than the new one")]
    SizesReversed,
    #[error("every tree extends the empty tree; a proof from it proves nothing")]
    EmptyOld,
}

/// Verifies that `leaf` is leaf `index` of the tree of `size` leaves with root `root`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange);
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return Err(ProofError::WrongLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongLength);
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Verifies that the tree of `old` leaves with root `old_root` is a prefix of the tree of `new`
/// leaves with root `new_root`. As in transparency-dev/merkle, a proof from the empty tree is
/// refused as meaningless, and equal sizes need an empty proof and equal roots (compared as
/// bytes).
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &[u8],
    new_root: &[u8],
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old > new {
        return Err(ProofError::SizesReversed);
    }
    if old == 0 {
        return Err(ProofError::EmptyOld);
    }
    if old == new {
        return if !proof.is_empty() {
            Err(ProofError::WrongLength)
        } else if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    let (Ok(old_root), Ok(new_root)) = (<&Hash>::try_from(old_root), <&Hash>::try_from(new_root))
    else {
        return Err(ProofError::RootMismatch);
    };
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let (mut fnode, mut snode) = (old - 1, new - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if snode == 0 {
            return Err(ProofError::WrongLength);
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongLength);
    }
    if &fr != old_root || &sr != new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Node hashes of a tree held in memory, for tests and the offline verifier.
#[derive(Debug, Default, Clone)]
pub struct MemoryTree {
    levels: Vec<Vec<Hash>>,
}

impl MemoryTree {
    pub fn push(&mut self, leaf: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf);
        let mut level = 0;
        while self.levels[level].len().is_multiple_of(2) {
            let row = &self.levels[level];
            let parent = node_hash(&row[row.len() - 2], &row[row.len() - 1]);
            if self.levels.len() == level + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[level + 1].push(parent);
            level += 1;
        }
    }

    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    pub fn root(&self) -> Hash {
        subtree_root(self, 0, self.size()).unwrap_or_else(|_| empty_root())
    }

    pub fn root_at(&self, size: u64) -> Hash {
        subtree_root(self, 0, size).unwrap_or_else(|_| empty_root())
    }
}

impl NodeSource for MemoryTree {
    fn node(&self, level: u32, index: u64) -> std::io::Result<Hash> {
        self.levels
            .get(level as usize)
            .and_then(|l| l.get(index as usize))
            .copied()
            .ok_or_else(|| std::io::Error::other("node not in the tree"))
    }
}

/// Whether `[start, end)` is a subtree in the sense of the Merkle Tree Certificates draft
/// (draft-ietf-plants-merkle-tree-certs, section 4.1): non-empty, and `start` a multiple of the
/// smallest power of two not below its size.
pub fn is_valid_subtree(start: u64, end: u64) -> bool {
    end > start
        && (start == 0
            || (end - start)
                .checked_next_power_of_two()
                .is_some_and(|ceil| start.is_multiple_of(ceil)))
}

/// Verifies that `leaf` is entry `index` of the subtree `[start, end)` whose hash is `root`
/// (the draft's section 4.3.3). A subtree is a tree of its own, so this is RFC 9162 inclusion
/// at the shifted index.
pub fn verify_subtree_inclusion(
    index: u64,
    start: u64,
    end: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &[u8],
) -> Result<(), ProofError> {
    if !is_valid_subtree(start, end) || index < start || index >= end {
        return Err(ProofError::IndexOutOfRange);
    }
    let root = <&Hash>::try_from(root).map_err(|_| ProofError::RootMismatch)?;
    verify_inclusion(index - start, end - start, leaf, proof, root)
}

/// Verifies that the subtree `[start, end)` with hash `subtree` is part of the tree of `size`
/// entries with root `root` (the draft's section 4.4.3). An empty interval is accepted only with
/// an empty proof and the empty tree's hash.
pub fn verify_subtree_consistency(
    start: u64,
    end: u64,
    size: u64,
    subtree: &[u8],
    root: &[u8],
    proof: &[Hash],
) -> Result<(), ProofError> {
    if start == end && end <= size {
        return if !proof.is_empty() {
            Err(ProofError::WrongLength)
        } else if subtree == empty_root() {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if !is_valid_subtree(start, end) || end > size {
        return Err(ProofError::IndexOutOfRange);
    }
    let (mut fnode, mut snode, mut tnode) = (start, end - 1, size - 1);
    let shift = |f: &mut u64, s: &mut u64, t: &mut u64| {
        *f >>= 1;
        *s >>= 1;
        *t >>= 1;
    };
    if snode == tnode {
        while fnode != snode {
            shift(&mut fnode, &mut snode, &mut tnode);
        }
    } else {
        while fnode != snode && snode & 1 == 1 {
            shift(&mut fnode, &mut snode, &mut tnode);
        }
    }
    let (mut fr, mut sr, rest): (Vec<u8>, Vec<u8>, &[Hash]) = if fnode == snode {
        (subtree.to_vec(), subtree.to_vec(), proof)
    } else {
        let (first, rest) = proof.split_first().ok_or(ProofError::WrongLength)?;
        (first.to_vec(), first.to_vec(), rest)
    };
    let node = |l: &[u8], r: &[u8]| -> Result<Vec<u8>, ProofError> {
        let (Ok(l), Ok(r)) = (<&Hash>::try_from(l), <&Hash>::try_from(r)) else {
            return Err(ProofError::RootMismatch);
        };
        Ok(node_hash(l, r).to_vec())
    };
    for c in rest {
        if tnode == 0 {
            return Err(ProofError::WrongLength);
        }
        if snode & 1 == 1 || snode == tnode {
            if fnode < snode {
                fr = node(c, &fr)?;
            }
            sr = node(c, &sr)?;
            while snode & 1 == 0 && fnode < snode {
                shift(&mut fnode, &mut snode, &mut tnode);
            }
        } else {
            sr = node(&sr, c)?;
        }
        shift(&mut fnode, &mut snode, &mut tnode);
    }
    if tnode != 0 {
        return Err(ProofError::WrongLength);
    }
    if fr != subtree || sr != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}
