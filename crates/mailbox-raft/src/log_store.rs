//! The Raft log in RocksDB.
//!
//! Entries live in [`Cf::Log`] under their big-endian index; the vote, the
//! committed id and the purge point live in [`Cf::Raft`]. Durability rule:
//! `append` fsyncs the WAL before calling `log_io_completed`, `save_vote`
//! fsyncs before returning, and `purge` drops entries only once the state
//! they produced is applied *and* durable: the state machine writes skip
//! the WAL (this log is their write-ahead log), so `purge` flushes the
//! state's memtable first unless a snapshot build already did, and waits
//! for the state to apply what it drops (openraft purges behind a snapshot
//! it is still installing; a crash then would leave a state older than the
//! log's start, and a node that cannot restart).
//!
//! `append` writes the entries without syncing (so they are readable at
//! once, as openraft requires) and hands the completion callback to the
//! node's WAL flusher thread, which fsyncs the WAL and only then reports the
//! entries durable. While one fsync runs, later appends queue up and the
//! next fsync covers them all (group commit at the WAL), and neither the
//! Raft core nor the async runtime's worker threads wait on the disk: a
//! leader sends entries to its followers while its own fsync is under way.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use mailbox_storage::{index_key, Batch, Cf, Store};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};

use crate::{NodeId, StorageError, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last-purged";

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

/// Most appends waiting for the flusher before `append` itself waits.
const FLUSH_QUEUE: usize = 4096;

/// The Raft log of one node. Cheap to clone; clones share the database and
/// the WAL flusher.
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Store,
    /// What `purge` needs to know of the state machine; `None` in
    /// openraft's storage suite (which purges entries it never applied),
    /// where every purge flushes.
    state: Option<StateDurability>,
    flusher: std::sync::Arc<Flusher>,
    /// Bytes appended since this process started (what triggers a
    /// snapshot by size; see `RaftTuning::snapshot_log_bytes`).
    appended: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The WAL flusher thread and its queue. Dropping the last handle closes
/// the queue and joins the thread, so the thread's database handle is gone
/// before the owner's: the database never closes on a detached thread
/// (racing process exit, which aborts inside RocksDB).
#[derive(Debug)]
struct Flusher {
    tx: Option<std::sync::mpsc::SyncSender<LogFlushed<TypeConfig>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The state machine's apply and durability marks, as `LogStore::purge`
/// reads them.
#[derive(Debug, Clone)]
pub struct StateDurability {
    /// The last applied log index.
    pub(crate) applied: tokio::sync::watch::Receiver<u64>,
    /// One past the last log index whose state is known to be in table
    /// files or synced (0: none known).
    pub(crate) durable: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// How long a purge waits for the state to apply what it drops.
    pub(crate) wait: std::time::Duration,
}

impl LogStore {
    /// A log store over `store`, with its WAL flusher thread (which ends
    /// when the last clone is dropped).
    pub fn new(store: Store) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(FLUSH_QUEUE);
        let wal = store.clone();
        let thread = std::thread::Builder::new()
            .name("raft-wal-flush".into())
            .spawn(move || flush_loop(wal, rx))
            .expect("spawn the WAL flusher thread");
        Self {
            store,
            flusher: std::sync::Arc::new(Flusher {
                tx: Some(tx),
                thread: Some(thread),
            }),
            appended: Default::default(),
            state: None,
        }
    }

    /// Purges that wait for (and trust) the state machine's durability
    /// marks, from [`crate::StateMachineStore::durability`].
    pub fn with_state(mut self, state: StateDurability) -> Self {
        self.state = Some(state);
        self
    }

    /// The count of bytes appended to the log by this process, shared.
    pub fn appended_bytes(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.appended.clone()
    }

    fn get_meta<T: for<'de> serde::Deserialize<'de>>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self.store.get(Cf::Raft, key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => bincode::deserialize(&v).map(Some).map_err(read_err),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        let rows = self
            .store
            .range(Cf::Log, &index_key(start), &index_key(end), usize::MAX)
            .map_err(read_err)?;
        rows.iter()
            .map(|(_, v)| bincode::deserialize(v).map_err(read_err))
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta(LAST_PURGED)?;
        let last = match self.store.last(Cf::Log).map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = bincode::deserialize(&v).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    #[tracing::instrument(level = "debug", skip(self))]
    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let mut b = Batch::new();
        b.put(Cf::Raft, VOTE, bincode::serialize(vote).map_err(write_err)?);
        let store = self.store.clone();
        blocking(move || {
            store
                .write(b, true)
                .map_err(|e| StorageIOError::write_vote(&e).into())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        // Not fsynced: losing it only means re-deriving the commit point from
        // the quorum after a crash.
        let mut b = Batch::new();
        b.put(
            Cf::Raft,
            COMMITTED,
            bincode::serialize(&committed).map_err(write_err)?,
        );
        self.store.write(b, false).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut b = Batch::new();
        let mut bytes = 0u64;
        for e in entries {
            let v = bincode::serialize(&e).map_err(write_err)?;
            bytes += v.len() as u64;
            b.put(Cf::Log, index_key(e.log_id.index).to_vec(), v);
        }
        self.appended
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        // Readable now, durable when the flusher has fsynced the WAL: only
        // then may openraft count this node towards a commit quorum.
        match self.store.write(b, false) {
            Ok(()) => {
                let tx = self.flusher.tx.as_ref().expect("open until dropped");
                if let Err(e) = tx.send(callback) {
                    // The flusher is gone (it only stops with the store):
                    // fall back to flushing here.
                    let callback = e.0;
                    let res = self.store.sync_wal();
                    let io = res
                        .as_ref()
                        .map(|_| ())
                        .map_err(|e| std::io::Error::other(e.to_string()));
                    callback.log_io_completed(io);
                    res.map_err(write_err)?;
                }
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(msg)));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let mut b = Batch::new();
        b.delete_range(
            Cf::Log,
            index_key(log_id.index).to_vec(),
            index_key(u64::MAX).to_vec(),
        );
        // u64::MAX itself is never a real index, so the half-open range suffices.
        let store = self.store.clone();
        blocking(move || store.write(b, true).map_err(write_err)).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let upto = log_id.index;
        match &self.state {
            // A snapshot build flushed the state past `upto`: the usual
            // purge, behind a snapshot, needs no flush (which, awaited in
            // the Raft core, could hold heartbeats behind a busy flush).
            Some(s) if s.durable.load(std::sync::atomic::Ordering::Acquire) > upto => {}
            Some(s) => {
                // openraft purges behind a snapshot it is still installing
                // (and counts the entries gone once this returns Ok, never
                // asking again): wait for the install, which raises the
                // applied index. Never Ok without purging, and an install
                // that outlasts its own RPC deadline fails the purge: the
                // node's Raft stops and it restarts with its log intact.
                let mut applied = s.applied.clone();
                let reached = tokio::time::timeout(s.wait, async {
                    applied.wait_for(|&a| a >= upto).await.map(|a| *a)
                })
                .await;
                let a = match reached {
                    Ok(Ok(a)) => a,
                    _ => {
                        let applied = *s.applied.borrow();
                        tracing::error!(
                            upto,
                            applied,
                            "log purge refused: the state has not applied the entries it would drop"
                        );
                        return Err(write_err(std::io::Error::other(format!(
                            "purge up to {upto} while the state is applied to {applied} only"
                        ))));
                    }
                };
                // An install marks its state durable before it announces
                // it; otherwise flush the unlogged state writes (see
                // `StateMachineStore::apply`) before the entries that could
                // replay them go.
                if s.durable.load(std::sync::atomic::Ordering::Acquire) <= upto {
                    let store = self.store.clone();
                    blocking(move || store.flush(Cf::State).map_err(write_err)).await?;
                    s.durable
                        .fetch_max(a + 1, std::sync::atomic::Ordering::AcqRel);
                }
            }
            None => {
                let store = self.store.clone();
                blocking(move || store.flush(Cf::State).map_err(write_err)).await?;
            }
        }
        let mut b = Batch::new();
        b.put(
            Cf::Raft,
            LAST_PURGED,
            bincode::serialize(&log_id).map_err(write_err)?,
        );
        b.delete_range(
            Cf::Log,
            index_key(0).to_vec(),
            index_key(log_id.index.saturating_add(1)).to_vec(),
        );
        let store = self.store.clone();
        blocking(move || store.write(b, true).map_err(write_err)).await
    }
}

/// Runs a synced write on the blocking pool: an fsync must not hold one of
/// the runtime's few worker threads (which also carry Raft and the API).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(write_err)?
}

/// Fsyncs the WAL for every append queued since the last fsync, then tells
/// openraft those entries are durable, in order. An fsync error is reported
/// to each waiting append (openraft then stops the node: a log it cannot
/// make durable must not vote or count toward commits).
fn flush_loop(store: Store, rx: std::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let res = store.sync_wal();
        for callback in waiting {
            callback.log_io_completed(
                res.as_ref()
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string())),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use mailbox_state::ApplyCtx;
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::sm_store::snapshot_dir;
    use crate::StateMachineStore;

    fn entry(i: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Blank,
        }
    }

    /// Review finding on the unlogged state: openraft purges the log behind
    /// a snapshot it is still installing, before the state has it. Had the
    /// purge dropped those entries, a crash during the install would leave
    /// a state older than the log's start and a node that cannot restart.
    /// The purge waits, and fails rather than answer Ok without purging
    /// (openraft would count the entries gone and never ask again). Seen
    /// failing without the state marks: the purge answered Ok and 5 of the
    /// 20 entries were left.
    #[tokio::test]
    async fn a_purge_never_drops_entries_the_state_has_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let mut sm =
            StateMachineStore::new(store.clone(), snapshot_dir(dir.path()), ApplyCtx::new("t"))
                .unwrap();
        let mut b = Batch::new();
        for i in 1..=20 {
            b.put(
                Cf::Log,
                index_key(i).to_vec(),
                bincode::serialize(&entry(i)).unwrap(),
            );
        }
        store.write(b, true).unwrap();
        sm.apply((1..=5).map(entry)).await.unwrap();
        let mut state = sm.durability();
        state.wait = std::time::Duration::from_millis(300);
        let mut log = LogStore::new(store).with_state(state);

        assert!(
            log.purge(entry(15).log_id).await.is_err(),
            "a purge past the applied state fails (never Ok without purging)"
        );
        let kept = log.try_get_log_entries(1..=20).await.unwrap();
        assert_eq!(kept.len(), 20, "nothing dropped while the state is at 5");
        assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, None);

        // The state reaches 15 while the purge waits (an install ending).
        let purge = {
            let mut log = log.clone();
            tokio::spawn(async move { log.purge(entry(15).log_id).await })
        };
        sm.apply((6..=15).map(entry)).await.unwrap();
        purge.await.unwrap().unwrap();
        let kept = log.try_get_log_entries(1..=20).await.unwrap();
        assert_eq!(kept.first().map(|e| e.log_id.index), Some(16));
        assert_eq!(
            log.get_log_state().await.unwrap().last_purged_log_id,
            Some(entry(15).log_id)
        );
    }
}
