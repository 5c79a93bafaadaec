//! The persisted retry table: when each failed fetch or pull is tried next.
//!
//! Lives in this node's `local` column family (never replicated): a
//! time-ordered index `R | due_ms | kind | subject` for "what is due next",
//! and `r | kind | subject` → [`RetryEntry`] for lookups. A restarted node
//! keeps its backoff schedule and attempt counts instead of hammering a DC
//! that was failing before the crash. The work itself (missing payloads,
//! feed cursors) is in the replicated state; this table only says *when*.
//! Writes are not fsynced: losing the last schedule change to a power cut
//! only makes one retry come early.

use std::time::Duration;

use mailbox_storage::{Batch, Cf, Store};
use serde::{Deserialize, Serialize};

use crate::{backoff, ReplicationError};

/// What is being retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryKind {
    /// Copying a message's segments (subject: message id bytes).
    Fetch,
    /// Pulling a remote DC's feed (subject: DC name).
    Pull,
}

impl RetryKind {
    fn tag(self) -> u8 {
        match self {
            RetryKind::Fetch => b'f',
            RetryKind::Pull => b'p',
        }
    }
}

/// The retry state of one subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryEntry {
    /// Failed attempts in a row.
    pub attempts: u32,
    /// When to try next, ms since the epoch.
    pub due_ms: i64,
    /// Why the last attempt failed.
    pub last_error: String,
}

/// Handle to the table (cheap to clone).
#[derive(Clone)]
pub struct RetryTable {
    store: Store,
}

fn entry_key(kind: RetryKind, subject: &[u8]) -> Vec<u8> {
    let mut k = vec![b'r', kind.tag()];
    k.extend_from_slice(subject);
    k
}

fn due_key(due_ms: i64, kind: RetryKind, subject: &[u8]) -> Vec<u8> {
    let mut k = vec![b'R'];
    k.extend_from_slice(&(due_ms.max(0) as u64).to_be_bytes());
    k.push(kind.tag());
    k.extend_from_slice(subject);
    k
}

fn local(e: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::Local(format!("retry table: {e}"))
}

impl RetryTable {
    /// The table in `store`'s local column family.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Current entry of a subject, if it is failing.
    pub fn get(
        &self,
        kind: RetryKind,
        subject: &[u8],
    ) -> Result<Option<RetryEntry>, ReplicationError> {
        self.store
            .get(Cf::Local, &entry_key(kind, subject))
            .map_err(local)?
            .map(|v| bincode::deserialize(&v).map_err(local))
            .transpose()
    }

    /// Records a failure at `now_ms` and schedules the next attempt with
    /// capped exponential backoff and jitter.
    pub fn record_failure(
        &self,
        kind: RetryKind,
        subject: &[u8],
        error: &str,
        now_ms: i64,
        base: Duration,
        cap: Duration,
    ) -> Result<RetryEntry, ReplicationError> {
        let prev = self.get(kind, subject)?;
        let attempts = prev.as_ref().map_or(0, |e| e.attempts) + 1;
        let wait = backoff(attempts, base, cap);
        let entry = RetryEntry {
            attempts,
            due_ms: now_ms + wait.as_millis() as i64,
            last_error: error.chars().take(512).collect(),
        };
        let mut b = Batch::new();
        if let Some(p) = &prev {
            b.delete(Cf::Local, due_key(p.due_ms, kind, subject));
        }
        b.put(Cf::Local, due_key(entry.due_ms, kind, subject), Vec::new());
        b.put(
            Cf::Local,
            entry_key(kind, subject),
            bincode::serialize(&entry).map_err(local)?,
        );
        self.store.write(b, false).map_err(local)?;
        Ok(entry)
    }

    /// The subject succeeded (or no longer needs work): forget it.
    pub fn clear(&self, kind: RetryKind, subject: &[u8]) -> Result<(), ReplicationError> {
        let Some(prev) = self.get(kind, subject)? else {
            return Ok(());
        };
        let mut b = Batch::new();
        b.delete(Cf::Local, due_key(prev.due_ms, kind, subject));
        b.delete(Cf::Local, entry_key(kind, subject));
        self.store.write(b, false).map_err(local)
    }

    /// Every failing subject of `kind`, at most `limit`.
    pub fn entries(
        &self,
        kind: RetryKind,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, RetryEntry)>, ReplicationError> {
        let prefix = [b'r', kind.tag()];
        self.store
            .scan(Cf::Local, &prefix, None, limit)
            .map_err(local)?
            .into_iter()
            .map(|(k, v)| Ok((k[2..].to_vec(), bincode::deserialize(&v).map_err(local)?)))
            .collect()
    }

    /// Makes every scheduled retry of `kind` due at `now_ms` (attempt counts
    /// stay): when a link comes back, work that backed off while it was down
    /// should not wait out the rest of a long backoff. Returns how many moved.
    pub fn expedite(
        &self,
        kind: RetryKind,
        now_ms: i64,
        limit: usize,
    ) -> Result<usize, ReplicationError> {
        let mut b = Batch::new();
        let mut moved = 0;
        for (subject, mut e) in self.entries(kind, limit)? {
            if e.due_ms <= now_ms {
                continue;
            }
            b.delete(Cf::Local, due_key(e.due_ms, kind, &subject));
            e.due_ms = now_ms;
            b.put(Cf::Local, due_key(e.due_ms, kind, &subject), Vec::new());
            b.put(
                Cf::Local,
                entry_key(kind, &subject),
                bincode::serialize(&e).map_err(local)?,
            );
            moved += 1;
        }
        if moved > 0 {
            self.store.write(b, false).map_err(local)?;
        }
        Ok(moved)
    }

    /// The earliest scheduled retry of any kind, ms since the epoch.
    pub fn next_due_ms(&self) -> Result<Option<i64>, ReplicationError> {
        Ok(self
            .store
            .scan(Cf::Local, b"R", None, 1)
            .map_err(local)?
            .first()
            .and_then(|(k, _)| k.get(1..9))
            .and_then(|b| b.try_into().ok())
            .map(|b| u64::from_be_bytes(b) as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_survives_reopen_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let t = RetryTable::new(Store::open(dir.path()).unwrap());
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(10));
        let e1 = t
            .record_failure(RetryKind::Fetch, b"m1", "boom", 1_000, base, cap)
            .unwrap();
        assert_eq!(e1.attempts, 1);
        let e2 = t
            .record_failure(RetryKind::Fetch, b"m1", "boom again", 2_000, base, cap)
            .unwrap();
        assert_eq!(e2.attempts, 2);
        assert!(e2.due_ms > 2_000 && e2.due_ms <= 2_000 + 400);
        t.record_failure(RetryKind::Pull, b"west", "refused", 1_500, base, cap)
            .unwrap();
        drop(t);
        // A restart keeps attempt counts and due times.
        let t = RetryTable::new(Store::open(dir.path()).unwrap());
        assert_eq!(t.get(RetryKind::Fetch, b"m1").unwrap(), Some(e2.clone()));
        let fetches = t.entries(RetryKind::Fetch, 10).unwrap();
        assert_eq!(fetches, vec![(b"m1".to_vec(), e2.clone())]);
        let next = t.next_due_ms().unwrap().unwrap();
        assert!(next <= e2.due_ms, "earliest of both kinds");
        // A healed link makes backed-off fetches due now; pulls untouched.
        assert_eq!(t.expedite(RetryKind::Fetch, 1_800, 10).unwrap(), 1);
        let e3 = t.get(RetryKind::Fetch, b"m1").unwrap().unwrap();
        assert_eq!((e3.attempts, e3.due_ms), (2, 1_800));
        // (the pull entry, due at 1_500 + at most 100 ms, is still earlier)
        assert!(t.next_due_ms().unwrap().unwrap() <= 1_800);
        assert_eq!(t.expedite(RetryKind::Fetch, 1_800, 10).unwrap(), 0);
        t.clear(RetryKind::Fetch, b"m1").unwrap();
        t.clear(RetryKind::Pull, b"west").unwrap();
        assert_eq!(t.get(RetryKind::Fetch, b"m1").unwrap(), None);
        assert_eq!(t.next_due_ms().unwrap(), None, "time index cleaned too");
    }

    #[test]
    fn backoff_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let t = RetryTable::new(Store::open(dir.path()).unwrap());
        let cap = Duration::from_secs(2);
        let mut e = None;
        for i in 0..40 {
            e = Some(
                t.record_failure(
                    RetryKind::Fetch,
                    b"x",
                    "e",
                    i,
                    Duration::from_millis(100),
                    cap,
                )
                .unwrap(),
            );
        }
        let e = e.unwrap();
        assert_eq!(e.attempts, 40);
        assert!(e.due_ms - 39 <= 2_000, "{e:?}");
    }
}
