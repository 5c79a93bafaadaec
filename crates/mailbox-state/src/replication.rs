//! Cross-DC replication inside the state machine: the own feed, applying
//! other DCs' feeds exactly once, replica acknowledgements and completion.
//!
//! - Every record that originates in this DC (mailbox created, message
//!   stored, message deleted, "this DC now holds message M") is appended to
//!   the DC's **feed** with the next sequence number, assigned here at apply
//!   time, so it is identical on every node of the DC.
//! - Records pulled from DC A's feed arrive as one `ApplyRemote` command; the
//!   cursor for A is advanced in the same write as the records, and records
//!   at or below the cursor are skipped, so each applies exactly once across
//!   retries, crashes and leader changes.
//! - A replicated message whose payload is inline is held on arrival; a
//!   segmented one enters the missing-payload index until the fetcher has
//!   copied its segments and proposes `PayloadHeld`.
//! - The origin DC records the moment every cluster DC holds a message
//!   (`complete`), deterministically: the latest of the holders' times.
//! - Deletes leave tombstones, so a late copy of a deleted message's record
//!   never brings it back.

use mailbox_types::{MailboxRecord, MessageId, MessageMeta};
use serde::{Deserialize, Serialize};

use crate::{
    create_mailbox, decode, delete_message, encode, keys, CommandResponse, CommandResult, KvRead,
    Overlay, StateError,
};

/// Facts about the applying DC that every node of the DC agrees on.
#[derive(Debug, Clone)]
pub struct ApplyCtx {
    /// Name of the DC whose log this is.
    pub local_dc: String,
}

impl ApplyCtx {
    /// Context of DC `local_dc`.
    pub fn new(local_dc: impl Into<String>) -> Self {
        Self {
            local_dc: local_dc.into(),
        }
    }
}

/// A record of a DC's feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeedRecord {
    /// A mailbox was created in the origin DC.
    Mailbox {
        /// The mailbox.
        record: MailboxRecord,
    },
    /// A message was stored in the origin DC.
    Message {
        /// Its metadata (segment list included).
        meta: MessageMeta,
        /// The payload when inline.
        inline: Option<Vec<u8>>,
    },
    /// A message was deleted in the origin DC.
    Deleted {
        /// The message.
        id: MessageId,
        /// When.
        at_ms: i64,
    },
    /// DC `dc` (the feed's origin) holds message `id` in full.
    Held {
        /// The message.
        id: MessageId,
        /// The holding DC.
        dc: String,
        /// Since when.
        at_ms: i64,
    },
}

pub(crate) fn feed_append(
    base: &dyn KvRead,
    ov: &mut Overlay,
    rec: &FeedRecord,
) -> Result<u64, StateError> {
    let seq = match ov.get(base, keys::FEED_SEQ)? {
        Some(v) => decode::<u64>(keys::FEED_SEQ, &v)? + 1,
        None => 1,
    };
    ov.put(keys::feed(seq), encode(rec));
    ov.put(keys::FEED_SEQ.to_vec(), encode(&seq));
    Ok(seq)
}

pub(crate) fn tombstone(ov: &mut Overlay, id: &MessageId, at_ms: i64) {
    ov.put(keys::tombstone(id), encode(&at_ms));
}

/// The cluster's DCs; `None` until the leader recorded them, and then no
/// message can be complete (we would not know whom to wait for).
fn cluster_dcs(base: &dyn KvRead, ov: &Overlay) -> Result<Option<Vec<String>>, StateError> {
    ov.get(base, keys::CLUSTER_DCS)?
        .map(|v| decode(keys::CLUSTER_DCS, &v))
        .transpose()
}

/// Records a new local message as held here; false if it already was (a
/// replayed proposal), in which case nothing is written.
pub(crate) fn mark_new_local(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    meta: &MessageMeta,
) -> Result<bool, StateError> {
    let hk = keys::holder(&meta.id, &ctx.local_dc);
    if ov.get(base, &hk)?.is_some() {
        return Ok(false);
    }
    ov.put(hk, encode(&meta.created_ms));
    maybe_complete(base, ov, ctx, meta)?;
    Ok(true)
}

/// At the origin: if every cluster DC holds `meta`, record when.
fn maybe_complete(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    meta: &MessageMeta,
) -> Result<(), StateError> {
    if meta.origin_dc != ctx.local_dc || ov.get(base, &keys::complete(&meta.id))?.is_some() {
        return Ok(());
    }
    let Some(dcs) = cluster_dcs(base, ov)? else {
        return Ok(());
    };
    let mut latest = i64::MIN;
    for dc in dcs {
        let k = keys::holder(&meta.id, &dc);
        match ov.get(base, &k)? {
            Some(v) => latest = latest.max(decode(&k, &v)?),
            None => return Ok(()),
        }
    }
    ov.put(keys::complete(&meta.id), encode(&latest));
    Ok(())
}

fn message(
    base: &dyn KvRead,
    ov: &Overlay,
    id: &MessageId,
) -> Result<Option<MessageMeta>, StateError> {
    let k = keys::message(id);
    ov.get(base, &k)?.map(|v| decode(&k, &v)).transpose()
}

pub(crate) fn apply_remote(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    origin: &str,
    records: &[(u64, FeedRecord)],
) -> CommandResponse {
    if origin == ctx.local_dc {
        return Err(StateError::Read {
            reason: format!("refusing to apply our own feed ({origin}) as remote"),
        });
    }
    let ck = keys::cursor(origin);
    let mut cursor: u64 = match ov.get(base, &ck)? {
        Some(v) => decode(&ck, &v)?,
        None => 0,
    };
    let mut applied = 0u64;
    for (seq, rec) in records {
        if *seq <= cursor {
            continue;
        }
        apply_one(base, ov, ctx, origin, rec)?;
        cursor = *seq;
        applied += 1;
    }
    ov.put(ck, encode(&cursor));
    Ok(CommandResult::Remote { applied, cursor })
}

fn apply_one(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    origin: &str,
    rec: &FeedRecord,
) -> Result<(), StateError> {
    match rec {
        FeedRecord::Mailbox { record } => {
            create_mailbox(
                base,
                ov,
                &record.path,
                true,
                record.created_ms,
                &mut Vec::new(),
            )?;
        }
        FeedRecord::Message { meta, inline } => {
            if ov.get(base, &keys::tombstone(&meta.id))?.is_some()
                || message(base, ov, &meta.id)?.is_some()
            {
                return Ok(());
            }
            // The mailbox may have been created in a third DC whose feed we
            // have not seen yet: create it implicitly.
            create_mailbox(
                base,
                ov,
                &meta.mailbox,
                true,
                meta.created_ms,
                &mut Vec::new(),
            )?;
            crate::put_message(base, ov, meta, inline.as_deref(), None)?;
            ov.put(keys::holder(&meta.id, origin), encode(&meta.created_ms));
            if inline.is_some() || meta.segments().is_empty() {
                // Arrived in full with the record.
                hold_locally(base, ov, ctx, meta, meta.created_ms)?;
            } else {
                ov.put(keys::missing(&meta.id), Vec::new());
            }
        }
        FeedRecord::Deleted { id, at_ms } => {
            if message(base, ov, id)?.is_some() {
                delete_message(base, ov, id)?;
            }
            ov.delete(keys::missing(id));
            tombstone(ov, id, *at_ms);
        }
        FeedRecord::Held { id, dc, at_ms } => {
            ov.put(keys::holder(id, dc), encode(at_ms));
            if let Some(meta) = message(base, ov, id)? {
                maybe_complete(base, ov, ctx, &meta)?;
            }
        }
    }
    Ok(())
}

/// This DC now holds `meta` in full: record it and tell the other DCs.
fn hold_locally(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    meta: &MessageMeta,
    at_ms: i64,
) -> Result<(), StateError> {
    let hk = keys::holder(&meta.id, &ctx.local_dc);
    if ov.get(base, &hk)?.is_some() {
        return Ok(());
    }
    ov.put(hk, encode(&at_ms));
    ov.delete(keys::missing(&meta.id));
    feed_append(
        base,
        ov,
        &FeedRecord::Held {
            id: meta.id,
            dc: ctx.local_dc.clone(),
            at_ms,
        },
    )?;
    maybe_complete(base, ov, ctx, meta)
}

pub(crate) fn payload_held(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    id: &MessageId,
    at_ms: i64,
) -> CommandResponse {
    match message(base, ov, id)? {
        // Deleted meanwhile: nothing to acknowledge.
        None => Ok(CommandResult::None),
        Some(meta) => {
            hold_locally(base, ov, ctx, &meta, at_ms)?;
            Ok(CommandResult::None)
        }
    }
}

/// Own feed records after `since`, at most `limit`.
pub fn feed_since(
    kv: &dyn KvRead,
    since: u64,
    limit: usize,
) -> Result<Vec<(u64, FeedRecord)>, StateError> {
    let after = keys::feed(since);
    let rows = kv.scan(keys::FEED_PREFIX, Some(&after), limit)?;
    rows.iter()
        .map(|(k, v)| {
            let seq =
                k[1..]
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StateError::Corrupt {
                        key: keys::hex(k),
                        reason: "bad feed key".into(),
                    })?;
            Ok((seq, decode(k, v)?))
        })
        .collect()
}

/// Last own feed sequence number (0 when empty).
pub fn feed_head(kv: &dyn KvRead) -> Result<u64, StateError> {
    kv.get(keys::FEED_SEQ)?
        .map(|v| decode(keys::FEED_SEQ, &v))
        .transpose()
        .map(|o| o.unwrap_or(0))
}

/// Last applied sequence number of `origin`'s feed.
pub fn cursor(kv: &dyn KvRead, origin: &str) -> Result<u64, StateError> {
    let k = keys::cursor(origin);
    kv.get(&k)?
        .map(|v| decode(&k, &v))
        .transpose()
        .map(|o| o.unwrap_or(0))
}

/// Messages whose metadata is here but whose payload is not, oldest first.
pub fn missing_payloads(kv: &dyn KvRead, limit: usize) -> Result<Vec<MessageMeta>, StateError> {
    let rows = kv.scan(keys::MISSING_PREFIX, None, limit)?;
    let mut out = Vec::new();
    for (k, _) in rows {
        let id = keys::decode_id(&k, &k[1..])?;
        if let Some(m) = crate::get_message(kv, &id)? {
            out.push(m);
        }
    }
    Ok(out)
}

/// DCs holding a message in full, with the time since when.
pub fn holders(kv: &dyn KvRead, id: &MessageId) -> Result<Vec<(String, i64)>, StateError> {
    let prefix = keys::holders_prefix(id);
    kv.scan(&prefix, None, 1024)?
        .into_iter()
        .map(|(k, v)| {
            Ok((
                String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                decode(&k, &v)?,
            ))
        })
        .collect()
}

/// When every DC held the message (recorded at the origin only).
pub fn complete_ms(kv: &dyn KvRead, id: &MessageId) -> Result<Option<i64>, StateError> {
    let k = keys::complete(id);
    kv.get(&k)?.map(|v| decode(&k, &v)).transpose()
}

/// The configured cluster DCs, if set.
pub fn configured_dcs(kv: &dyn KvRead) -> Result<Option<Vec<String>>, StateError> {
    kv.get(keys::CLUSTER_DCS)?
        .map(|v| decode(keys::CLUSTER_DCS, &v))
        .transpose()
}

/// Whether a message id was deleted.
pub fn is_tombstoned(kv: &dyn KvRead, id: &MessageId) -> Result<bool, StateError> {
    Ok(kv.get(&keys::tombstone(id))?.is_some())
}
