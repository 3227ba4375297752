//! This node's own writes to the records other nodes may change, as the rereads of those
//! records must see them.
//!
//! A reread (the change follower's, or a device's after a write of it failed) reads the store
//! without holding the state's lock, which ingestion waits for: a database far away, or cut
//! off, must not hold every message behind the read. What it read is taken under the lock, and
//! only for a record that no write of this node touched since the read began: such a write
//! was decided on the state and may have landed after the read, so what the read saw could be
//! older than what this node holds, and taking it would undo the write here. Those records are
//! handed back, to be read again once the write settled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use twinguard_core::store::Table;

type Key = (Table, String);

/// Writes of this node to tracked records: those queued and not yet settled, and, while a
/// reread is reading, when each record was last written.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    /// Writes queued, ever: the number of the last one.
    started: u64,
    records: HashMap<Key, Record>,
    /// Rereads between their start and the end of their apply; while there is one, a record
    /// whose writes all settled is kept, so a reread still sees that it was written.
    readers: usize,
}

#[derive(Debug, Default)]
struct Record {
    in_flight: u32,
    /// The number of the last write queued to the record.
    last: u64,
}

/// The lock, even if poisoned: nothing done under it panics midway.
fn lock(writes: &Mutex<Writes>) -> MutexGuard<'_, Writes> {
    writes.lock().unwrap_or_else(|e| e.into_inner())
}

/// This node's write to `keys`, from when it is queued (under the state's lock) until it
/// settles (committed, refused or dropped).
pub(crate) struct InFlight {
    writes: Arc<Mutex<Writes>>,
    keys: Vec<Key>,
}

impl InFlight {
    pub(crate) fn track(writes: Arc<Mutex<Writes>>, keys: Vec<Key>) -> Self {
        if !keys.is_empty() {
            let mut w = lock(&writes);
            w.started += 1;
            let number = w.started;
            for key in &keys {
                let record = w.records.entry(key.clone()).or_default();
                record.in_flight += 1;
                record.last = number;
            }
        }
        Self { writes, keys }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut w = lock(&self.writes);
        let keep = w.readers > 0;
        for key in self.keys.drain(..) {
            if let Some(record) = w.records.get_mut(&key) {
                record.in_flight = record.in_flight.saturating_sub(1);
                if record.in_flight == 0 && !keep {
                    w.records.remove(&key);
                }
            }
        }
    }
}

/// One reread, from before it reads the store until what it read is taken.
pub(crate) struct Reading {
    writes: Arc<Mutex<Writes>>,
    /// The number of the last write queued before the read began.
    since: u64,
}

impl Reading {
    pub(crate) fn begin(writes: Arc<Mutex<Writes>>) -> Self {
        let since = {
            let mut w = lock(&writes);
            w.readers += 1;
            w.started
        };
        Self { writes, since }
    }

    /// Whether a write of this node to the record is queued and not yet settled: not worth
    /// reading now.
    pub(crate) fn in_flight(&self, table: Table, key: &str) -> bool {
        lock(&self.writes)
            .records
            .get(&(table, key.to_owned()))
            .is_some_and(|r| r.in_flight > 0)
    }

    /// Whether what the read saw of the record may be older than what this node holds: a write
    /// of it is in flight, or was queued since the read began. Asked under the state's lock,
    /// under which every write is queued.
    pub(crate) fn written_since(&self, table: Table, key: &str) -> bool {
        lock(&self.writes)
            .records
            .get(&(table, key.to_owned()))
            .is_some_and(|r| r.in_flight > 0 || r.last > self.since)
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        let mut w = lock(&self.writes);
        w.readers -= 1;
        if w.readers == 0 {
            w.records.retain(|_, r| r.in_flight > 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Key {
        (Table::Devices, k.to_owned())
    }

    #[test]
    fn a_reread_sees_a_write_that_began_and_settled_while_it_read() {
        let writes = Arc::new(Mutex::new(Writes::default()));
        let reading = Reading::begin(writes.clone());
        drop(InFlight::track(writes.clone(), vec![key("d1")]));
        assert!(reading.written_since(Table::Devices, "d1"));
        assert!(!reading.in_flight(Table::Devices, "d1"));
        assert!(!reading.written_since(Table::Devices, "d2"));
        assert!(!reading.written_since(Table::Firmware, "d1"));
        drop(reading);
        // Nothing is kept once no reread runs.
        assert!(lock(&writes).records.is_empty());
    }

    #[test]
    fn a_write_settled_before_a_reread_began_does_not_hold_it() {
        let writes = Arc::new(Mutex::new(Writes::default()));
        let before = InFlight::track(writes.clone(), vec![key("d1")]);
        let reading = Reading::begin(writes.clone());
        assert!(reading.in_flight(Table::Devices, "d1"));
        assert!(reading.written_since(Table::Devices, "d1"));
        drop(before);
        assert!(!reading.written_since(Table::Devices, "d1"));
        // A later reread, begun after it settled, is not held by it either.
        let later = Reading::begin(writes.clone());
        assert!(!later.written_since(Table::Devices, "d1"));
    }

    #[test]
    fn a_record_written_twice_is_in_flight_until_both_settle() {
        let writes = Arc::new(Mutex::new(Writes::default()));
        let first = InFlight::track(writes.clone(), vec![key("d1")]);
        let second = InFlight::track(writes.clone(), vec![key("d1")]);
        drop(first);
        let reading = Reading::begin(writes.clone());
        assert!(reading.in_flight(Table::Devices, "d1"));
        drop(second);
        assert!(!reading.in_flight(Table::Devices, "d1"));
        drop(reading);
        assert!(lock(&writes).records.is_empty());
    }
}
