//! The deterministic mailbox state machine of one data center.
//!
//! [`Command`]s are what the DC log carries; [`apply`] turns one command into
//! a [`CommandResult`] and a set of key/value writes, reading the current
//! state through [`KvRead`]. It does no I/O and consults no clock: everything
//! that varies (ids, timestamps, digests) is decided by the proposer and
//! travels inside the command, so every node that applies the same log ends in
//! the same state, byte for byte.
//!
//! Invariants kept here:
//! - a message becomes visible in exactly one write together with its listing
//!   entry, inline payload and idempotency key, so a half-written message is
//!   never observable;
//! - a put into a missing mailbox, or a second mailbox with the same path,
//!   fails without writing anything;
//! - an idempotency key maps to exactly one message per mailbox.

pub mod keys;
mod query;
pub mod replication;

use std::collections::BTreeMap;

use mailbox_types::{MailboxPath, MailboxRecord, MessageId, MessageMeta};
use serde::{Deserialize, Serialize};

pub use query::{get_mailbox, get_message, inline_payload, list_mailboxes, list_messages};
pub use replication::{ApplyCtx, AttrRegister, FeedRecord, Tombstone};

/// A write to the DC log.
// Commands are built once per upload and moved into a log entry; boxing the
// large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create a mailbox; with `parents`, also its missing ancestors, and an
    /// existing mailbox is not an error.
    CreateMailbox {
        /// Path to create.
        path: MailboxPath,
        /// Create ancestors and tolerate existence.
        parents: bool,
        /// Creation time chosen by the proposer.
        created_ms: i64,
    },
    /// Commit a fully uploaded message. Its segments (if any) are already
    /// durable in the segment store.
    PutMessage {
        /// The message's metadata.
        meta: MessageMeta,
        /// The payload when it is stored inline. As bytes, not a sequence
        /// of u8: the same bincode encoding, copied in one go instead of
        /// visited byte by byte (log entries are decoded for every follower
        /// and for apply).
        #[serde(with = "serde_bytes")]
        inline: Option<Vec<u8>>,
        /// Client idempotency key, scoped to the mailbox.
        idempotency_key: Option<String>,
    },
    /// Remove a message.
    DeleteMessage {
        /// Message to remove.
        id: MessageId,
        /// When, ms since the epoch (proposer's clock).
        at_ms: i64,
    },
    /// Records from another DC's feed, in feed order. Each record applies at
    /// most once: the per-origin cursor is advanced in the same write.
    ApplyRemote {
        /// The DC whose feed these records come from.
        origin: String,
        /// `(sequence number, record)` pairs, ascending.
        records: Vec<(u64, FeedRecord)>,
        /// When the records arrived, ms since the epoch (proposer's clock).
        received_ms: i64,
        /// Messages among `records` whose every segment arrived with them
        /// and is already durable in this DC's segment store.
        payload_here: Vec<MessageId>,
    },
    /// This DC now holds every segment of a replicated message durably.
    PayloadHeld {
        /// The message.
        id: MessageId,
        /// When, ms since the epoch (proposer's clock).
        at_ms: i64,
    },
    /// Change user attributes of a message. Each attribute is a
    /// last-writer-wins register across DCs (hybrid logical clock, then DC
    /// name); the state machine stamps the change above every stamp this DC
    /// has seen, so a local change always supersedes what it could observe.
    SetAttributes {
        /// The message.
        id: MessageId,
        /// Attributes to set.
        set: BTreeMap<String, String>,
        /// Attributes to remove (applied before `set`).
        remove: Vec<String>,
        /// The proposer's wall clock, ms since the epoch.
        wall_ms: i64,
    },
    /// Several commands in one log entry (group commit). Each applies as if
    /// alone, in order: a refused one writes nothing and the rest go on.
    Batch(Vec<Command>),
    /// The set of DCs in the cluster (completion means "held by all of them").
    SetClusterDcs {
        /// DC names.
        dcs: Vec<String>,
    },
}

/// Successful outcome of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Nothing to report (membership changes, blank entries).
    None,
    /// A mailbox create; `created` is false if it existed already.
    Mailbox {
        /// The mailbox.
        record: MailboxRecord,
        /// Whether this command created it.
        created: bool,
    },
    /// A put; `deduplicated` when an idempotency key matched an earlier message.
    Message {
        /// The stored (or earlier) message.
        meta: MessageMeta,
        /// True if nothing new was stored.
        deduplicated: bool,
    },
    /// A delete went through.
    Deleted {
        /// The deleted message's metadata (its segments are now garbage).
        meta: MessageMeta,
    },
    /// A message's mutable fields changed.
    Updated {
        /// The message's metadata afterwards.
        meta: MessageMeta,
    },
    /// One result per command of a [`Command::Batch`], in order.
    Batch(Vec<CommandResponse>),
    /// Remote feed records were applied.
    Remote {
        /// How many were new.
        applied: u64,
        /// The origin's cursor afterwards.
        cursor: u64,
    },
}

/// Why a command was refused. Refusals are deterministic and write nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StateError {
    /// The mailbox does not exist.
    #[error("mailbox {path} does not exist")]
    MailboxNotFound {
        /// The missing mailbox.
        path: String,
    },
    /// The mailbox already exists.
    #[error("mailbox {path} already exists")]
    MailboxExists {
        /// The existing mailbox.
        path: String,
    },
    /// The parent of a new mailbox is missing (and `parents` was not set).
    #[error("parent mailbox {path} does not exist (create it first, or use parents)")]
    ParentNotFound {
        /// The missing parent.
        path: String,
    },
    /// The message does not exist.
    #[error("message {id} does not exist")]
    MessageNotFound {
        /// The missing id.
        id: String,
    },
    /// A message with this id was already committed (a replayed proposal).
    #[error("message {id} already exists")]
    MessageExists {
        /// The id.
        id: String,
    },
    /// Stored bytes could not be decoded: a bug or corruption.
    #[error("corrupt state record at {key}: {reason}")]
    Corrupt {
        /// Hex of the key.
        key: String,
        /// Decoder message.
        reason: String,
    },
    /// Remote feed records that do not continue where this DC's cursor on
    /// that feed stands (an out-of-order or stale proposal).
    #[error("records of DC {origin}'s feed start at {next}, but its cursor here is {cursor}")]
    FeedGap {
        /// The remote DC.
        origin: String,
        /// Last applied sequence number of its feed.
        cursor: u64,
        /// First new sequence number offered.
        next: u64,
    },
    /// Reading the underlying store failed.
    #[error("state read failed: {reason}")]
    Read {
        /// What the store said.
        reason: String,
    },
}

/// What the state machine returns for every applied entry.
pub type CommandResponse = Result<CommandResult, StateError>;

/// Read access to the committed state (a RocksDB column family in production,
/// a `BTreeMap` in tests).
pub trait KvRead {
    /// Point lookup.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError>;
    /// Up to `limit` entries whose key starts with `prefix` and is strictly
    /// greater than `after` (or from the start of the prefix when `None`), in
    /// key order.
    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StateError>;
}

/// Key/value pairs returned by a scan, in key order.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A key and its overlay value before the current command touched it.
type UndoEntry = (Vec<u8>, Option<Option<Vec<u8>>>);

/// Pending writes of one apply batch: later commands in the same batch must
/// see the writes of earlier ones, so reads go through this overlay first.
#[derive(Debug, Default)]
pub struct Overlay {
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Previous overlay values of keys touched by the command being
    /// applied, so a refused command can be rolled back.
    undo: Vec<UndoEntry>,
}

impl Overlay {
    /// An empty overlay.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn get(&self, base: &dyn KvRead, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => base.get(key),
        }
    }

    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let prev = self.writes.insert(key.clone(), Some(value));
        self.undo.push((key, prev));
    }

    pub(crate) fn delete(&mut self, key: Vec<u8>) {
        let prev = self.writes.insert(key.clone(), None);
        self.undo.push((key, prev));
    }

    fn rollback(&mut self) {
        while let Some((k, prev)) = self.undo.pop() {
            match prev {
                Some(v) => self.writes.insert(k, v),
                None => self.writes.remove(&k),
            };
        }
    }

    /// The accumulated writes, `None` meaning delete, in key order.
    pub fn into_writes(self) -> impl Iterator<Item = (Vec<u8>, Option<Vec<u8>>)> {
        self.writes.into_iter()
    }

    /// Number of pending writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("state records always serialize")
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], v: &[u8]) -> Result<T, StateError> {
    bincode::deserialize(v).map_err(|e| StateError::Corrupt {
        key: keys::hex(key),
        reason: e.to_string(),
    })
}

/// Applies one command against `base` + `overlay`, recording its writes in
/// `overlay`. A refused command leaves `overlay` untouched.
pub fn apply(
    base: &dyn KvRead,
    overlay: &mut Overlay,
    ctx: &ApplyCtx,
    cmd: &Command,
) -> CommandResponse {
    if let Command::Batch(cmds) = cmd {
        // Each command keeps its own undo scope.
        let results = cmds.iter().map(|c| apply(base, overlay, ctx, c)).collect();
        return Ok(CommandResult::Batch(results));
    }
    overlay.undo.clear();
    let r = apply_inner(base, overlay, ctx, cmd);
    if r.is_err() {
        overlay.rollback();
    }
    overlay.undo.clear();
    r
}

fn apply_inner(
    base: &dyn KvRead,
    overlay: &mut Overlay,
    ctx: &ApplyCtx,
    cmd: &Command,
) -> CommandResponse {
    match cmd {
        Command::CreateMailbox {
            path,
            parents,
            created_ms,
        } => {
            let mut created = Vec::new();
            let r = create_mailbox(base, overlay, path, *parents, *created_ms, &mut created)?;
            for record in created {
                replication::feed_append(base, overlay, &FeedRecord::Mailbox { record })?;
            }
            Ok(r)
        }
        Command::PutMessage {
            meta,
            inline,
            idempotency_key,
        } => {
            let r = put_message(
                base,
                overlay,
                meta,
                inline.as_deref(),
                idempotency_key.as_deref(),
            )?;
            if let CommandResult::Message {
                meta: stored,
                deduplicated: false,
            } = &r
            {
                if stored == meta && replication::mark_new_local(base, overlay, ctx, meta)? {
                    replication::feed_append(
                        base,
                        overlay,
                        &FeedRecord::Message {
                            meta: meta.clone(),
                            inline: inline.clone(),
                        },
                    )?;
                }
            }
            Ok(r)
        }
        Command::DeleteMessage { id, at_ms } => {
            let r = delete_message(base, overlay, id)?;
            replication::feed_append(
                base,
                overlay,
                &FeedRecord::Deleted {
                    id: *id,
                    at_ms: *at_ms,
                },
            )?;
            // The Deleted record is this DC's acknowledgement of its own
            // tombstone; the other DCs acknowledge through their feeds.
            replication::local_tombstone(base, overlay, ctx, id, *at_ms)?;
            Ok(r)
        }
        Command::SetAttributes {
            id,
            set,
            remove,
            wall_ms,
        } => replication::set_attributes_local(base, overlay, ctx, id, set, remove, *wall_ms),
        Command::ApplyRemote {
            origin,
            records,
            received_ms,
            payload_here,
        } => replication::apply_remote(
            base,
            overlay,
            ctx,
            origin,
            records,
            *received_ms,
            payload_here,
        ),
        Command::PayloadHeld { id, at_ms } => {
            replication::payload_held(base, overlay, ctx, id, *at_ms)
        }
        Command::Batch(_) => unreachable!("batches are unpacked in apply"),
        Command::SetClusterDcs { dcs } => {
            overlay.put(keys::CLUSTER_DCS.to_vec(), encode(dcs));
            // A DC leaving the cluster may have been the last one whose
            // acknowledgement some tombstones waited for.
            replication::purge_acknowledged_tombstones(base, overlay)?;
            Ok(CommandResult::None)
        }
    }
}

pub(crate) fn create_mailbox(
    base: &dyn KvRead,
    ov: &mut Overlay,
    path: &MailboxPath,
    parents: bool,
    created_ms: i64,
    created: &mut Vec<MailboxRecord>,
) -> CommandResponse {
    let key = keys::mailbox(path);
    if let Some(v) = ov.get(base, &key)? {
        return if parents {
            Ok(CommandResult::Mailbox {
                record: decode(&key, &v)?,
                created: false,
            })
        } else {
            Err(StateError::MailboxExists {
                path: path.to_string(),
            })
        };
    }
    let mut to_create = Vec::new();
    if let Some(parent) = path.parent() {
        for anc in parent.ancestors_and_self() {
            if ov.get(base, &keys::mailbox(&anc))?.is_none() {
                if !parents {
                    return Err(StateError::ParentNotFound {
                        path: anc.to_string(),
                    });
                }
                to_create.push(anc);
            }
        }
    }
    to_create.push(path.clone());
    let mut record = None;
    for p in to_create {
        let r = MailboxRecord {
            path: p.clone(),
            created_ms,
        };
        ov.put(keys::mailbox(&p), encode(&r));
        created.push(r.clone());
        record = Some(r);
    }
    Ok(CommandResult::Mailbox {
        record: record.expect("at least the mailbox itself"),
        created: true,
    })
}

pub(crate) fn put_message(
    base: &dyn KvRead,
    ov: &mut Overlay,
    meta: &MessageMeta,
    inline: Option<&[u8]>,
    idem: Option<&str>,
) -> CommandResponse {
    if ov.get(base, &keys::mailbox(&meta.mailbox))?.is_none() {
        return Err(StateError::MailboxNotFound {
            path: meta.mailbox.to_string(),
        });
    }
    if let Some(k) = idem {
        let ikey = keys::idempotency(&meta.mailbox, k);
        if let Some(raw) = ov.get(base, &ikey)? {
            let id = keys::decode_id(&ikey, &raw)?;
            let mkey = keys::message(&id);
            if let Some(v) = ov.get(base, &mkey)? {
                return Ok(CommandResult::Message {
                    meta: decode(&mkey, &v)?,
                    deduplicated: true,
                });
            }
        }
    }
    let mkey = keys::message(&meta.id);
    if let Some(v) = ov.get(base, &mkey)? {
        // The same proposal applied twice (a forward retried after its reply
        // was lost) is the same success; another message under this id is not.
        let existing: MessageMeta = decode(&mkey, &v)?;
        if &existing == meta {
            return Ok(CommandResult::Message {
                meta: existing,
                deduplicated: false,
            });
        }
        return Err(StateError::MessageExists {
            id: meta.id.to_string(),
        });
    }
    ov.put(mkey, encode(meta));
    ov.put(keys::listing(&meta.mailbox, &meta.id), Vec::new());
    if let Some(data) = inline {
        ov.put(keys::inline(&meta.id), data.to_vec());
    }
    if let Some(k) = idem {
        ov.put(
            keys::idempotency(&meta.mailbox, k),
            meta.id.as_bytes().to_vec(),
        );
        // Remember the key on the message so a delete can drop it.
        ov.put(keys::message_idempotency(&meta.id), k.as_bytes().to_vec());
    }
    Ok(CommandResult::Message {
        meta: meta.clone(),
        deduplicated: false,
    })
}

pub(crate) fn delete_message(
    base: &dyn KvRead,
    ov: &mut Overlay,
    id: &MessageId,
) -> CommandResponse {
    let mkey = keys::message(id);
    let Some(v) = ov.get(base, &mkey)? else {
        return Err(StateError::MessageNotFound { id: id.to_string() });
    };
    let meta: MessageMeta = decode(&mkey, &v)?;
    ov.delete(mkey);
    ov.delete(keys::listing(&meta.mailbox, id));
    ov.delete(keys::inline(id));
    ov.delete(keys::attributes(id));
    ov.delete(keys::missing(id));
    ov.delete(keys::metadata_since(id));
    let ik = keys::message_idempotency(id);
    if let Some(k) = ov.get(base, &ik)? {
        ov.delete(keys::idempotency(
            &meta.mailbox,
            &String::from_utf8_lossy(&k),
        ));
        ov.delete(ik);
    }
    Ok(CommandResult::Deleted { meta })
}

/// An in-memory [`KvRead`] for tests and benchmarks.
#[derive(Debug, Default, Clone)]
pub struct MemKv(pub BTreeMap<Vec<u8>, Vec<u8>>);

impl MemKv {
    /// Applies an overlay's writes.
    pub fn commit(&mut self, ov: Overlay) {
        for (k, v) in ov.into_writes() {
            match v {
                Some(v) => self.0.insert(k, v),
                None => self.0.remove(&k),
            };
        }
    }
}

impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.0.get(key).cloned())
    }

    fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StateError> {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        Ok(self
            .0
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests;
