//! The state machine in RocksDB, and its snapshots.
//!
//! Every apply batch writes the mailbox state *and* the apply point (last
//! applied log id, membership) in one atomic RocksDB batch, both in
//! [`Cf::State`] (the apply point under keys starting with NUL, which no
//! mailbox key does). A crash therefore loses at most a suffix of applied
//! entries, consistently, and openraft re-applies them from the log.
//!
//! A snapshot is the whole state column family read from one RocksDB
//! snapshot, as length-prefixed key/value frames. The current snapshot is
//! kept in `<dir>/current.snap` (written to a temp file, fsynced, renamed) so
//! a restarted node can still serve it to a lagging follower.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use mailbox_state::{apply, ApplyCtx, CommandResult, KvRead, Overlay, StateError};
use mailbox_storage::{Batch, Cf, Store};
use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageIOError, StoredMembership,
};

use crate::{BasicNode, NodeId, StorageError, TypeConfig};

const APPLIED: &[u8] = b"\0applied";
const MEMBERSHIP: &[u8] = b"\0membership";
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
#[derive(Debug, Clone)]
pub struct StateView {
    store: Store,
}

impl StateView {
    /// A view over `store`'s state column family.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl KvRead for StateView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        self.store
            .get(Cf::State, key)
            .map_err(|e| StateError::Read {
                reason: e.to_string(),
            })
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<mailbox_state::KvPairs, StateError> {
        self.store
            .scan(Cf::State, prefix, after, limit)
            .map_err(|e| StateError::Read {
                reason: e.to_string(),
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
}

type Meta = SnapshotMeta<NodeId, BasicNode>;
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
        // Temp files of snapshot writes a crash interrupted.
        for e in std::fs::read_dir(&snapshot_dir)?.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with("current.snap.tmp")
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self {
            store,
            snapshot_dir,
            ctx,
            applied_tx: tokio::sync::watch::channel(0).0,
        })
    }

    /// Notified with the last applied log index after every apply batch
    /// (feed streams and waiters wake on it instead of polling).
    pub fn applied_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// A query view of the same state.
    pub fn view(&self) -> StateView {
        StateView::new(self.store.clone())
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

    fn save_snapshot_file(&self, meta: &Meta, data: &[u8]) -> Result<(), StorageError> {
        let meta_bytes = bincode::serialize(meta).map_err(snap_err)?;
        // A name of its own per write: a snapshot being built and one being
        // installed never write into the same temp file.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .snapshot_dir
            .join(format!("current.snap.tmp.{}.{n}", std::process::id()));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&(meta_bytes.len() as u64).to_be_bytes())?;
            f.write_all(&meta_bytes)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.current_path())?;
            std::fs::File::open(&self.snapshot_dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            snap_err(e)
        })
    }

    fn load_snapshot_file(&self) -> Result<Option<(Meta, Vec<u8>)>, StorageError> {
        let bytes = match std::fs::read(self.current_path()) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageIOError::read_snapshot(None, &e).into()),
        };
        let bad = |what: &str| -> StorageError {
            StorageIOError::read_snapshot(None, &std::io::Error::other(what.to_string())).into()
        };
        if bytes.len() < 8 {
            return Err(bad("snapshot file too short"));
        }
        let n = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let meta_end = 8usize.checked_add(n).filter(|&e| e <= bytes.len());
        let meta_end = meta_end.ok_or_else(|| bad("snapshot metadata truncated"))?;
        let meta: Meta = bincode::deserialize(&bytes[8..meta_end]).map_err(sm_read_err)?;
        Ok(Some((meta, bytes[meta_end..].to_vec())))
    }
}

fn put_frame(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Splits snapshot data into key/value pairs.
/// A key and value borrowed from snapshot data.
type Frame<'a> = (&'a [u8], &'a [u8]);

fn parse_frames(data: &[u8]) -> Result<Vec<Frame<'_>>, std::io::Error> {
    let mut out = Vec::new();
    let mut pos = 0;
    let take = |pos: &mut usize| -> Result<&[u8], std::io::Error> {
        let hdr = data
            .get(*pos..*pos + 4)
            .ok_or_else(|| std::io::Error::other("snapshot frame header truncated"))?;
        let n = u32::from_be_bytes(hdr.try_into().expect("4 bytes")) as usize;
        let body = data
            .get(*pos + 4..*pos + 4 + n)
            .ok_or_else(|| std::io::Error::other("snapshot frame truncated"))?;
        *pos += 4 + n;
        Ok(body)
    };
    while pos < data.len() {
        let k = take(&mut pos)?;
        let v = take(&mut pos)?;
        out.push((k, v));
    }
    Ok(out)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    #[tracing::instrument(level = "info", skip(self))]
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Reading the whole state and the fsync are blocking: on the
        // blocking pool, not on a runtime worker that also carries Raft
        // heartbeats and the API.
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.build_snapshot_blocking())
            .await
            .map_err(snap_err)?
    }
}

impl StateMachineStore {
    fn build_snapshot_blocking(&self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let mut data = Vec::new();
        let mut applied: Option<LogId<NodeId>> = None;
        let mut membership = StoredMembership::default();
        let mut decode_err = None;
        // One RocksDB snapshot: the apply point and the data agree.
        self.store
            .for_each_consistent(Cf::State, |k, v| {
                if k == APPLIED {
                    match bincode::deserialize(v) {
                        Ok(a) => applied = a,
                        Err(e) => decode_err = Some(e),
                    }
                } else if k == MEMBERSHIP {
                    match bincode::deserialize(v) {
                        Ok(m) => membership = m,
                        Err(e) => decode_err = Some(e),
                    }
                }
                put_frame(&mut data, k);
                put_frame(&mut data, v);
            })
            .map_err(snap_err)?;
        if let Some(e) = decode_err {
            return Err(snap_err(e));
        }
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, mailbox_types::now_ms()),
            None => format!("empty-{}", mailbox_types::now_ms()),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        self.save_snapshot_file(&meta, &data)?;
        tracing::info!(bytes = data.len(), last = ?meta.last_log_id, "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }

    fn install_snapshot_blocking(&self, meta: &Meta, data: Vec<u8>) -> Result<(), StorageError> {
        let frames = parse_frames(&data).map_err(snap_err)?;
        let mut b = Batch::new();
        b.delete_range(Cf::State, Vec::new(), STATE_END.to_vec());
        for (k, v) in frames {
            b.put(Cf::State, k.to_vec(), v.to_vec());
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
        self.store.write(b, true).map_err(sm_write_err)?;
        self.save_snapshot_file(meta, &data)?;
        tracing::info!(bytes = data.len(), last = ?meta.last_log_id, "snapshot installed");
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
        // Not fsynced: the log entries are durable and replay this batch after
        // a crash; LogStore::purge syncs before dropping them.
        self.store.write(b, false).map_err(sm_write_err)?;
        self.applied_tx.send_replace(last.index);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    #[tracing::instrument(level = "info", skip(self, snapshot), fields(id = %meta.snapshot_id))]
    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let (this, m) = (self.clone(), meta.clone());
        tokio::task::spawn_blocking(move || this.install_snapshot_blocking(&m, data))
            .await
            .map_err(snap_err)??;
        if let Some(l) = meta.last_log_id {
            self.applied_tx.send_replace(l.index);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.load_snapshot_file()?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
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

    #[test]
    fn frames_roundtrip_and_reject_truncation() {
        let mut d = Vec::new();
        put_frame(&mut d, b"k1");
        put_frame(&mut d, b"");
        put_frame(&mut d, b"k2");
        put_frame(&mut d, b"value");
        let f = parse_frames(&d).unwrap();
        assert_eq!(f, vec![(&b"k1"[..], &b""[..]), (&b"k2"[..], &b"value"[..])]);
        assert!(parse_frames(&d[..d.len() - 1]).is_err());
    }
}
