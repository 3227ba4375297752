//! Rotating refresh tokens (OAuth 2.0 Security BCP, RFC 9700 section 4.14.2). Each login starts
//! a family; every refresh spends the presented token and issues the next one of the family.
//! A spent token presented again means two parties hold the family, so the whole family is
//! revoked. Tokens are 256-bit random strings stored only as SHA-256 digests; every change is
//! durable before the answer.
//!
//! Access tokens issued from a family name it (`sid`), so revoking the family ends them too,
//! not only the refresh tokens; and each family carries the person's session generation, so a
//! reset of their password or MFA ends it at once (see `Directory::principal`).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use twinguard_core::edit::{Edit, EditLock, FOLLOWER_WAIT};
use twinguard_core::identity::credentials::{random_secret, secret_digest};
use twinguard_core::store::{Expect, Mutation, Store, StoreError, Table};
use zeroize::Zeroizing;

use crate::tokens::now_secs;

/// A family's absolute lifetime: after it, the person logs in again.
pub const FAMILY_LIFETIME_SECS: u64 = 12 * 3_600;
/// Prefix that makes refresh tokens recognisable (and findable by secret scanners).
const PREFIX: &str = "tgr_";
/// Times a redemption reads its token again after another node changed it first.
const REDEEM_ATTEMPTS: usize = 4;

/// How often issuing a token also forgets expired families (a scan of every record).
const SWEEP_EVERY_SECS: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Status {
    Active,
    Spent,
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Record {
    family: String,
    subject: String,
    mfa: bool,
    auth_time: u64,
    family_expires: u64,
    status: Status,
    /// The subject's session generation when the family began.
    #[serde(default)]
    generation: u64,
}

/// A refresh token that was valid and is now spent.
#[derive(Debug, Clone)]
pub struct Valid {
    pub family: String,
    pub subject: String,
    pub mfa: bool,
    pub auth_time: u64,
    pub family_expires: u64,
    pub generation: u64,
}

/// A newly issued refresh token and the family it belongs to.
#[derive(Debug)]
pub struct IssuedRefresh {
    pub token: Zeroizing<String>,
    pub family: String,
}

/// What the token service needs to know of a family it starts or continues.
#[derive(Debug, Clone)]
pub struct Family {
    pub subject: String,
    pub mfa: bool,
    pub auth_time: u64,
    pub generation: u64,
    /// An existing family (ID, absolute expiry), or a new one.
    pub continues: Option<(String, u64)>,
}

#[derive(Debug)]
pub enum Redeemed {
    Valid(Valid),
    /// A spent token again: the family is now revoked.
    Reused {
        subject: String,
    },
    Invalid,
}

#[derive(Default)]
struct Records {
    by_digest: HashMap<String, Record>,
    /// Live families (not revoked) with their absolute expiry: an access token naming any
    /// other family is refused.
    live: HashMap<String, u64>,
    /// When expired families were last forgotten.
    swept_at: u64,
    /// Families revoked (a tombstone each, with the family's expiry), whatever tokens of them
    /// this node knows: a token another node issued in the family is refused too.
    revoked: HashMap<String, u64>,
}

/// The key of a revoked family's tombstone in `Table::RefreshTokens` (token digests are hex).
fn tombstone(family: &str) -> String {
    format!("{TOMBSTONE_PREFIX}{family}")
}

const TOMBSTONE_PREFIX: &str = "family\u{1f}";

impl Records {
    /// Whether each of `families` is live by what this node knows: a token of it not revoked,
    /// and no tombstone. One pass over the tokens whatever the number of families (a reload
    /// after the follower fell behind recomputes them all).
    fn recompute(&mut self, families: &std::collections::HashSet<String>) {
        let mut live: HashMap<&str, u64> = HashMap::new();
        for r in self.by_digest.values() {
            if r.status != Status::Revoked
                && families.contains(&r.family)
                && !self.revoked.contains_key(&r.family)
            {
                live.insert(r.family.as_str(), r.family_expires);
            }
        }
        let live: Vec<(String, u64)> = live.into_iter().map(|(f, e)| (f.to_owned(), e)).collect();
        for family in families {
            self.live.remove(family);
        }
        self.live.extend(live);
    }
}

pub struct RefreshTokens {
    store: Arc<dyn Store>,
    /// Read by every request of a session (`family_live`); changed by edits that let go of
    /// it while the store works (see `twinguard_core::edit`).
    records: EditLock<Records>,
}

fn to_json(record: &Record) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError(e.to_string()))
}

impl RefreshTokens {
    /// Loads the live tokens and forgets expired families.
    pub fn open(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let now = now_secs();
        let mut records = Records {
            swept_at: now,
            ..Records::default()
        };
        let mut expired = Vec::new();
        for (digest, bytes) in store.scan(Table::RefreshTokens)? {
            if let Some(family) = digest.strip_prefix(TOMBSTONE_PREFIX) {
                match std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    Some(expires) if expires > now => {
                        records.revoked.insert(family.to_owned(), expires);
                    }
                    _ => expired.push(Mutation::delete(Table::RefreshTokens, digest)),
                }
                continue;
            }
            match serde_json::from_slice::<Record>(&bytes) {
                Ok(r) if r.family_expires > now => {
                    if r.status != Status::Revoked {
                        records.live.insert(r.family.clone(), r.family_expires);
                    }
                    records.by_digest.insert(digest, r);
                }
                _ => expired.push(Mutation::delete(Table::RefreshTokens, digest)),
            }
        }
        if !expired.is_empty() {
            store.commit(&expired)?;
        }
        let families: Vec<String> = records.revoked.keys().cloned().collect();
        for family in families {
            records.live.remove(&family);
        }
        Ok(Self {
            store,
            records: EditLock::new(records),
        })
    }

    /// An edit of the families, in its turn.
    fn lock(&self) -> Result<Edit<'_, Records>, StoreError> {
        self.records.edit().map_err(|_| {
            StoreError("another refresh token change is still waiting for the store".into())
        })
    }

    /// Whether `family` is live: issued, not revoked, not expired.
    pub fn family_live(&self, family: &str) -> bool {
        let now = now_secs();
        self.records
            .read()
            .live
            .get(family)
            .is_some_and(|expires| *expires > now)
    }

    /// Issues a token of `family` (a new family unless it continues one).
    pub fn issue(&self, family: Family) -> Result<IssuedRefresh, StoreError> {
        let now = now_secs();
        let continued = family.continues.is_some();
        let (id, family_expires) = family
            .continues
            .unwrap_or_else(|| (uuid::Uuid::new_v4().to_string(), now + FAMILY_LIFETIME_SECS));
        let token = Zeroizing::new(format!("{PREFIX}{}", random_secret(32).as_str()));
        let digest = secret_digest(&token);
        let record = Record {
            family: id.clone(),
            subject: family.subject,
            mfa: family.mfa,
            auth_time: family.auth_time,
            family_expires,
            status: Status::Active,
            generation: family.generation,
        };
        let mut records = self.lock()?;
        let mut muts = vec![Mutation::put(
            Table::RefreshTokens,
            digest.clone(),
            to_json(&record)?,
        )];
        // Forget expired families now and then, so the table stays bounded without a scan of
        // every record under the lock at every login.
        let mut expired = Vec::new();
        if now.saturating_sub(records.swept_at) >= SWEEP_EVERY_SECS {
            expired = records
                .by_digest
                .iter()
                .filter(|(_, r)| r.family_expires <= now)
                .map(|(d, r)| (d.clone(), r.family.clone()))
                .collect();
            muts.extend(
                expired
                    .iter()
                    .map(|(d, _)| Mutation::delete(Table::RefreshTokens, d.clone())),
            );
        }
        // A family continued only if no node revoked it since its token was redeemed.
        let expect: Vec<Expect> = continued
            .then(|| Expect {
                table: Table::RefreshTokens,
                key: tombstone(&id),
                value: None,
            })
            .into_iter()
            .collect();
        if !records.unlocked(|| self.store.commit_expecting(&muts, &expect))? {
            records.revoked.insert(id.clone(), family_expires);
            records.live.remove(&id);
            return Err(StoreError("the refresh token family was revoked".into()));
        }
        if now.saturating_sub(records.swept_at) >= SWEEP_EVERY_SECS {
            records.swept_at = now;
        }
        for (d, f) in expired {
            records.by_digest.remove(&d);
            records.live.remove(&f);
        }
        records.live.insert(record.family.clone(), family_expires);
        records.by_digest.insert(digest, record);
        Ok(IssuedRefresh { token, family: id })
    }

    /// Spends `token`. See [`Redeemed`].
    pub fn redeem(&self, token: &str) -> Result<Redeemed, StoreError> {
        if !token.starts_with(PREFIX) {
            return Ok(Redeemed::Invalid);
        }
        let digest = secret_digest(token);
        // A token neither this node nor the store knows takes no turn: the grant needs no other
        // credential, so guesses must not wait behind an edit the store holds.
        if !self.known(&digest)? {
            return Ok(Redeemed::Invalid);
        }
        let mut records = self.lock()?;
        // Decided on the record as the store holds it, and spent only if it still holds that:
        // on a store that several nodes share, a token presented to two of them at once is
        // spent by one, and the other sees it spent (a reuse, which revokes the family).
        for _ in 0..REDEEM_ATTEMPTS {
            let stored = self.reread(&mut records, std::slice::from_ref(&digest))?;
            let Some(bytes) = stored.into_iter().next().flatten() else {
                return Ok(Redeemed::Invalid);
            };
            let Some(record) = records.by_digest.get(&digest).cloned() else {
                return Ok(Redeemed::Invalid);
            };
            // Revoked as a family on another node, whatever this token's own record says.
            self.reread(&mut records, &[tombstone(&record.family)])?;
            if record.family_expires <= now_secs() || records.revoked.contains_key(&record.family) {
                return Ok(Redeemed::Invalid);
            }
            match record.status {
                Status::Revoked => return Ok(Redeemed::Invalid),
                Status::Spent => {
                    self.revoke_family(&mut records, &record.family)?;
                    return Ok(Redeemed::Reused {
                        subject: record.subject,
                    });
                }
                Status::Active => {
                    let spent = Record {
                        status: Status::Spent,
                        ..record.clone()
                    };
                    let put = Mutation::put(Table::RefreshTokens, digest.clone(), to_json(&spent)?);
                    let expect = Expect {
                        table: Table::RefreshTokens,
                        key: digest.clone(),
                        value: Some(bytes),
                    };
                    let committed =
                        records.unlocked(|| self.store.commit_expecting(&[put], &[expect]))?;
                    if !committed {
                        continue;
                    }
                    records.by_digest.insert(digest, spent);
                    return Ok(Redeemed::Valid(Valid {
                        family: record.family,
                        subject: record.subject,
                        mfa: record.mfa,
                        auth_time: record.auth_time,
                        family_expires: record.family_expires,
                        generation: record.generation,
                    }));
                }
            }
        }
        Err(StoreError(
            "a refresh token kept changing while it was redeemed".into(),
        ))
    }

    /// Reads the records `digests` again from the store into `records` (a record now absent
    /// is forgotten), recomputes whether their families are live, and returns the stored bytes.
    /// Whether this node or the store holds a record under `digest`, without taking the turn.
    fn known(&self, digest: &str) -> Result<bool, StoreError> {
        if self.records.read().by_digest.contains_key(digest) {
            return Ok(true);
        }
        let stored = self
            .store
            .get_many(Table::RefreshTokens, &[digest.to_owned()])?;
        Ok(stored.iter().any(Option::is_some))
    }

    fn reread(
        &self,
        records: &mut Edit<'_, Records>,
        digests: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let stored = records.unlocked(|| self.store.get_many(Table::RefreshTokens, digests))?;
        let mut families = Vec::new();
        for (digest, bytes) in digests.iter().zip(&stored) {
            if let Some(family) = digest.strip_prefix(TOMBSTONE_PREFIX) {
                let expires = bytes
                    .as_deref()
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .and_then(|t| t.parse::<u64>().ok());
                match expires {
                    Some(expires) => records.revoked.insert(family.to_owned(), expires),
                    None => records.revoked.remove(family),
                };
                families.push(family.to_owned());
                continue;
            }
            if let Some(old) = records.by_digest.remove(digest) {
                families.push(old.family);
            }
            if let Some(record) = bytes
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Record>(b).ok())
            {
                families.push(record.family.clone());
                records.by_digest.insert(digest.clone(), record);
            }
        }
        records.recompute(&families.into_iter().collect());
        Ok(stored)
    }

    /// Reads the records `digests` again, as another node that shares the store changed them
    /// (see `twinguard_core::follow`): a family revoked there is refused here. While a change
    /// of this node holds the turn, returns the digests, to be handed again at the next step.
    pub fn changed(&self, digests: &[String]) -> Result<Vec<String>, StoreError> {
        let Ok(mut records) = self.records.edit_within(FOLLOWER_WAIT) else {
            return Ok(digests.to_vec());
        };
        self.reread(&mut records, digests)?;
        Ok(Vec::new())
    }

    /// Reads every record again (the follower fell behind the store's change log).
    pub fn reload(&self) -> Result<(), StoreError> {
        let mut records = self.lock()?;
        let mut digests: Vec<String> = records
            .unlocked(|| self.store.scan(Table::RefreshTokens))?
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        digests.extend(records.by_digest.keys().cloned());
        digests.sort_unstable();
        digests.dedup();
        self.reread(&mut records, &digests).map(|_| ())
    }

    /// Revokes the family of `token`; false if it is not one of ours.
    pub fn revoke(&self, token: &str) -> Result<bool, StoreError> {
        if !token.starts_with(PREFIX) {
            return Ok(false);
        }
        let digest = secret_digest(token);
        // Only a token of ours takes the turn: the revocation endpoint needs no credential, so
        // guesses must not wait behind a change the store holds. Ours means this node's or the
        // store's: a token another node issued a moment ago, which this node has not followed
        // yet, is revoked too.
        if !self.known(&digest)? {
            return Ok(false);
        }
        let mut records = self.lock()?;
        // Decided on the record as the store holds it (another node's family, or one revoked
        // there).
        self.reread(&mut records, std::slice::from_ref(&digest))?;
        let Some(family) = records.by_digest.get(&digest).map(|r| r.family.clone()) else {
            return Ok(false);
        };
        self.reread(&mut records, &[tombstone(&family)])?;
        self.revoke_family(&mut records, &family)?;
        Ok(true)
    }

    /// Revokes `family`; a family already revoked costs no commit (the revocation endpoint is
    /// unauthenticated).
    fn revoke_family(
        &self,
        records: &mut Edit<'_, Records>,
        family: &str,
    ) -> Result<(), StoreError> {
        let Some(expires) = records.live.get(family).copied() else {
            return Ok(());
        };
        // The tombstone revokes the tokens of the family that this node does not know yet.
        let mut muts = vec![Mutation::put(
            Table::RefreshTokens,
            tombstone(family),
            expires.to_string().into_bytes(),
        )];
        let mut changed = Vec::new();
        for (digest, r) in records.by_digest.iter() {
            if r.family == family && r.status != Status::Revoked {
                let revoked = Record {
                    status: Status::Revoked,
                    ..r.clone()
                };
                muts.push(Mutation::put(
                    Table::RefreshTokens,
                    digest.clone(),
                    to_json(&revoked)?,
                ));
                changed.push((digest.clone(), revoked));
            }
        }
        records.unlocked(|| self.store.commit(&muts))?;
        records.by_digest.extend(changed);
        records.revoked.insert(family.to_owned(), expires);
        records.live.remove(family);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use twinguard_core::store::MemoryStore;

    use super::*;

    fn family(
        subject: &str,
        mfa: bool,
        auth_time: u64,
        continues: Option<(String, u64)>,
    ) -> Family {
        Family {
            subject: subject.to_owned(),
            mfa,
            auth_time,
            generation: 0,
            continues,
        }
    }

    #[test]
    fn rotation_spends_each_token_and_reuse_revokes_the_family() {
        let store = Arc::new(MemoryStore::default());
        let tokens = RefreshTokens::open(store.clone()).unwrap();
        let first = tokens
            .issue(family("alice", true, 100, None))
            .unwrap()
            .token;
        let Redeemed::Valid(v) = tokens.redeem(&first).unwrap() else {
            unreachable!("a fresh token redeems")
        };
        assert_eq!(
            (v.subject.as_str(), v.mfa, v.auth_time),
            ("alice", true, 100)
        );
        let second = tokens
            .issue(family(
                "alice",
                true,
                100,
                Some((v.family.clone(), v.family_expires)),
            ))
            .unwrap()
            .token;
        // The attacker replays the first token: the family dies, including the second token.
        assert!(matches!(
            tokens.redeem(&first).unwrap(),
            Redeemed::Reused { .. }
        ));
        assert!(matches!(tokens.redeem(&second).unwrap(), Redeemed::Invalid));
        // Durable: a restart remembers the revocation.
        let reopened = RefreshTokens::open(store).unwrap();
        assert!(matches!(
            reopened.redeem(&second).unwrap(),
            Redeemed::Invalid
        ));
        assert!(matches!(
            reopened.redeem("tgr_unknown").unwrap(),
            Redeemed::Invalid
        ));
    }

    #[test]
    fn revoking_a_token_revokes_its_family_only() {
        let tokens = RefreshTokens::open(Arc::new(MemoryStore::default())).unwrap();
        let a = tokens.issue(family("alice", false, 1, None)).unwrap();
        let b = tokens.issue(family("alice", false, 1, None)).unwrap();
        assert!(tokens.family_live(&a.family));
        assert!(tokens.revoke(&a.token).unwrap());
        assert!(!tokens.family_live(&a.family), "its access tokens die too");
        assert!(tokens.family_live(&b.family));
        assert!(!tokens.family_live("never-issued"));
        let (a, b) = (a.token, b.token);
        assert!(!tokens.revoke("not ours").unwrap());
        assert!(matches!(tokens.redeem(&a).unwrap(), Redeemed::Invalid));
        assert!(matches!(tokens.redeem(&b).unwrap(), Redeemed::Valid(_)));
    }

    /// Every request of a person's session asks whether its family is live. A login, a
    /// refresh or a revocation whose commit waits for the store must not make them wait too:
    /// with the store stalled, one login would stop every session's requests on the node.
    #[test]
    fn sessions_are_checked_while_a_family_change_waits_for_the_store() {
        use std::time::Duration;
        use twinguard_core::store::stalling::StallingStore;

        type Change = fn(&RefreshTokens, &IssuedRefresh);
        let changes: [(&str, Change); 3] = [
            ("issue", |t, _| {
                t.issue(family("bob", false, 1, None)).unwrap();
            }),
            ("redeem", |t, live| {
                assert!(matches!(t.redeem(&live.token).unwrap(), Redeemed::Valid(_)));
            }),
            ("revoke", |t, live| {
                assert!(t.revoke(&live.token).unwrap());
            }),
        ];
        let mut waited = Vec::new();
        for (name, change) in changes {
            let store = Arc::new(StallingStore::default());
            let tokens = Arc::new(RefreshTokens::open(store.clone()).unwrap());
            let live = tokens.issue(family("alice", false, 1, None)).unwrap();
            let family = live.family.clone();
            store.stall();
            let changing = tokens.clone();
            let changer = std::thread::spawn(move || change(&changing, &live));
            assert!(store.wait_for_held(1, Duration::from_secs(10)), "{name}");
            let (answer, answered) = std::sync::mpsc::channel();
            let checking = tokens.clone();
            std::thread::spawn(move || answer.send(checking.family_live(&family)));
            if answered.recv_timeout(Duration::from_secs(5)) != Ok(true) {
                waited.push(name);
            }
            store.release();
            changer.join().unwrap();
        }
        assert!(waited.is_empty(), "sessions waited for: {waited:?}");
    }

    /// The revocation endpoint needs no credential and the refresh grant no other than the
    /// token: a token nobody issued is answered without waiting for a change the store holds,
    /// and so are the follower's keys (handed back, to be read at its next step).
    #[test]
    fn guesses_and_the_follower_do_not_wait_behind_a_change_the_store_holds() {
        use std::time::Duration;
        use twinguard_core::store::stalling::StallingStore;

        let store = Arc::new(StallingStore::default());
        let tokens = Arc::new(RefreshTokens::open(store.clone()).unwrap());
        let live = tokens.issue(family("alice", false, 1, None)).unwrap();
        let digest = secret_digest(&live.token);
        store.stall();
        let changing = tokens.clone();
        let changer = std::thread::spawn(move || changing.revoke(&live.token).unwrap());
        assert!(store.wait_for_held(1, Duration::from_secs(10)));
        let (answer, answered) = std::sync::mpsc::channel();
        let guessing = tokens.clone();
        std::thread::spawn(move || {
            let revoked = guessing.revoke("tgr_guessed").unwrap();
            let redeemed = guessing.redeem("tgr_guessed").unwrap();
            let handed_back = guessing.changed(std::slice::from_ref(&digest)).unwrap();
            let _ = answer.send((revoked, matches!(redeemed, Redeemed::Invalid), handed_back));
        });
        let (revoked, invalid, handed_back) = answered
            .recv_timeout(Duration::from_secs(5))
            .expect("a guess or the follower waited for the store");
        assert!(!revoked && invalid);
        assert_eq!(handed_back.len(), 1);
        store.release();
        assert!(changer.join().unwrap());
    }

    /// Two nodes on one shared store, each with the tokens in memory: a token presented to
    /// both at once is spent by exactly one; the other finds it spent (a reuse). With spending
    /// decided in each node's memory, both would redeem it.
    #[test]
    fn a_token_redeemed_on_two_nodes_at_once_is_spent_once() {
        let store = Arc::new(MemoryStore::shared());
        let a = RefreshTokens::open(store.clone()).unwrap();
        let tokens: Vec<_> = (0..100)
            .map(|_| a.issue(family("alice", false, 0, None)).unwrap().token)
            .collect();
        let b = RefreshTokens::open(store.clone()).unwrap();
        for (round, token) in tokens.iter().enumerate() {
            let barrier = std::sync::Barrier::new(2);
            let redeem = |node: &RefreshTokens| {
                barrier.wait();
                node.redeem(token).unwrap()
            };
            let (on_a, on_b) = std::thread::scope(|s| {
                let on_a = s.spawn(|| redeem(&a));
                let on_b = s.spawn(|| redeem(&b));
                (on_a.join().unwrap(), on_b.join().unwrap())
            });
            let valid = [&on_a, &on_b]
                .iter()
                .filter(|r| matches!(r, Redeemed::Valid(_)))
                .count();
            let reused = [&on_a, &on_b]
                .iter()
                .filter(|r| matches!(r, Redeemed::Reused { .. }))
                .count();
            assert_eq!((valid, reused), (1, 1), "round {round}");
        }
    }

    /// A family revoked on node A is refused on node B once B reads the changed records
    /// (what the change follower hands it), or reads them all.
    #[test]
    fn a_family_revoked_on_another_node_is_refused_once_read_again() {
        let store = Arc::new(MemoryStore::shared());
        let a = RefreshTokens::open(store.clone()).unwrap();
        let issued = a.issue(family("alice", false, 0, None)).unwrap();
        let other = a.issue(family("bob", false, 0, None)).unwrap();
        let b = RefreshTokens::open(store.clone()).unwrap();
        assert!(b.family_live(&issued.family) && b.family_live(&other.family));
        assert!(a.revoke(&issued.token).unwrap());
        assert!(b.family_live(&issued.family), "until B reads it again");
        b.changed(&[secret_digest(&issued.token)]).unwrap();
        assert!(!b.family_live(&issued.family));
        assert!(b.family_live(&other.family));
        assert!(a.revoke(&other.token).unwrap());
        b.reload().unwrap();
        assert!(!b.family_live(&other.family));
    }

    /// A token node A issued, revoked on node B before B's change follower handed B its record:
    /// B reads it from the store and revokes its family, so A refuses it. (B answered "not one
    /// of ours" and revoked nothing, while the client was told it was revoked.)
    #[test]
    fn a_token_revoked_on_a_node_that_has_not_followed_its_issue_is_revoked() {
        let store = Arc::new(MemoryStore::shared());
        let a = RefreshTokens::open(store.clone()).unwrap();
        let b = RefreshTokens::open(store.clone()).unwrap();
        let issued = a.issue(family("alice", false, 0, None)).unwrap();
        let other = a.issue(family("bob", false, 0, None)).unwrap();
        assert!(b.revoke(&issued.token).unwrap());
        assert!(matches!(
            a.redeem(&issued.token).unwrap(),
            Redeemed::Invalid
        ));
        assert!(!a.family_live(&issued.family));
        // Only that family: the other token of A's still redeems.
        assert!(matches!(
            a.redeem(&other.token).unwrap(),
            Redeemed::Valid(_)
        ));
        // And a guess is not one of ours on either node.
        assert!(!b.revoke("tgr_not-a-token-of-anyone").unwrap());
    }

    /// A stolen token reused on node B after node A rotated it: B revokes the whole family,
    /// including the token A issued, which B has never seen. A refuses that token at its next
    /// redemption without waiting to follow B, and its family's access tokens once it reads
    /// the tombstone. (B revoked only the tokens it knew, and A's stayed live.)
    #[test]
    fn a_reuse_on_one_node_revokes_tokens_of_the_family_another_node_issued() {
        let store = Arc::new(MemoryStore::shared());
        let a = RefreshTokens::open(store.clone()).unwrap();
        let first = a.issue(family("alice", false, 0, None)).unwrap();
        let b = RefreshTokens::open(store.clone()).unwrap();
        let Redeemed::Valid(v) = a.redeem(&first.token).unwrap() else {
            unreachable!("a fresh token redeems")
        };
        let second = a
            .issue(family(
                "alice",
                false,
                0,
                Some((v.family.clone(), v.family_expires)),
            ))
            .unwrap();
        assert!(matches!(
            b.redeem(&first.token).unwrap(),
            Redeemed::Reused { .. }
        ));
        assert!(a.family_live(&first.family), "until A reads the tombstone");
        assert!(matches!(
            a.redeem(&second.token).unwrap(),
            Redeemed::Invalid
        ));
        a.changed(&[tombstone(&first.family)]).unwrap();
        assert!(!a.family_live(&first.family));
        // And a node that starts now knows the family is revoked.
        let c = RefreshTokens::open(store).unwrap();
        assert!(!c.family_live(&first.family));
        assert!(matches!(
            c.redeem(&second.token).unwrap(),
            Redeemed::Invalid
        ));
    }
}
