//! Replay and reorder protection (control DI-2): a sliding window over each device's sequence
//! numbers, as IPsec's anti-replay window (RFC 4303 section 3.4.3), plus a timestamp acceptance
//! window. A sequence number is accepted once; one older than the window is refused because the
//! window can no longer tell whether it was seen.

use serde::{Deserialize, Serialize};

/// Sequence numbers remembered behind the highest one seen.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;
const STORED_FORMAT: u8 = 1;
const STORED_LEN: usize = 1 + 8 + WORDS * 8;
/// How far a message's time may be from the server's clock, either way.
pub const TIME_SKEW_MS: i64 = 5 * 60 * 1000;
/// How far a reading's own time may be after its message's time.
pub const READING_AHEAD_MS: i64 = 5_000;
/// A reading measured longer than this before it arrived is late: it enters the history,
/// marked late, and never moves the twin.
pub const LATE_AFTER_MS: i64 = TIME_SKEW_MS;
/// How far back a late reading may be measured (a device's store-and-forward buffer); older
/// readings are held for review.
pub const MAX_BACKFILL_MS: i64 = 7 * 24 * 3_600 * 1_000;

/// Why a sequence number or a time was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayReject {
    #[error("the sequence number was already accepted")]
    Replayed,
    #[error("the sequence number is older than the replay window")]
    TooOld,
    #[error("the message time is outside the acceptance window")]
    Time,
}

impl ReplayReject {
    pub fn code(self) -> &'static str {
        match self {
            Self::Replayed => "replay",
            Self::TooOld => "too_old",
            Self::Time => "timestamp",
        }
    }
}

/// One device's window: the highest sequence number accepted and a bitmap of the `WINDOW`
/// numbers at and below it (bit 0 is `highest`). It is stored in 137 bytes ([`Self::to_bytes`]);
/// it is rewritten with every batch its device sends, and the JSON form it had before 2026-12
/// took about 350.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayWindow {
    highest: u64,
    bits: [u64; WORDS],
}

impl ReplayWindow {
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Whether `seq` may be accepted; changes nothing.
    pub fn check(&self, seq: u64) -> Result<(), ReplayReject> {
        if seq == 0 {
            return Err(ReplayReject::TooOld);
        }
        if seq > self.highest {
            return Ok(());
        }
        let behind = self.highest - seq;
        if behind >= WINDOW {
            return Err(ReplayReject::TooOld);
        }
        if self.bit(behind) {
            Err(ReplayReject::Replayed)
        } else {
            Ok(())
        }
    }

    /// Checks `seq` and records it.
    pub fn accept(&mut self, seq: u64) -> Result<(), ReplayReject> {
        self.check(seq)?;
        if seq > self.highest {
            self.shift(seq - self.highest);
            self.highest = seq;
        }
        self.set(self.highest - seq, true);
        Ok(())
    }

    /// The stored form: a format byte (1), `highest`, then the bitmap words, little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STORED_LEN);
        out.push(STORED_FORMAT);
        out.extend_from_slice(&self.highest.to_le_bytes());
        for word in self.bits {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Reads [`Self::to_bytes`], or the JSON form of records written before it.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.first() == Some(&b'{') {
            return serde_json::from_slice(bytes).ok();
        }
        if bytes.len() != STORED_LEN || bytes[0] != STORED_FORMAT {
            return None;
        }
        let mut words = bytes[1..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()));
        let highest = words.next()?;
        let mut bits = [0; WORDS];
        for (slot, word) in bits.iter_mut().zip(words) {
            *slot = word;
        }
        Some(Self { highest, bits })
    }

    /// Takes back an acceptance that never became durable, so a retry of the same message is
    /// not refused as a replay.
    pub fn forget(&mut self, seq: u64) {
        if seq <= self.highest && self.highest - seq < WINDOW {
            self.set(self.highest - seq, false);
        }
    }

    fn bit(&self, behind: u64) -> bool {
        let (word, bit) = ((behind / 64) as usize, behind % 64);
        self.bits[word] >> bit & 1 == 1
    }

    fn set(&mut self, behind: u64, on: bool) {
        let (word, bit) = ((behind / 64) as usize, behind % 64);
        if on {
            self.bits[word] |= 1 << bit;
        } else {
            self.bits[word] &= !(1 << bit);
        }
    }

    /// Moves the window forward by `by` numbers: every remembered bit ages by `by`.
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.bits = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WORDS).rev() {
            let from = i.checked_sub(words);
            let high = from.map_or(0, |f| self.bits[f]);
            let low = from
                .and_then(|f| f.checked_sub(1))
                .map_or(0, |f| self.bits[f]);
            self.bits[i] = if bits == 0 {
                high
            } else {
                high << bits | low >> (64 - bits)
            };
        }
    }
}

/// Whether a message stamped `message_ms` may be accepted at `now_ms`.
pub fn check_time(message_ms: i64, now_ms: i64) -> Result<(), ReplayReject> {
    if message_ms.abs_diff(now_ms) > TIME_SKEW_MS.unsigned_abs() {
        Err(ReplayReject::Time)
    } else {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_form_gives_back_the_window_and_old_json_records_still_read() {
        let mut w = ReplayWindow::default();
        for seq in [5, 3, 1_000, 1_700, 1_701, 1_699] {
            w.accept(seq).unwrap();
        }
        let bytes = w.to_bytes();
        assert_eq!(bytes.len(), 137);
        let back = ReplayWindow::from_bytes(&bytes).unwrap();
        assert_eq!(back, w);
        assert_eq!(back.check(1_700), Err(ReplayReject::Replayed));
        assert_eq!(back.check(1_698), Ok(()));
        let json = serde_json::to_vec(&w).unwrap();
        assert_eq!(ReplayWindow::from_bytes(&json).unwrap(), w);
        assert_eq!(ReplayWindow::from_bytes(&bytes[..136]), None);
        let mut other = bytes.clone();
        other[0] = 2;
        assert_eq!(ReplayWindow::from_bytes(&other), None);
    }

    #[test]
    fn every_sequence_number_is_accepted_once() {
        let mut w = ReplayWindow::default();
        for seq in 1..=3000 {
            w.accept(seq).unwrap();
            assert_eq!(w.accept(seq), Err(ReplayReject::Replayed));
        }
    }

    #[test]
    fn reordering_inside_the_window_is_accepted_and_replays_are_not() {
        let mut w = ReplayWindow::default();
        let top = 5_000;
        w.accept(top).unwrap();
        w.accept(top - 10).unwrap();
        w.accept(top - WINDOW + 1).unwrap();
        assert_eq!(w.accept(top - 10), Err(ReplayReject::Replayed));
        assert_eq!(w.accept(top - WINDOW), Err(ReplayReject::TooOld));
        w.accept(top - 5).unwrap();
        w.accept(top + 400).unwrap();
        assert_eq!(w.accept(top - 5), Err(ReplayReject::Replayed));
        assert_eq!(w.accept(top), Err(ReplayReject::Replayed));
        w.accept(top - 1).unwrap();
    }

    #[test]
    fn the_window_agrees_with_a_set_of_everything_seen() {
        // A deterministic pseudo-random walk of sequence numbers, checked against a plain set.
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut top = 1u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let seq = if x.is_multiple_of(3) {
                top += x % 200;
                top
            } else {
                top.saturating_sub(x % 1_100).max(1)
            };
            let expected = if w.highest() >= WINDOW && seq <= w.highest() - WINDOW {
                Err(ReplayReject::TooOld)
            } else if seen.contains(&seq) {
                Err(ReplayReject::Replayed)
            } else {
                Ok(())
            };
            assert_eq!(
                w.accept(seq),
                expected,
                "seq {seq}, highest {}",
                w.highest()
            );
            if expected.is_ok() {
                seen.insert(seq);
            }
        }
    }

    #[test]
    fn a_forgotten_number_can_be_accepted_again() {
        let mut w = ReplayWindow::default();
        w.accept(7).unwrap();
        w.forget(7);
        w.accept(7).unwrap();
        assert_eq!(w.accept(7), Err(ReplayReject::Replayed));
    }

    #[test]
    fn the_window_survives_its_stored_form() {
        let mut w = ReplayWindow::default();
        for seq in [5, 9, 700, 1500, 1499] {
            w.accept(seq).unwrap();
        }
        let back: ReplayWindow = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(back, w);
        assert_eq!(back.check(1499), Err(ReplayReject::Replayed));
    }

    #[test]
    fn sequence_zero_and_far_times_are_refused() {
        assert_eq!(ReplayWindow::default().check(0), Err(ReplayReject::TooOld));
        let now = 1_800_000_000_000;
        assert!(check_time(now + TIME_SKEW_MS, now).is_ok());
        assert_eq!(
            check_time(now - TIME_SKEW_MS - 1, now),
            Err(ReplayReject::Time)
        );
        assert_eq!(check_time(i64::MIN, now), Err(ReplayReject::Time));
    }
}
