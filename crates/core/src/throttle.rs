//! Backoff for failed authentication (control AP-2).
//!
//! Failures are counted per source address and per account (the client ID or user name
//! presented, known or not). Each key gets a few free failures; after that every further failure
//! doubles the time the key must wait, up to a ceiling, and a key forgets its failures after a
//! quiet period. While a key waits, attempts are refused before any credential is checked, so
//! they neither count nor reveal anything.
//!
//! The account threshold is much higher than the address one. One address hammering an account
//! is held back by its own backoff long before the account's threshold is near, so the owner
//! still signs in at once from elsewhere; many addresses each failing a few times (a distributed
//! attack) reach the account threshold and slow every attempt on that account.

use std::collections::HashMap;
use std::hash::Hash;
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
    /// Keys tracked per kind. When the address table is full the oldest entry goes; when the
    /// account table is full, new accounts are not tracked (so nobody can flush an account's
    /// count by inventing names), while their addresses still are.
    pub capacity: usize,
}

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
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    last_failure: OffsetDateTime,
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

#[derive(Debug, Default)]
struct Tables {
    addresses: HashMap<IpAddr, Entry>,
    accounts: HashMap<String, Entry>,
}

pub struct Throttle {
    policy: Policy,
    clock: Arc<dyn Clock>,
    tables: Mutex<Tables>,
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
            tables: Mutex::new(Tables::default()),
        }
    }

    /// Whether an attempt from `address` on `account` may go ahead now.
    pub fn check(&self, address: IpAddr, account: &str) -> Result<(), RetryAfter> {
        let now = self.clock.now();
        let Ok(tables) = self.tables.lock() else {
            return Ok(());
        };
        let waits = [
            tables
                .addresses
                .get(&address)
                .and_then(|e| self.wait(e, self.policy.address_free, now)),
            tables
                .accounts
                .get(account)
                .and_then(|e| self.wait(e, self.policy.account_free, now)),
        ];
        match waits.into_iter().flatten().max() {
            Some(wait) => Err(RetryAfter(wait)),
            None => Ok(()),
        }
    }

    /// Records a failed attempt.
    pub fn failed(&self, address: IpAddr, account: &str) {
        let now = self.clock.now();
        let Ok(mut tables) = self.tables.lock() else {
            return;
        };
        let policy = &self.policy;
        bump(&mut tables.addresses, address, now, policy, true);
        bump(&mut tables.accounts, account.to_owned(), now, policy, false);
    }

    /// Records a successful attempt: the address starts afresh. The account keeps its count,
    /// so succeeding on one account cannot reset an attack on others.
    pub fn succeeded(&self, address: IpAddr) {
        if let Ok(mut tables) = self.tables.lock() {
            tables.addresses.remove(&address);
        }
    }

    /// The remaining wait of a key, if it has to wait at all.
    fn wait(&self, entry: &Entry, free: u32, now: OffsetDateTime) -> Option<Duration> {
        if now - entry.last_failure >= self.policy.forget_after || entry.failures < free {
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

fn bump<K: Eq + Hash>(
    table: &mut HashMap<K, Entry>,
    key: K,
    now: OffsetDateTime,
    policy: &Policy,
    evict: bool,
) {
    if let Some(entry) = table.get_mut(&key) {
        if now - entry.last_failure >= policy.forget_after {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = now;
        return;
    }
    if table.len() >= policy.capacity {
        table.retain(|_, e| now - e.last_failure < policy.forget_after);
    }
    if table.len() >= policy.capacity {
        if !evict {
            return;
        }
        // Drop the entries that failed longest ago.
        if let Some(oldest) = table.values().map(|e| e.last_failure).min() {
            table.retain(|_, e| e.last_failure > oldest);
        }
    }
    table.insert(
        key,
        Entry {
            failures: 1,
            last_failure: now,
        },
    );
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
            assert!(throttle.check(attacker, "victim").is_ok());
            throttle.failed(attacker, "victim");
        }
        let mut waits = Vec::new();
        for _ in 0..6 {
            let RetryAfter(wait) = throttle.check(attacker, "victim").unwrap_err();
            waits.push(wait.whole_seconds());
            clock.advance(wait);
            assert!(throttle.check(attacker, "victim").is_ok());
            throttle.failed(attacker, "victim");
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32]);
    }

    #[test]
    fn dozens_of_failures_from_one_address_do_not_stop_the_owner_elsewhere() {
        let (throttle, clock) = setup();
        let attacker = ip("10.0.0.1");
        for _ in 0..36 {
            if let Err(RetryAfter(wait)) = throttle.check(attacker, "victim") {
                clock.advance(wait);
            }
            throttle.failed(attacker, "victim");
        }
        assert!(throttle.check(attacker, "victim").is_err());
        assert!(
            throttle.check(ip("192.0.2.7"), "victim").is_ok(),
            "the owner is not locked out"
        );
    }

    #[test]
    fn a_distributed_attack_on_one_account_slows_every_attempt_on_it() {
        let (throttle, _clock) = setup();
        for i in 0..50u8 {
            let address = IpAddr::from([10, 1, 0, i]);
            throttle.failed(address, "victim");
        }
        assert!(
            throttle.check(ip("192.0.2.7"), "victim").is_err(),
            "the account now waits"
        );
        assert!(throttle.check(ip("192.0.2.7"), "someone-else").is_ok());
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_period_and_success_clears_the_address() {
        let (throttle, clock) = setup();
        let address = ip("10.0.0.2");
        for _ in 0..6 {
            throttle.failed(address, "a");
        }
        assert!(throttle.check(address, "b").is_err());
        clock.advance(Duration::minutes(61));
        assert!(throttle.check(address, "b").is_ok());
        for _ in 0..6 {
            throttle.failed(address, "a");
        }
        throttle.succeeded(address);
        assert!(throttle.check(address, "b").is_ok());
    }

    #[test]
    fn waits_never_exceed_the_ceiling_and_the_ceiling_does_not_reset_the_count() {
        let (throttle, clock) = setup();
        let address = ip("10.0.0.3");
        for _ in 0..200 {
            throttle.failed(address, "a");
        }
        let RetryAfter(wait) = throttle.check(address, "a").unwrap_err();
        assert!(wait <= Duration::minutes(15));
        clock.advance(wait);
        throttle.failed(address, "a");
        assert!(
            throttle.check(address, "a").is_err(),
            "one more failure waits the full ceiling again"
        );
    }

    #[test]
    fn invented_account_names_cannot_flush_a_tracked_account() {
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
            throttle.failed(IpAddr::from([10, 2, 0, i]), "victim");
        }
        for i in 0..100u32 {
            throttle.failed(IpAddr::from([10, 3, 0, 1]), &format!("junk-{i}"));
        }
        assert!(throttle.check(ip("192.0.2.7"), "victim").is_err());
    }
}
