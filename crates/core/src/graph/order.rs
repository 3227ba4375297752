//! The order in which the graph's maps iterate, which is the order of query rows and of the
//! model list. A query's continuation token resumes at an offset into that order
//! (`query`, "Paging"), so every node of an instance must iterate a graph of the same twins in
//! the same order, whichever order it learnt them in and however often it restarted; otherwise
//! a client paging through a load balancer gets rows twice and misses others.
//!
//! The maps are hash tries, and a trie iterates in the order of its keys' hashes: with one hash
//! function on every node, the same keys iterate alike. That function is SipHash-1-3 under a key
//! the instance's nodes share ([`set_order_key`]): keyed, so that nobody can choose twin IDs
//! whose hashes collide and make lookups slow (the reason hash maps take a random key); shared,
//! so that the order is the instance's, not the process's. A process whose key was not set uses
//! a random one, as a hash map would.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use siphasher::sip::SipHasher13;

static ORDER_KEY: OnceLock<[u64; 2]> = OnceLock::new();

/// Sets the key of the graph's order for this process, before any graph is made. `false` if a
/// key was set (or a random one taken) before and this one differs: the first stays, since maps
/// already made depend on it (several instances in one process, as in tests).
pub fn set_order_key(key: [u8; 16]) -> bool {
    let mut halves = [0u64; 2];
    for (half, bytes) in halves.iter_mut().zip(key.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        *half = u64::from_le_bytes(word);
    }
    *ORDER_KEY.get_or_init(|| halves) == halves
}

/// The graph maps' hasher: SipHash-1-3 under the order key.
#[derive(Clone, Debug)]
pub struct OrderHasher {
    key: [u64; 2],
}

impl Default for OrderHasher {
    fn default() -> Self {
        let key = *ORDER_KEY.get_or_init(|| {
            // No key set: a random one, from the standard library's own random hash keys.
            let random = std::hash::RandomState::new();
            [random.hash_one(0u8), random.hash_one(1u8)]
        });
        Self { key }
    }
}

impl BuildHasher for OrderHasher {
    type Hasher = SipHasher13;

    fn build_hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_keys(self.key[0], self.key[1])
    }
}
