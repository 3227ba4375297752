//! Backoff for failed secret checks (control AP-2): the one throttle every check of a secret
//! goes through (passwords at login and at change, TOTP and recovery codes, enrolment codes,
//! client secrets, client assertions and certificates, API keys).
//!
//! Failures are counted per source address (an IPv6 address by its /64, which one host
//! usually holds whole) and per account (the client ID, key ID or user name presented, known or
//! not). Each key gets a few free failures; after that every further failure doubles the time
//! the key must wait, up to a ceiling, and a key forgets its failures after a quiet period.
//! While a key waits, attempts are refused before any secret is checked, so they neither count
//! nor reveal anything. A success clears nothing: an attacker who holds one valid credential
//! cannot use it to wipe the failures of its address or of other accounts.
//!
//! The account threshold is much higher than the address one. One address hammering an account
//! is held back by its own backoff long before the account's threshold is near, so the owner
//! still signs in at once from elsewhere; many addresses each failing a few times (a distributed
//! attack) reach the account threshold and slow every attempt on that account.
//!
//! Memory is bounded and tracking never stops. Each kind of key is counted exactly in a table of
//! `capacity` entries; once it is full (after forgetting quiet entries), further keys are counted
//! in a count-min sketch of fixed size, which can only over-count. Nothing is evicted early, so
//! nobody can flush a key's count by inventing addresses or account names.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use time::{Duration, OffsetDateTime};

use crate::clock::Clock;

#[derive(Debug, Clone)]
pub struct Policy {
    /// Failures from one address before it has to wait.
    pub address_free: u32,
    /// Failures on one account, from anywhere, before every attempt on it has to wait.
    pub account_free: u32,
    /// The first wait; each further failure doubles it.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
    /// A key with no failure for this long starts afresh.
    pub forget_after: Duration,
    /// Keys counted exactly per kind; more are counted in the overflow sketch.
    pub capacity: usize,
    /// Cells per row of the overflow sketch (it has [`SKETCH_ROWS`] rows).
    pub sketch_width: usize,
}

/// Rows of the overflow sketch; a key is over-counted only if it collides in every row.
pub const SKETCH_ROWS: usize = 4;

impl Default for Policy {
    fn default() -> Self {
        Self {
            address_free: 5,
            account_free: 50,
            base: Duration::seconds(1),
            max: Duration::minutes(15),
            // Longer than `max`, so that waiting out the longest wait does not also wipe the
            // count: a persistent attacker keeps one attempt per `max`.
            forget_after: Duration::hours(1),
            capacity: 100_000,
            // 4 x 65,536 cells of 16 bytes: 4 MiB per kind of key.
            sketch_width: 1 << 16,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: OffsetDateTime,
}

impl Entry {
    const EMPTY: Entry = Entry {
        failures: 0,
        last_failure: OffsetDateTime::UNIX_EPOCH,
    };

    fn bump(&mut self, now: OffsetDateTime, forget_after: Duration) {
        if now - self.last_failure >= forget_after {
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        self.last_failure = now;
    }

    /// The entry as of `now`: empty once forgotten.
    fn current(self, now: OffsetDateTime, forget_after: Duration) -> Entry {
        if now - self.last_failure >= forget_after {
            Entry::EMPTY
        } else {
            self
        }
    }
}

/// How long a refused attempt must wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds, rounded up, for a `Retry-After` header.
    pub fn seconds(self) -> i64 {
        let whole = self.0.whole_seconds();
        if self.0 > Duration::seconds(whole) {
            whole + 1
        } else {
            whole.max(1)
        }
    }
}

/// Failure counts for one kind of key: exact up to `capacity`, then a count-min sketch.
#[derive(Debug)]
struct Counts<K> {
    exact: HashMap<K, Entry>,
    sketch: Vec<Entry>,
    hashers: [RandomState; SKETCH_ROWS],
}

impl<K: Eq + Hash> Counts<K> {
    fn new() -> Self {
        Self {
            exact: HashMap::new(),
            sketch: Vec::new(),
            hashers: std::array::from_fn(|_| RandomState::new()),
        }
    }

    fn cells(&self, key: &K, width: usize) -> [usize; SKETCH_ROWS] {
        let width = width.max(1);
        std::array::from_fn(|row| {
            let h = self.hashers[row].hash_one(key);
            row * width + (h % width as u64) as usize
        })
    }

    /// The key's failures as of `now`: its exact entry, or the sketch's estimate (the smallest
    /// count among its cells, which is never below the truth).
    fn get(&self, key: &K, now: OffsetDateTime, policy: &Policy) -> Entry {
        if let Some(entry) = self.exact.get(key) {
            return entry.current(now, policy.forget_after);
        }
        if self.sketch.is_empty() {
            return Entry::EMPTY;
        }
        self.cells(key, policy.sketch_width)
            .iter()
            .filter_map(|&i| self.sketch.get(i))
            .map(|e| e.current(now, policy.forget_after))
            .min_by_key(|e| e.failures)
            .unwrap_or(Entry::EMPTY)
    }

    fn bump(&mut self, key: K, now: OffsetDateTime, policy: &Policy) {
        if let Some(entry) = self.exact.get_mut(&key) {
            entry.bump(now, policy.forget_after);
            return;
        }
        if self.exact.len() >= policy.capacity {
            self.exact
                .retain(|_, e| now - e.last_failure < policy.forget_after);
        }
        if self.exact.len() < policy.capacity {
            let mut entry = Entry::EMPTY;
            entry.bump(now, policy.forget_after);
            self.exact.insert(key, entry);
            return;
        }
        if self.sketch.is_empty() {
            self.sketch = vec![Entry::EMPTY; SKETCH_ROWS * policy.sketch_width.max(1)];
        }
        for i in self.cells(&key, policy.sketch_width) {
            if let Some(cell) = self.sketch.get_mut(i) {
                cell.bump(now, policy.forget_after);
            }
        }
    }
}

/// The source an address is counted under: IPv4 as it is, IPv6 by its /64 (which one host
/// usually holds whole), an IPv4-mapped IPv6 address as its IPv4 address. Shared by every
/// per-source limit (this throttle, the connection caps).
pub fn source_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
        },
    }
}

/// The name an address's failures are published under for the other nodes (beside accounts,
/// which are `user:`, `key:`...): `addr:` and its [`source_key`].
pub fn address_account(address: IpAddr) -> String {
    format!("addr:{}", source_key(address))
}

#[derive(Debug)]
struct Tables {
    addresses: Counts<IpAddr>,
    accounts: Counts<String>,
}

pub struct Throttle {
    policy: Policy,
    clock: Arc<dyn Clock>,
    tables: Mutex<Tables>,
    /// Failures on accounts and addresses ([`address_account`]) counted by other nodes that
    /// share the store (and by this node's earlier runs), as they published them: account,
    /// then node.
    remote: Mutex<HashMap<String, HashMap<String, Entry>>>,
    /// Accounts and addresses whose failures changed here since they were last published.
    unpublished: Mutex<std::collections::HashSet<String>>,
}

/// Accounts waiting to be published at most; beyond, further ones are counted here only until
/// the next publication (which drains the set every 200 ms).
const MAX_UNPUBLISHED: usize = 100_000;

/// An account's failures as one node counted them: how many, and the last one's Unix time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub failures: u32,
    pub last_failure: i64,
}

impl Published {
    /// `failures,last_failure`, as stored.
    pub fn to_bytes(self) -> Vec<u8> {
        format!("{},{}", self.failures, self.last_failure).into_bytes()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (failures, last) = text.split_once(',')?;
        Some(Self {
            failures: failures.parse().ok()?,
            last_failure: last.parse().ok()?,
        })
    }
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Throttle {
    pub fn new(policy: Policy, clock: Arc<dyn Clock>) -> Self {
        Self {
            policy,
            clock,
            tables: Mutex::new(Tables {
                addresses: Counts::new(),
                accounts: Counts::new(),
            }),
            remote: Mutex::new(HashMap::new()),
            unpublished: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Takes in `node`'s published failures on `account` (`None`: it has none any more).
    pub fn set_remote(&self, node: &str, account: &str, published: Option<Published>) {
        let Ok(mut remote) = self.remote.lock() else {
            return;
        };
        match published {
            Some(p) => {
                let entry = Entry {
                    failures: p.failures,
                    last_failure: OffsetDateTime::from_unix_timestamp(p.last_failure)
                        .unwrap_or(OffsetDateTime::UNIX_EPOCH),
                };
                remote
                    .entry(account.to_owned())
                    .or_default()
                    .insert(node.to_owned(), entry);
            }
            None => {
                if let Some(nodes) = remote.get_mut(account) {
                    nodes.remove(node);
                    if nodes.is_empty() {
                        remote.remove(account);
                    }
                }
            }
        }
    }

    /// The accounts whose failures changed here since the last call, with this node's count of
    /// each (`None` once forgotten), for the other nodes.
    pub fn take_unpublished(&self) -> Vec<(String, Option<Published>)> {
        let accounts: Vec<String> = match self.unpublished.lock() {
            Ok(mut set) => set.drain().collect(),
            Err(_) => return Vec::new(),
        };
        let now = self.clock.now();
        let Ok(tables) = self.tables.lock() else {
            return Vec::new();
        };
        accounts
            .into_iter()
            .map(|account| {
                let entry = match account
                    .strip_prefix("addr:")
                    .and_then(|a| a.parse::<IpAddr>().ok())
                {
                    Some(address) => tables.addresses.get(&address, now, &self.policy),
                    None => tables.accounts.get(&account, now, &self.policy),
                };
                let published = (entry.failures > 0).then(|| Published {
                    failures: entry.failures,
                    last_failure: entry.last_failure.unix_timestamp(),
                });
                (account, published)
            })
            .collect()
    }

    /// Marks `accounts` to be published again at the next [`Throttle::take_unpublished`] (ones
    /// a publication left for later).
    pub fn publish_later(&self, accounts: impl IntoIterator<Item = String>) {
        if let Ok(mut unpublished) = self.unpublished.lock() {
            for account in accounts {
                if unpublished.len() >= MAX_UNPUBLISHED {
                    return;
                }
                unpublished.insert(account);
            }
        }
    }

    /// An account's failures here plus those the other nodes published, not yet forgotten.
    fn with_remote(&self, account: &str, local: Entry, now: OffsetDateTime) -> Entry {
        let Ok(remote) = self.remote.lock() else {
            return local;
        };
        let Some(nodes) = remote.get(account) else {
            return local;
        };
        nodes
            .values()
            .map(|e| e.current(now, self.policy.forget_after))
            .fold(local, |sum, e| Entry {
                failures: sum.failures.saturating_add(e.failures),
                last_failure: sum.last_failure.max(e.last_failure),
            })
    }

    /// Whether an attempt from `address` on `account` (if it names one) may go ahead now. A
    /// poisoned lock refuses: the throttle fails closed.
    pub fn check(&self, address: IpAddr, account: Option<&str>) -> Result<(), RetryAfter> {
        let now = self.clock.now();
        let Ok(tables) = self.tables.lock() else {
            return Err(RetryAfter(self.policy.base));
        };
        let policy = &self.policy;
        let by_address = {
            let local = tables.addresses.get(&source_key(address), now, policy);
            self.with_remote(&address_account(address), local, now)
        };
        let by_account = account.map(|a| {
            let local = tables.accounts.get(&a.to_owned(), now, policy);
            self.with_remote(a, local, now)
        });
        let waits = [
            self.wait(by_address, policy.address_free, now),
            by_account.and_then(|e| self.wait(e, policy.account_free, now)),
        ];
        match waits.into_iter().flatten().max() {
            Some(wait) => Err(RetryAfter(wait)),
            None => Ok(()),
        }
    }

    /// Records a failed attempt.
    pub fn failed(&self, address: IpAddr, account: Option<&str>) {
        let now = self.clock.now();
        let Ok(mut tables) = self.tables.lock() else {
            return;
        };
        let policy = &self.policy;
        tables.addresses.bump(source_key(address), now, policy);
        let Ok(mut unpublished) = self.unpublished.lock() else {
            return;
        };
        if unpublished.len() < MAX_UNPUBLISHED {
            unpublished.insert(address_account(address));
        }
        if let Some(account) = account {
            tables.accounts.bump(account.to_owned(), now, policy);
            if unpublished.len() < MAX_UNPUBLISHED {
                unpublished.insert(account.to_owned());
            }
        }
    }

    /// The remaining wait of a key, if it has to wait at all.
    fn wait(&self, entry: Entry, free: u32, now: OffsetDateTime) -> Option<Duration> {
        if entry.failures < free {
            return None;
        }
        let doublings = (entry.failures - free).min(30);
        let delay = self
            .policy
            .base
            .checked_mul(1 << doublings)
            .unwrap_or(self.policy.max)
            .min(self.policy.max);
        let until = entry.last_failure + delay;
        (until > now).then(|| until - now)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;

    /// A clock the test moves by hand.
    struct ManualClock(StdMutex<OffsetDateTime>);

    impl ManualClock {
        fn advance(&self, by: Duration) {
            if let Ok(mut now) = self.0.lock() {
                *now += by;
            }
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> OffsetDateTime {
            self.0
                .lock()
                .map(|t| *t)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH)
        }
    }

    fn setup() -> (Throttle, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock(StdMutex::new(
            OffsetDateTime::UNIX_EPOCH + Duration::days(20_000),
        )));
        (Throttle::new(Policy::default(), clock.clone()), clock)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_gets_a_few_free_failures_then_exponentially_longer_waits() {
        let (throttle, clock) = setup();
        let attacker = ip("10.0.0.1");
        for _ in 0..5 {
            assert!(throttle.check(attacker, Some("victim")).is_ok());
            throttle.failed(attacker, Some("victim"));
        }
        let mut waits = Vec::new();
        for _ in 0..6 {
            let RetryAfter(wait) = throttle.check(attacker, Some("victim")).unwrap_err();
            waits.push(wait.whole_seconds());
            clock.advance(wait);
            assert!(throttle.check(attacker, Some("victim")).is_ok());
            throttle.failed(attacker, Some("victim"));
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32]);
    }

    #[test]
    fn dozens_of_failures_from_one_address_do_not_stop_the_owner_elsewhere() {
        let (throttle, clock) = setup();
        let attacker = ip("10.0.0.1");
        for _ in 0..36 {
            if let Err(RetryAfter(wait)) = throttle.check(attacker, Some("victim")) {
                clock.advance(wait);
            }
            throttle.failed(attacker, Some("victim"));
        }
        assert!(throttle.check(attacker, Some("victim")).is_err());
        assert!(
            throttle.check(ip("192.0.2.7"), Some("victim")).is_ok(),
            "the owner is not locked out"
        );
    }

    #[test]
    fn a_distributed_attack_on_one_account_slows_every_attempt_on_it() {
        let (throttle, _clock) = setup();
        for i in 0..50u8 {
            let address = IpAddr::from([10, 1, 0, i]);
            throttle.failed(address, Some("victim"));
        }
        assert!(
            throttle.check(ip("192.0.2.7"), Some("victim")).is_err(),
            "the account now waits"
        );
        assert!(
            throttle
                .check(ip("192.0.2.7"), Some("someone-else"))
                .is_ok()
        );
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_period() {
        let (throttle, clock) = setup();
        let address = ip("10.0.0.2");
        for _ in 0..6 {
            throttle.failed(address, Some("a"));
        }
        assert!(throttle.check(address, Some("b")).is_err());
        clock.advance(Duration::minutes(61));
        assert!(throttle.check(address, Some("b")).is_ok());
    }

    #[test]
    fn waits_never_exceed_the_ceiling_and_the_ceiling_does_not_reset_the_count() {
        let (throttle, clock) = setup();
        let address = ip("10.0.0.3");
        for _ in 0..200 {
            throttle.failed(address, Some("a"));
        }
        let RetryAfter(wait) = throttle.check(address, Some("a")).unwrap_err();
        assert!(wait <= Duration::minutes(15));
        clock.advance(wait);
        throttle.failed(address, Some("a"));
        assert!(
            throttle.check(address, Some("a")).is_err(),
            "one more failure waits the full ceiling again"
        );
    }

    #[test]
    fn invented_account_names_cannot_flush_a_tracked_account_and_overflow_is_still_counted() {
        let clock = Arc::new(ManualClock(StdMutex::new(
            OffsetDateTime::UNIX_EPOCH + Duration::days(20_000),
        )));
        let policy = Policy {
            capacity: 10,
            account_free: 3,
            ..Policy::default()
        };
        let throttle = Throttle::new(policy, clock);
        for i in 0..3u8 {
            throttle.failed(IpAddr::from([10, 2, 0, i]), Some("victim"));
        }
        for i in 0..100u32 {
            throttle.failed(IpAddr::from([10, 3, 0, 1]), Some(&format!("junk-{i}")));
        }
        assert!(throttle.check(ip("192.0.2.7"), Some("victim")).is_err());
        // The table is full, yet an account first seen now is counted (in the sketch).
        for i in 0..3u8 {
            throttle.failed(IpAddr::from([10, 4, 0, i]), Some("late-victim"));
        }
        assert!(
            throttle
                .check(ip("192.0.2.7"), Some("late-victim"))
                .is_err()
        );
        assert!(throttle.check(ip("192.0.2.8"), Some("never-tried")).is_ok());
    }

    #[test]
    fn overflowing_addresses_are_counted_and_cannot_flush_an_attacker() {
        let clock = Arc::new(ManualClock(StdMutex::new(
            OffsetDateTime::UNIX_EPOCH + Duration::days(20_000),
        )));
        let policy = Policy {
            capacity: 8,
            sketch_width: 1024,
            ..Policy::default()
        };
        let throttle = Throttle::new(policy, clock);
        let attacker = ip("10.9.9.9");
        for _ in 0..6 {
            throttle.failed(attacker, None);
        }
        // A botnet fills the table and far past it.
        for i in 0..5_000u32 {
            throttle.failed(IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()), None);
        }
        assert!(throttle.check(attacker, None).is_err(), "not flushed");
        let newcomer = ip("172.16.0.1");
        for _ in 0..6 {
            throttle.failed(newcomer, None);
        }
        assert!(
            throttle.check(newcomer, None).is_err(),
            "counted past capacity"
        );
    }

    #[test]
    fn an_ipv6_host_cannot_dodge_the_backoff_by_changing_its_interface_id() {
        let (throttle, _clock) = setup();
        for i in 0..6u16 {
            let address = IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i]);
            throttle.failed(address, None);
        }
        let sibling = IpAddr::from([0x2001, 0xdb8, 0, 1, 0xdead, 0xbeef, 0, 99]);
        assert!(throttle.check(sibling, None).is_err());
        let other_network = IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]);
        assert!(throttle.check(other_network, None).is_ok());
    }
}
