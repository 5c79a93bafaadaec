//! The state machine in RocksDB, and its snapshots.
//!
//! Every apply batch writes the mailbox state *and* the apply point (last
//! applied log id, membership) in one atomic RocksDB batch, both in
//! [`Cf::State`] (the apply point under keys starting with NUL, which no
//! mailbox key does). A crash therefore loses at most a suffix of applied
//! entries, consistently, and openraft re-applies them from the log.
//!
//! A snapshot is the whole state column family read from one RocksDB
//! point-in-time view and streamed into a file ([`crate::snapshot_file`]);
//! it is never held in memory. The current snapshot is `<dir>/current.snap`
//! (written to a temp file, fsynced, renamed), so a restarted node can still
//! serve it to a lagging follower.
//!
//! Installing streams a received file into RocksDB in bounded batches,
//! which cannot be one atomic write. So the file is first kept as
//! `<dir>/installing.snap`, and the first batch (clearing the old state)
//! writes an "install in progress" marker that only the last batch (the
//! new apply point) removes. A node that restarts with the marker set
//! installs the file again before Raft starts: it never runs on half a
//! state.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mailbox_state::{apply, ApplyCtx, CommandResult, KvRead, Overlay, StateError};
use mailbox_storage::{Batch, Cf, Store};
use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageIOError, StoredMembership,
};

use crate::snapshot_file::{self, Meta, SnapshotFile};
use crate::{BasicNode, NodeId, StorageError, TypeConfig};

const APPLIED: &[u8] = b"\0applied";
/// How long a log purge waits for the state to apply what it would drop
/// (a snapshot install still running) before it fails: an install is
/// bounded by its last chunk's RPC deadline.
const PURGE_WAIT: std::time::Duration = crate::node::SNAPSHOT_RPC_TIMEOUT;
const MEMBERSHIP: &[u8] = b"\0membership";
/// Set while a snapshot is being installed (value: its id).
const INSTALLING: &[u8] = b"\0installing";
/// A received snapshot file nothing wrote to for this long is garbage.
const STALE_RECEPTION: std::time::Duration = std::time::Duration::from_secs(600);
/// State bytes per write batch while installing a snapshot.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// Every state key sorts below this (tags are ASCII letters or NUL).
const STATE_END: &[u8] = &[0xff];

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &e).into()
}

/// Read-only view of the committed mailbox state, for queries.
///
/// Installing a snapshot replaces the state in several writes, so every
/// read is checked against the install counter (odd while an install
/// runs): a read that may have seen part of an install fails with
/// [`StateError::Installing`] instead of answering from half a state.
#[derive(Debug, Clone)]
pub struct StateView {
    store: Store,
    installs: Arc<AtomicU64>,
}

impl StateView {
    fn guarded<T>(
        &self,
        read: impl FnOnce() -> Result<T, mailbox_storage::StoreError>,
    ) -> Result<T, StateError> {
        let before = self.installs.load(Ordering::Acquire);
        if before % 2 == 1 {
            return Err(StateError::Installing);
        }
        let r = read().map_err(|e| StateError::Read {
            reason: e.to_string(),
        })?;
        if self.installs.load(Ordering::Acquire) != before {
            return Err(StateError::Installing);
        }
        Ok(r)
    }
}

impl KvRead for StateView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.guarded(|| self.store.get(Cf::State, key))
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<mailbox_state::KvPairs, StateError> {
        self.guarded(|| self.store.scan(Cf::State, prefix, after, limit))
    }

    fn scan_below(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        before: &[u8],
        limit: usize,
    ) -> Result<mailbox_state::KvPairs, StateError> {
        self.guarded(|| {
            self.store
                .scan_below(Cf::State, prefix, after, Some(before), limit)
        })
    }
}

/// The state machine of one node.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    store: Store,
    snapshot_dir: PathBuf,
    ctx: ApplyCtx,
    applied_tx: tokio::sync::watch::Sender<u64>,
    /// Serialises replacing `current.snap` (a build and an install may
    /// finish together; the newer snapshot stays).
    current_lock: Arc<Mutex<()>>,
    /// Odd while a snapshot install rewrites the state (see [`StateView`]).
    installs: Arc<AtomicU64>,
    /// One past the last log index whose state is known durable (flushed
    /// after a snapshot build, or synced by an install); 0: none known.
    durable: Arc<AtomicU64>,
}
/// Last applied log id and membership.
type ApplyPoint = (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

impl StateMachineStore {
    /// A state machine of DC `ctx.local_dc` over `store`, keeping
    /// snapshots in `snapshot_dir`.
    pub fn new(
        store: Store,
        snapshot_dir: impl Into<PathBuf>,
        ctx: ApplyCtx,
    ) -> Result<Self, std::io::Error> {
        let snapshot_dir = snapshot_dir.into();
        std::fs::create_dir_all(&snapshot_dir)?;
        // Temp files of snapshot writes and receptions a crash interrupted.
        // (`current.snap.tmp.*`: an older version's names.)
        for e in std::fs::read_dir(&snapshot_dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") || name.starts_with("current.snap.tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        // A current snapshot this version cannot read (an older layout, a
        // damaged file) is only a copy of what RocksDB holds: drop it, and
        // the next one is built from the state.
        let current = snapshot_dir.join("current.snap");
        if current.exists() {
            if let Err(e) = snapshot_file::read_meta(&current) {
                tracing::warn!(path = %current.display(), "removing an unreadable snapshot file: {e}");
                std::fs::remove_file(&current)?;
            }
        }
        let this = Self {
            store,
            snapshot_dir,
            ctx,
            applied_tx: tokio::sync::watch::channel(0).0,
            durable: Arc::new(AtomicU64::new(0)),
            current_lock: Arc::new(Mutex::new(())),
            installs: Arc::new(AtomicU64::new(0)),
        };
        this.recover_install().map_err(std::io::Error::other)?;
        // The watch starts at what is applied on disk, not at 0, so a
        // reader after a restart sees the truth before the first apply.
        if let Ok((Some(l), _)) = this.read_apply_point() {
            this.applied_tx.send_replace(l.index);
        }
        Ok(this)
    }

    fn installing_path(&self) -> PathBuf {
        self.snapshot_dir.join("installing.snap")
    }

    /// Finishes a snapshot install a crash interrupted (see the module doc).
    fn recover_install(&self) -> Result<(), StorageError> {
        let marker = self.store.get(Cf::State, INSTALLING).map_err(sm_read_err)?;
        let file = self.installing_path();
        match marker {
            Some(id) => {
                let meta = snapshot_file::read_meta(&file).map_err(|e| {
                    sm_read_err(std::io::Error::other(format!(
                        "an install of snapshot {} was interrupted and its file {} cannot be read ({e}); \
                         this node's state is incomplete: wipe its data directory and let it rejoin \
                         (docs/operations.md)",
                        String::from_utf8_lossy(&id),
                        file.display()
                    )))
                })?;
                if meta.snapshot_id.as_bytes() != id.as_slice() {
                    return Err(sm_read_err(std::io::Error::other(format!(
                        "an install of snapshot {} was interrupted, but {} holds snapshot {}; \
                         this node's state is incomplete: wipe its data directory and let it rejoin",
                        String::from_utf8_lossy(&id),
                        file.display(),
                        meta.snapshot_id
                    ))));
                }
                tracing::warn!(id = %meta.snapshot_id, "installing snapshot again: the last install was interrupted");
                self.install_from_file(&meta, &file)?;
                self.adopt_installed(&meta, &file)
            }
            None if file.exists() => {
                // Interrupted before the marker (the old state is whole) or
                // after the last batch (the new one is): keep the file only
                // if it is what the state now is.
                let meta = snapshot_file::read_meta(&file).ok();
                let (applied, _) = self.read_apply_point()?;
                match meta {
                    Some(m) if m.last_log_id == applied && applied.is_some() => {
                        self.adopt_installed(&m, &file)
                    }
                    _ => std::fs::remove_file(&file).map_err(snap_err),
                }
            }
            None => Ok(()),
        }
    }

    /// The apply and durability marks `LogStore::purge` goes by (see
    /// [`crate::LogStore::with_state`]).
    pub fn durability(&self) -> crate::log_store::StateDurability {
        crate::log_store::StateDurability {
            applied: self.applied_tx.subscribe(),
            durable: self.durable.clone(),
            wait: PURGE_WAIT,
        }
    }

    /// Notified with the last applied log index after every apply batch
    /// (feed streams and waiters wake on it instead of polling).
    pub fn applied_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// A query view of the same state.
    pub fn view(&self) -> StateView {
        StateView {
            store: self.store.clone(),
            installs: self.installs.clone(),
        }
    }

    fn read_apply_point(&self) -> Result<ApplyPoint, StorageError> {
        let applied = match self.store.get(Cf::State, APPLIED).map_err(sm_read_err)? {
            Some(v) => bincode::deserialize(&v).map_err(sm_read_err)?,
            None => None,
        };
        let membership = match self.store.get(Cf::State, MEMBERSHIP).map_err(sm_read_err)? {
            Some(v) => bincode::deserialize(&v).map_err(sm_read_err)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    fn current_path(&self) -> PathBuf {
        self.snapshot_dir.join("current.snap")
    }

    /// A fresh temp path in the snapshot directory.
    fn temp_path(&self, what: &str) -> PathBuf {
        // A name of its own per write: a snapshot being built and one being
        // received never write into the same file.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.snapshot_dir
            .join(format!("{what}.{}.{n}.tmp", std::process::id()))
    }

    /// Makes the complete, fsynced snapshot file `from` the current one,
    /// unless the current one is newer.
    fn replace_current(&self, meta: &Meta, from: &Path) -> std::io::Result<()> {
        let _g = self.current_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(cur) = snapshot_file::read_meta(&self.current_path()) {
            if cur.last_log_id > meta.last_log_id {
                return std::fs::remove_file(from);
            }
        }
        std::fs::rename(from, self.current_path())?;
        std::fs::File::open(&self.snapshot_dir)?.sync_all()
    }

    fn adopt_installed(&self, meta: &Meta, file: &Path) -> Result<(), StorageError> {
        self.replace_current(meta, file).map_err(snap_err)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    #[tracing::instrument(level = "info", skip(self))]
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Reading the whole state and the fsync are blocking: on the
        // blocking pool, not on a runtime worker that also carries Raft
        // heartbeats and the API.
        loop {
            let this = self.clone();
            let built = tokio::task::spawn_blocking(move || this.build_snapshot_blocking())
                .await
                .map_err(snap_err)??;
            match built {
                // What was built, or a newer snapshot installed meanwhile.
                Some(meta) => {
                    return match self.get_current_snapshot().await? {
                        Some(s) if s.meta.last_log_id >= meta.last_log_id => Ok(s),
                        _ => Err(snap_err(std::io::Error::other(
                            "the snapshot just built is not in the snapshot directory",
                        ))),
                    }
                }
                // An install rewrote the state meanwhile. An error here
                // would stop this node's Raft (openraft treats a failed
                // build as a storage failure): wait for the install, whose
                // snapshot is newer than anything this build could make,
                // and answer with it (or build again if there is none).
                None => {
                    while self.installs.load(Ordering::Acquire) % 2 == 1 {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    if let Some(s) = self.get_current_snapshot().await? {
                        return Ok(s);
                    }
                }
            }
        }
    }
}

impl StateMachineStore {
    /// `None` when an install ran meanwhile (nothing is built).
    fn build_snapshot_blocking(&self) -> Result<Option<Meta>, StorageError> {
        let tmp = self.temp_path("build");
        let r = self.write_snapshot_file(&tmp);
        if !matches!(r, Ok(Some(_))) {
            let _ = std::fs::remove_file(&tmp);
        }
        let Some((meta, bytes)) = r? else {
            return Ok(None);
        };
        // openraft purges the log behind a new snapshot, and the state
        // those entries produced must be durable first (it is written
        // unlogged): flushed here, off the Raft core, and marked, so the
        // purge needs no flush of its own.
        self.store.flush(Cf::State).map_err(sm_write_err)?;
        if let Some(l) = meta.last_log_id {
            self.durable.fetch_max(l.index + 1, Ordering::AcqRel);
        }
        self.replace_current(&meta, &tmp).map_err(snap_err)?;
        tracing::info!(bytes, last = ?meta.last_log_id, "snapshot built");
        Ok(Some(meta))
    }

    /// Streams the state into a new snapshot file at `path`; `None` when
    /// an install rewrote the state meanwhile (openraft builds in a task
    /// of its own), so the file may hold part of it.
    fn write_snapshot_file(&self, path: &Path) -> Result<Option<(Meta, u64)>, StorageError> {
        let installs = self.installs.load(Ordering::Acquire);
        if installs % 2 == 1 {
            return Ok(None);
        }
        let mut w = snapshot_file::Writer::create(path).map_err(snap_err)?;
        let mut applied: Option<LogId<NodeId>> = None;
        let mut membership = StoredMembership::default();
        // One RocksDB point-in-time view: the apply point and the data
        // agree. The apply point goes in the trailer, not in the frames.
        self.store
            .for_each_consistent(Cf::State, |k, v| -> std::io::Result<()> {
                if k == APPLIED {
                    applied = bincode::deserialize(v).map_err(std::io::Error::other)?;
                } else if k == MEMBERSHIP {
                    membership = bincode::deserialize(v).map_err(std::io::Error::other)?;
                } else if k != INSTALLING {
                    w.frame(k, v)?;
                }
                Ok(())
            })
            .map_err(snap_err)?
            .map_err(snap_err)?;
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, mailbox_types::now_ms()),
            None => format!("empty-{}", mailbox_types::now_ms()),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        if self.installs.load(Ordering::Acquire) != installs {
            return Ok(None);
        }
        let bytes = w.finish(&meta).map_err(snap_err)?;
        Ok(Some((meta, bytes)))
    }

    /// Installs the received snapshot file at `received` as the state.
    fn install_snapshot_blocking(&self, meta: &Meta, received: &Path) -> Result<(), StorageError> {
        let ours = received.parent() == Some(self.snapshot_dir.as_path());
        let r = self.install_checked(meta, received, ours);
        if r.is_err() && ours {
            let _ = std::fs::remove_file(received);
        }
        r
    }

    fn install_checked(
        &self,
        meta: &Meta,
        received: &Path,
        ours: bool,
    ) -> Result<(), StorageError> {
        // Checked whole before the old state is touched: a bad file is
        // refused, never half installed.
        let (mut r, embedded) = snapshot_file::Reader::open(received).map_err(snap_err)?;
        if embedded.snapshot_id != meta.snapshot_id || embedded.last_log_id != meta.last_log_id {
            return Err(snap_err(std::io::Error::other(format!(
                "received snapshot file holds {} at {:?}, expected {} at {:?}",
                embedded.snapshot_id, embedded.last_log_id, meta.snapshot_id, meta.last_log_id
            ))));
        }
        while r.next_frame().map_err(snap_err)?.is_some() {}
        // Our own received file is moved; anything else (openraft's test
        // suite hands over another store's file) is copied.
        let file = self.installing_path();
        if ours {
            std::fs::rename(received, &file).map_err(snap_err)?;
        } else {
            let tmp = self.temp_path("copy");
            std::fs::copy(received, &tmp)
                .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|_| std::fs::rename(&tmp, &file))
                .map_err(snap_err)?;
        }
        std::fs::File::open(&self.snapshot_dir)
            .and_then(|d| d.sync_all())
            .map_err(snap_err)?;
        self.install_from_file(meta, &file)?;
        self.adopt_installed(meta, &file)?;
        tracing::info!(last = ?meta.last_log_id, "snapshot installed");
        Ok(())
    }

    /// Replaces the state with the frames of the snapshot file at `file`,
    /// in bounded batches, behind the install marker.
    fn install_from_file(&self, meta: &Meta, file: &Path) -> Result<(), StorageError> {
        let (mut r, _) = snapshot_file::Reader::open(file).map_err(snap_err)?;
        // Odd from before the first write to after the last: readers fail
        // instead of seeing part of it. Left odd if the install fails (the
        // node's Raft stops; it reinstalls at the next start).
        self.installs.fetch_add(1, Ordering::AcqRel);
        let mut b = Batch::new();
        b.delete_range(Cf::State, Vec::new(), STATE_END.to_vec());
        b.put(Cf::State, INSTALLING, meta.snapshot_id.as_bytes().to_vec());
        self.store.write(b, true).map_err(sm_write_err)?;
        let mut b = Batch::new();
        let mut bytes = 0usize;
        let mut frames = 0u64;
        while let Some((k, v)) = r.next_frame().map_err(snap_err)? {
            if k == APPLIED || k == MEMBERSHIP || k == INSTALLING {
                continue;
            }
            bytes += k.len() + v.len();
            frames += 1;
            b.put(Cf::State, k.to_vec(), v.to_vec());
            if bytes >= INSTALL_BATCH_BYTES {
                // Not fsynced: the last write below syncs the WAL, and
                // with it every write before it.
                self.store
                    .write(std::mem::take(&mut b), false)
                    .map_err(sm_write_err)?;
                bytes = 0;
            }
        }
        // The snapshot's own metadata is authoritative for the apply point.
        b.put(
            Cf::State,
            APPLIED,
            bincode::serialize(&meta.last_log_id).map_err(sm_write_err)?,
        );
        b.put(
            Cf::State,
            MEMBERSHIP,
            bincode::serialize(&meta.last_membership).map_err(sm_write_err)?,
        );
        b.delete(Cf::State, INSTALLING);
        self.store.write(b, true).map_err(sm_write_err)?;
        if let Some(l) = meta.last_log_id {
            self.durable.fetch_max(l.index + 1, Ordering::AcqRel);
        }
        self.installs.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(frames, "snapshot frames written");
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<ApplyPoint, StorageError> {
        self.read_apply_point()
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn apply<I>(
        &mut self,
        entries: I,
    ) -> Result<Vec<mailbox_state::CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let view = self.view();
        let mut ov = Overlay::new();
        let mut out = Vec::new();
        let mut last = None;
        let mut membership = None;
        for e in entries {
            last = Some(e.log_id);
            match &e.payload {
                EntryPayload::Blank => out.push(Ok(CommandResult::None)),
                EntryPayload::Normal(cmd) => {
                    let r = apply(&view, &mut ov, &self.ctx, cmd);
                    if let Some(e) = mailbox_state::fatal_error(&r) {
                        // Nothing of this batch is written; openraft stops
                        // this node's Raft (reported unhealthy) rather than
                        // let it go on without a command its peers applied.
                        tracing::error!(
                            index = last.map(|l: LogId<NodeId>| l.index),
                            "state machine stopped: storage failed while applying a command: {e}"
                        );
                        return Err(sm_read_err(std::io::Error::other(e.to_string())));
                    }
                    out.push(r)
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(e.log_id), m.clone()));
                    out.push(Ok(CommandResult::None));
                }
            }
        }
        let Some(last) = last else { return Ok(out) };
        let mut b = Batch::new();
        for (k, v) in ov.into_writes() {
            match v {
                Some(v) => b.put(Cf::State, k, v),
                None => b.delete(Cf::State, k),
            }
        }
        b.put(
            Cf::State,
            APPLIED,
            bincode::serialize(&Some(last)).map_err(sm_write_err)?,
        );
        if let Some(m) = membership {
            b.put(
                Cf::State,
                MEMBERSHIP,
                bincode::serialize(&m).map_err(sm_write_err)?,
            );
        }
        // Not in RocksDB's WAL at all: the Raft log is this state's
        // write-ahead log (its entries are fsynced before they commit, and
        // replay this batch after a crash), so logging every state write a
        // second time only doubled the bytes written and fsynced per
        // upload. A crash loses a suffix of applied batches, consistently
        // with the apply point written in the same batch; `LogStore::purge`
        // flushes the state to table files before dropping the entries
        // that could replay it.
        self.store.write_unlogged(b).map_err(sm_write_err)?;
        self.applied_tx.send_replace(last.index);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, StorageError> {
        // openraft receives one snapshot at a time: an earlier reception
        // (a stream it dropped for a newer snapshot, or one whose install
        // it skipped) is garbage.
        // Only ones nothing wrote to for a while: a reception that just
        // finished may still be on its way to being installed.
        if let Ok(dir) = std::fs::read_dir(&self.snapshot_dir) {
            for e in dir.flatten() {
                let stale = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > STALE_RECEPTION);
                if stale && e.file_name().to_string_lossy().starts_with("incoming.") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let f = SnapshotFile::create(&self.temp_path("incoming"))
            .await
            .map_err(snap_err)?;
        Ok(Box::new(f))
    }

    #[tracing::instrument(level = "info", skip(self, snapshot), fields(id = %meta.snapshot_id))]
    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        mut snapshot: Box<SnapshotFile>,
    ) -> Result<(), StorageError> {
        if snapshot.path().parent() == Some(self.snapshot_dir.as_path()) {
            snapshot.sync().await.map_err(snap_err)?;
        }
        let path = snapshot.path().to_path_buf();
        drop(snapshot);
        let (this, m) = (self.clone(), meta.clone());
        // Reading, checking and writing the whole state: on the blocking
        // pool, not on a runtime worker that carries heartbeats and the API.
        tokio::task::spawn_blocking(move || this.install_snapshot_blocking(&m, &path))
            .await
            .map_err(snap_err)??;
        if let Some(l) = meta.last_log_id {
            self.applied_tx.send_replace(l.index);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let path = self.current_path();
        let _g = self.current_lock.lock().unwrap_or_else(|p| p.into_inner());
        let meta = match snapshot_file::read_meta(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageIOError::read_snapshot(None, &e).into()),
        };
        // Opened under the lock: the handle reads this file even if a newer
        // one replaces it meanwhile.
        let file = std::fs::File::open(&path)
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))?;
        drop(_g);
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(SnapshotFile::from_std(file, path)),
        }))
    }
}

/// Directory for snapshots under a node's data directory.
pub fn snapshot_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::LogStore;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(&dir.path().join("db")).expect("open store");
            let sm = StateMachineStore::new(
                store.clone(),
                snapshot_dir(dir.path()),
                ApplyCtx::new("test"),
            )
            .expect("snapshot dir");
            Ok((dir, LogStore::new(store), sm))
        }
    }

    /// openraft's own conformance suite against our RocksDB stores.
    #[test]
    fn openraft_suite() {
        Suite::test_all(Builder).expect("openraft storage suite");
    }

    /// Issue #8 item 4: a record this node cannot read is not a refusal
    /// (its peers applied the command); the state machine must stop, write
    /// nothing, and not answer as if the command had been refused.
    #[tokio::test]
    async fn a_storage_failure_during_apply_stops_the_state_machine() {
        use mailbox_state::Command;
        use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let mut sm = StateMachineStore::new(
            store.clone(),
            snapshot_dir(dir.path()),
            ApplyCtx::new("east"),
        )
        .unwrap();
        let id = mailbox_types::MessageId::new();
        let mut b = Batch::new();
        b.put(
            Cf::State,
            mailbox_state::keys::message(&id),
            b"\xff not a message".to_vec(),
        );
        store.write(b, true).unwrap();
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Command::SetAttributes {
                id,
                set: [("k".to_string(), "v".to_string())].into(),
                remove: vec![],
                wall_ms: 1,
            }),
        };
        let r = sm.apply([entry]).await;
        assert!(
            r.is_err(),
            "a corrupt record must stop the state machine, got {r:?}"
        );
        assert_eq!(
            sm.applied_state().await.unwrap().0,
            None,
            "nothing of the batch is written"
        );
    }

    async fn store_with_messages(dir: &Path, n: usize) -> StateMachineStore {
        use mailbox_state::Command;
        use openraft::{CommittedLeaderId, EntryPayload};
        let store = Store::open(&dir.join("db")).unwrap();
        let mut sm =
            StateMachineStore::new(store, snapshot_dir(dir), ApplyCtx::new("east")).unwrap();
        let mut entries = vec![Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Command::CreateMailbox {
                path: mailbox_types::MailboxPath::parse("/in").unwrap(),
                parents: true,
                created_ms: 1,
            }),
        }];
        for i in 0..n {
            let data = vec![i as u8; 1000];
            let meta = mailbox_types::MessageMeta {
                id: mailbox_types::MessageId::new(),
                mailbox: mailbox_types::MailboxPath::parse("/in").unwrap(),
                name: format!("f{i}"),
                size: data.len() as u64,
                sha256: mailbox_types::Digest::of(&data),
                created_ms: 1,
                origin_dc: "east".into(),
                attributes: Default::default(),
                payload: mailbox_types::Payload::Inline,
            };
            entries.push(Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), 2 + i as u64),
                payload: EntryPayload::Normal(Command::PutMessage {
                    meta,
                    inline: Some(data),
                    idempotency_key: None,
                }),
            });
        }
        sm.apply(entries).await.unwrap();
        sm
    }

    /// The mailbox state (the apply point, under NUL keys, is compared on
    /// its own), as a digest per key: a mismatch prints short.
    fn state_of(sm: &StateMachineStore) -> Vec<(String, String)> {
        let mut out = Vec::new();
        sm.store
            .for_each_consistent(Cf::State, |k, v| {
                if !k.starts_with(b"\0") {
                    out.push((
                        mailbox_state::keys::hex(k),
                        mailbox_types::Digest::of(v).to_hex()[..12].to_string(),
                    ));
                }
                Ok::<(), ()>(())
            })
            .unwrap()
            .unwrap();
        out
    }

    /// A snapshot streamed through files arrives whole: the follower's
    /// state equals the leader's, key for key.
    #[tokio::test]
    async fn a_snapshot_installs_the_same_state_through_files() {
        let (dl, df) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = store_with_messages(dl.path(), 2000).await;
        let snap = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let mut follower = store_with_messages(df.path(), 3).await;
        // As openraft's chunked transport does: chunks written at offsets.
        let mut into = follower.begin_receiving_snapshot().await.unwrap();
        let bytes = std::fs::read(leader.current_path()).unwrap();
        assert!(bytes.len() > 2_000_000, "2000 messages of 1000 bytes");
        {
            use tokio::io::{AsyncSeekExt, AsyncWriteExt};
            for (i, chunk) in bytes.chunks(300_000).enumerate().rev() {
                into.seek(std::io::SeekFrom::Start(i as u64 * 300_000))
                    .await
                    .unwrap();
                into.write_all(chunk).await.unwrap();
            }
            into.shutdown().await.unwrap();
        }
        follower.install_snapshot(&snap.meta, into).await.unwrap();
        assert_eq!(state_of(&follower), state_of(&leader));
        assert_eq!(
            follower.applied_state().await.unwrap(),
            leader.applied_state().await.unwrap()
        );
        let cur = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(cur.meta, snap.meta);
        // Nothing left behind but the current snapshot.
        let names: Vec<_> = std::fs::read_dir(snapshot_dir(df.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["current.snap".to_string()]);
    }

    /// A crash in the middle of an install (the old state cleared, part of
    /// the new one written) is finished at the next start, never run on.
    #[tokio::test]
    async fn an_interrupted_install_is_finished_at_restart() {
        let (dl, df) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = store_with_messages(dl.path(), 500).await;
        let snap = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let follower = store_with_messages(df.path(), 3).await;
        // The install as far as its first batch, then "crash".
        let file = follower.installing_path();
        std::fs::copy(leader.current_path(), &file).unwrap();
        let mut b = Batch::new();
        b.delete_range(Cf::State, Vec::new(), STATE_END.to_vec());
        b.put(
            Cf::State,
            INSTALLING,
            snap.meta.snapshot_id.as_bytes().to_vec(),
        );
        b.put(Cf::State, b"m-partial".to_vec(), b"x".to_vec());
        follower.store.write(b, true).unwrap();
        let store = follower.store.clone();
        drop(follower);
        let mut again =
            StateMachineStore::new(store, snapshot_dir(df.path()), ApplyCtx::new("east")).unwrap();
        assert_eq!(state_of(&again), state_of(&leader));
        assert_eq!(
            again.applied_state().await.unwrap().0,
            snap.meta.last_log_id
        );
        assert_eq!(
            again.get_current_snapshot().await.unwrap().unwrap().meta,
            snap.meta
        );
        assert!(!file.exists());
    }

    /// A received file that is cut short is refused before the state is
    /// touched.
    #[tokio::test]
    async fn a_truncated_snapshot_is_refused_and_the_state_kept() {
        let (dl, df) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut leader = store_with_messages(dl.path(), 50).await;
        let snap = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let mut follower = store_with_messages(df.path(), 3).await;
        let before = state_of(&follower);
        let mut into = follower.begin_receiving_snapshot().await.unwrap();
        let bytes = std::fs::read(leader.current_path()).unwrap();
        {
            use tokio::io::AsyncWriteExt;
            into.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
            into.shutdown().await.unwrap();
        }
        assert!(follower.install_snapshot(&snap.meta, into).await.is_err());
        assert_eq!(state_of(&follower), before);
        let left: Vec<_> = std::fs::read_dir(snapshot_dir(df.path()))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "the refused file is removed: {left:?}");
    }

    /// While an install rewrites the state, reads fail (retryably) instead
    /// of answering from part of it, and a snapshot build waits.
    #[tokio::test]
    async fn reads_fail_and_builds_wait_while_an_install_runs() {
        let d = tempfile::tempdir().unwrap();
        let mut sm = store_with_messages(d.path(), 3).await;
        let view = sm.view();
        assert!(view.scan(b"m", None, 10).unwrap().len() == 3);
        sm.installs.fetch_add(1, Ordering::AcqRel);
        assert!(matches!(
            view.scan(b"m", None, 10),
            Err(StateError::Installing)
        ));
        assert!(matches!(view.get(b"F"), Err(StateError::Installing)));
        // A build waits for the install to end (an error would stop the
        // node's Raft: openraft takes a failed build for a storage
        // failure), then answers with a snapshot of the whole state.
        let mut b = sm.get_snapshot_builder().await;
        let build = tokio::spawn(async move { b.build_snapshot().await });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !build.is_finished(),
            "no snapshot of a state being rewritten"
        );
        sm.installs.fetch_add(1, Ordering::AcqRel);
        let snap = build.await.unwrap().unwrap();
        assert_eq!(snap.meta.last_log_id, sm.applied_state().await.unwrap().0);
        assert_eq!(view.scan(b"m", None, 10).unwrap().len(), 3);
    }
}
