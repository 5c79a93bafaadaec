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
//!   never brings it back. Every DC acknowledges a tombstone in its own feed
//!   once it has also seen the message's creation (the deleting DC's
//!   `Deleted` record is its acknowledgement). A DC purges its tombstone when
//!   it knows every cluster DC acknowledged: by then it has applied the
//!   creation (its cursor on the origin's feed is past it) and every other
//!   DC's records about the message (each DC's feed orders them before its
//!   acknowledgement), so no record that could resurrect it is still due.
//! - Attributes are last-writer-wins registers per attribute name, stamped
//!   with a hybrid logical clock and the writing DC ([`Stamp`]); every DC
//!   keeps, per attribute, the greatest stamp seen and its value, so all DCs
//!   converge whatever order changes arrive in. A delete beats any change.

use std::collections::{BTreeMap, BTreeSet};

use mailbox_types::{Hlc, MailboxRecord, MessageId, MessageMeta, Stamp};
use serde::{Deserialize, Serialize};

use crate::{
    create_mailbox, decode, delete_message, encode, gone, keys, message, orphan, CommandResponse,
    CommandResult, KeyUse, KvRead, Overlay, StateError,
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
        /// The payload when inline (encoded as bytes, see `PutMessage`).
        /// The stored feed record leaves it out (the message record's
        /// payload is the one copy); [`feed_since`] puts it back.
        #[serde(with = "serde_bytes")]
        inline: Option<Vec<u8>>,
        /// The upload's idempotency key: it answers in every DC.
        idempotency_key: Option<String>,
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
    /// Attributes of a message were changed in the origin DC.
    Attributes {
        /// The message.
        id: MessageId,
        /// New values; `None` removes the attribute.
        changes: BTreeMap<String, Option<String>>,
        /// The change's stamp (last writer wins).
        stamp: Stamp,
    },
    /// DC `dc` (the feed's origin) holds the tombstone of message `id` and
    /// has seen its creation, so it will never store it again.
    TombstoneAck {
        /// The deleted message.
        id: MessageId,
        /// The acknowledging DC.
        dc: String,
        /// When the message was deleted.
        at_ms: i64,
    },
    // (New variants go last: bincode numbers them by position, and stored
    // feed records and log entries keep their numbers.)
    /// Sent in place of the [`FeedRecord::Message`] of an inline message
    /// that the origin removed since (deleted, or a twin), taking its
    /// payload with it: the receiver records it as created and gone, so
    /// the delete that follows is acknowledged and its key still answers.
    /// Never stored; [`feed_since`] makes it.
    Withdrawn {
        /// Its metadata.
        meta: MessageMeta,
        /// The upload's idempotency key.
        idempotency_key: Option<String>,
        /// Whether its delete was settled at the origin (every DC
        /// acknowledged it): a late acknowledgement is then old news.
        settled: bool,
    },
    /// An event rule was set (or deleted, `rule: None`) in the origin DC:
    /// a last-writer-wins register every DC keeps alike.
    Rule {
        /// The rule's name.
        name: String,
        /// The rule; `None` deletes it.
        rule: Option<mailbox_types::EventRule>,
        /// The change's stamp.
        stamp: Stamp,
    },
    /// A DC was suspended from completion, or resumed, in the origin DC
    /// (a last-writer-wins register per DC).
    Suspension {
        /// The suspended (or resumed) DC.
        dc: String,
        /// The register's new value.
        suspension: crate::events::Suspension,
    },
    /// An event as the DC handling it (or the one that raised it) changed
    /// it: every DC keeps the newest stamp.
    Event {
        /// The whole event.
        event: Box<mailbox_types::Event>,
    },
    /// Who handles a queue's events changed (a last-writer-wins register).
    QueueOwner {
        /// The queue.
        queue: String,
        /// The register's new value.
        owner: crate::events::QueueOwner,
    },
    /// A message's event for a rule was raised (and purged since): only
    /// in a resync, so a rebuilt origin never raises it again.
    EventGuard {
        /// The guard's key (message id and rule name).
        key: Vec<u8>,
        /// The event.
        id: mailbox_types::EventId,
    },
    /// An account register changed (a last-writer-wins register).
    Account {
        /// The register as the origin has it.
        record: Box<crate::accounts::AccountRecord>,
    },
}

/// What remains of a deleted message until every DC acknowledged the delete.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// When the message was deleted (earliest delete seen).
    pub at_ms: i64,
    /// Whether this DC has applied the message's creation (or never will
    /// have to, being its origin), i.e. no late record can recreate it.
    pub seen_creation: bool,
    /// DCs known to hold this tombstone having seen the creation.
    pub acks: BTreeSet<String>,
}

/// Last-writer-wins register of one attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttrRegister {
    /// Current value; `None` when the attribute was removed.
    pub value: Option<String>,
    /// Stamp of the write that set it.
    pub stamp: Stamp,
}

type AttrRegisters = BTreeMap<String, AttrRegister>;

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

fn load_tombstone(
    base: &dyn KvRead,
    ov: &Overlay,
    id: &MessageId,
) -> Result<Option<Tombstone>, StateError> {
    ov.load(base, &keys::tombstone(id))
}

/// Deletes a message in this DC: the delete, its feed record (which is
/// this DC's acknowledgement of its own tombstone; the other DCs
/// acknowledge through their feeds) and the tombstone.
pub(crate) fn delete_here(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    id: &MessageId,
    at_ms: i64,
) -> CommandResponse {
    let r = delete_message(base, ov, id, at_ms)?;
    feed_append(base, ov, &FeedRecord::Deleted { id: *id, at_ms })?;
    local_tombstone(base, ov, ctx, id, at_ms)?;
    Ok(r)
}

/// Removes the newer of two twins (same key, same payload) in this DC
/// only. No delete record and no tombstone: every DC sees both records
/// through the feeds and removes the twin itself, when it holds the older
/// copy (a delete record would make other DCs drop theirs before that);
/// the cursor on each feed (and the `Gone` record) keeps the twin's
/// record from applying again.
fn remove_twin(
    base: &dyn KvRead,
    ov: &mut Overlay,
    id: &MessageId,
    at_ms: i64,
) -> Result<(), StateError> {
    if message(base, ov, id)?.is_none() {
        return Ok(());
    }
    delete_message(base, ov, id, at_ms)?;
    ov.delete(keys::complete(id));
    for (k, _) in ov.scan(base, &keys::holders_prefix(id), None, 1024)? {
        ov.delete(k);
    }
    Ok(())
}

/// A message this DC held was deleted here.
pub(crate) fn local_tombstone(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    id: &MessageId,
    at_ms: i64,
) -> Result<(), StateError> {
    let t = Tombstone {
        at_ms,
        seen_creation: true,
        acks: BTreeSet::from([ctx.local_dc.clone()]),
    };
    settle_tombstone(base, ov, ctx, id, t)
}

/// DC `from` holds a tombstone for `id`: the message is gone everywhere.
fn remote_tombstone(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    id: &MessageId,
    from: &str,
    at_ms: i64,
) -> Result<(), StateError> {
    let present = message(base, ov, id)?.is_some();
    if present {
        delete_message(base, ov, id, at_ms)?;
    }
    let Some(mut t) = load_tombstone(base, ov, id)? else {
        // No tombstone, though the message was here: its tombstone was
        // purged, every DC (this one too) had acknowledged; a late
        // acknowledgement (a DC that joined since, reading old feeds) is
        // old news, and must not start a tombstone nobody will settle.
        let was_here = gone(base, ov, id)?;
        if !present && was_here.as_ref().is_some_and(|g| g.settled) {
            // But the sender may lack this DC's acknowledgement (it was in
            // this DC's feed before it was rebuilt and resynced): say it
            // again, once (every DC reads the feed; twice would ping-pong
            // with DCs doing the same), without a tombstone to wait on.
            let rk = keys::reacked(id);
            if from != ctx.local_dc && ov.get(base, &rk)?.is_none() {
                ov.put(rk, Vec::new());
                feed_append(
                    base,
                    ov,
                    &FeedRecord::TombstoneAck {
                        id: *id,
                        dc: ctx.local_dc.clone(),
                        at_ms,
                    },
                )?;
            }
            return Ok(());
        }
        let t = Tombstone {
            at_ms,
            seen_creation: present || was_here.is_some(),
            acks: BTreeSet::from([from.to_string()]),
        };
        return settle_tombstone(base, ov, ctx, id, t);
    };
    t.at_ms = t.at_ms.min(at_ms);
    t.seen_creation |= present;
    t.acks.insert(from.to_string());
    settle_tombstone(base, ov, ctx, id, t)
}

/// Acknowledges `t` in our feed when we can, then stores it, or purges it
/// when every cluster DC has acknowledged.
fn settle_tombstone(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    id: &MessageId,
    mut t: Tombstone,
) -> Result<(), StateError> {
    if t.seen_creation && t.acks.insert(ctx.local_dc.clone()) {
        feed_append(
            base,
            ov,
            &FeedRecord::TombstoneAck {
                id: *id,
                dc: ctx.local_dc.clone(),
                at_ms: t.at_ms,
            },
        )?;
    }
    if let Some(dcs) = cluster_dcs(base, ov)? {
        if dcs.iter().all(|d| t.acks.contains(d)) {
            return purge(base, ov, id, &dcs);
        }
    }
    ov.put(keys::tombstone(id), encode(&t));
    Ok(())
}

/// Forgets a deleted message entirely: tombstone, holders, completion.
fn purge(
    base: &dyn KvRead,
    ov: &mut Overlay,
    id: &MessageId,
    dcs: &[String],
) -> Result<(), StateError> {
    ov.delete(keys::tombstone(id));
    ov.delete(keys::complete(id));
    ov.delete(keys::attributes(id));
    ov.delete(keys::missing(id));
    for dc in dcs {
        ov.delete(keys::holder(id, dc));
    }
    // Holders recorded by DCs that have since left the cluster.
    for (k, _) in ov.scan(base, &keys::holders_prefix(id), None, 1024)? {
        ov.delete(k);
    }
    if let Some(mut g) = gone(base, ov, id)? {
        g.settled = true;
        ov.put(keys::gone(id), encode(&g));
    }
    Ok(())
}

/// After the cluster's DC list changed: purges tombstones that every
/// remaining DC has acknowledged.
pub(crate) fn purge_acknowledged_tombstones(
    base: &dyn KvRead,
    ov: &mut Overlay,
) -> Result<(), StateError> {
    let Some(dcs) = cluster_dcs(base, ov)? else {
        return Ok(());
    };
    let mut after: Option<Vec<u8>> = None;
    loop {
        let rows = ov.scan(base, keys::TOMBSTONE_PREFIX, after.as_deref(), 1024)?;
        let Some((last, _)) = rows.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        for (k, v) in &rows {
            let t: Tombstone = decode(k, v)?;
            if dcs.iter().all(|d| t.acks.contains(d)) {
                let id = keys::decode_id(k, &k[1..])?;
                purge(base, ov, &id, &dcs)?;
            }
        }
    }
}

fn load_attrs(
    base: &dyn KvRead,
    ov: &Overlay,
    id: &MessageId,
) -> Result<AttrRegisters, StateError> {
    let k = keys::attributes(id);
    Ok(ov
        .get(base, &k)?
        .map(|v| decode(&k, &v))
        .transpose()?
        .unwrap_or_default())
}

/// Merges `changes` written at `stamp` into `regs`; returns the changes that
/// won (their stamp is newer than the register's).
fn merge_attrs(
    regs: &mut AttrRegisters,
    changes: &BTreeMap<String, Option<String>>,
    stamp: &Stamp,
) -> Vec<(String, Option<String>)> {
    let mut won = Vec::new();
    for (name, value) in changes {
        if regs.get(name).is_some_and(|r| r.stamp >= *stamp) {
            continue;
        }
        regs.insert(
            name.clone(),
            AttrRegister {
                value: value.clone(),
                stamp: stamp.clone(),
            },
        );
        won.push((name.clone(), value.clone()));
    }
    won
}

fn apply_attr_values<'a>(
    attrs: &mut BTreeMap<String, String>,
    values: impl IntoIterator<Item = (&'a String, &'a Option<String>)>,
) {
    for (name, value) in values {
        match value {
            Some(v) => attrs.insert(name.clone(), v.clone()),
            None => attrs.remove(name),
        };
    }
}

pub(crate) fn max_hlc(base: &dyn KvRead, ov: &Overlay) -> Result<Hlc, StateError> {
    Ok(ov
        .get(base, keys::MAX_HLC)?
        .map(|v| decode(keys::MAX_HLC, &v))
        .transpose()?
        .unwrap_or_default())
}

/// A local attribute change: stamped above everything this DC has seen
/// (the message's creation included), so it wins over what the writer could
/// observe, and concurrent changes elsewhere are ordered by clock then DC.
pub(crate) fn set_attributes_local(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    id: &MessageId,
    set: &BTreeMap<String, String>,
    remove: &[String],
    wall_ms: i64,
) -> CommandResponse {
    let Some(mut meta) = message(base, ov, id)? else {
        return Err(StateError::MessageNotFound { id: id.to_string() });
    };
    let hlc = max_hlc(base, ov)?
        .max(Hlc::at(meta.created_ms))
        .tick(wall_ms);
    ov.put(keys::MAX_HLC.to_vec(), encode(&hlc));
    let stamp = Stamp::new(hlc, ctx.local_dc.clone());
    let mut changes: BTreeMap<String, Option<String>> =
        remove.iter().map(|k| (k.clone(), None)).collect();
    changes.extend(set.iter().map(|(k, v)| (k.clone(), Some(v.clone()))));
    let mut regs = load_attrs(base, ov, id)?;
    let won = merge_attrs(&mut regs, &changes, &stamp);
    apply_attr_values(&mut meta.attributes, won.iter().map(|(k, v)| (k, v)));
    ov.put(keys::attributes(id), encode(&regs));
    ov.put(keys::message(id), encode(&meta));
    feed_append(
        base,
        ov,
        &FeedRecord::Attributes {
            id: *id,
            changes,
            stamp,
        },
    )?;
    Ok(CommandResult::Updated { meta })
}

fn remote_attributes(
    base: &dyn KvRead,
    ov: &mut Overlay,
    id: &MessageId,
    changes: &BTreeMap<String, Option<String>>,
    stamp: &Stamp,
) -> Result<(), StateError> {
    // The "receive" step of the hybrid logical clock.
    if stamp.hlc > max_hlc(base, ov)? {
        ov.put(keys::MAX_HLC.to_vec(), encode(&stamp.hlc));
    }
    if load_tombstone(base, ov, id)?.is_some() {
        return Ok(()); // a delete beats any attribute change
    }
    let mut regs = load_attrs(base, ov, id)?;
    let won = merge_attrs(&mut regs, changes, stamp);
    if won.is_empty() {
        return Ok(());
    }
    ov.put(keys::attributes(id), encode(&regs));
    // Without the message yet (its creation comes from a third DC's feed),
    // the registers wait and are merged into it on arrival.
    if let Some(mut meta) = message(base, ov, id)? {
        apply_attr_values(&mut meta.attributes, won.iter().map(|(k, v)| (k, v)));
        ov.put(keys::message(id), encode(&meta));
    }
    Ok(())
}

/// The cluster's DCs; `None` until the leader recorded them, and then no
/// message can be complete (we would not know whom to wait for).
fn cluster_dcs(base: &dyn KvRead, ov: &Overlay) -> Result<Option<Vec<String>>, StateError> {
    ov.get(base, keys::CLUSTER_DCS)?
        .map(|v| decode(keys::CLUSTER_DCS, &v))
        .transpose()
}

/// Records a message just stored here (not a replay: `put_message`
/// recognises those) as held by this DC.
pub(crate) fn mark_new_local(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    meta: &MessageMeta,
) -> Result<(), StateError> {
    ov.put(
        keys::holder(&meta.id, &ctx.local_dc),
        encode(&meta.created_ms),
    );
    // Until every DC holds it (a smaller DC list can complete it too).
    ov.put(keys::incomplete(&meta.id), Vec::new());
    maybe_complete(base, ov, ctx, meta, meta.created_ms, true)
}

/// Asks for a re-check of every origin message not yet complete (a DC
/// was suspended or left the cluster: it may have been the last one
/// missing). The re-check runs in pages (`Command::RecheckCompletion`,
/// proposed by the leader while [`keys::RECHECK`] is present), so no
/// single entry does unbounded work; a new request starts over.
pub(crate) fn request_recheck(ov: &mut Overlay) {
    ov.put(keys::RECHECK.to_vec(), encode(&None::<MessageId>));
}

/// Origin messages a re-check page looks at, at most.
pub const RECHECK_PAGE: usize = 1000;

/// One page of the completion re-check; returns how many were looked at
/// and whether more are due.
pub(crate) fn recheck_completion(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    now_ms: i64,
) -> CommandResponse {
    let Some(cursor) = ov.load::<Option<MessageId>>(base, keys::RECHECK)? else {
        return Ok(CommandResult::Expired {
            count: 0,
            more: false,
        });
    };
    let after = cursor.map(|id| keys::incomplete(&id));
    let rows = ov.scan(
        base,
        keys::INCOMPLETE_PREFIX,
        after.as_deref(),
        RECHECK_PAGE,
    )?;
    let full = rows.len() == RECHECK_PAGE;
    let count = rows.len() as u64;
    let mut last = None;
    for (k, _) in rows {
        let id = keys::decode_id(&k, &k[1..])?;
        last = Some(id);
        match message(base, ov, &id)? {
            Some(meta) => maybe_complete(base, ov, ctx, &meta, now_ms, true)?,
            None => ov.delete(k),
        }
    }
    if full {
        ov.put(keys::RECHECK.to_vec(), encode(&last));
    } else {
        ov.delete(keys::RECHECK.to_vec());
    }
    Ok(CommandResult::Expired { count, more: full })
}

/// Whether a completion re-check is due (see [`request_recheck`]).
pub fn recheck_due(kv: &dyn KvRead) -> Result<bool, StateError> {
    Ok(kv.get(keys::RECHECK)?.is_some())
}

/// At the origin: if every cluster DC holds `meta`, record when, and raise
/// its events (in the same write: exactly once, whatever replays).
/// `now_ms` is the proposer's clock, when the events become due; `raise`
/// is false for holds learned through a resync (a DC rebuilt from empty
/// raised its messages' events before, and lost the records of them).
fn maybe_complete(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    meta: &MessageMeta,
    now_ms: i64,
    raise: bool,
) -> Result<(), StateError> {
    if meta.origin_dc != ctx.local_dc || ov.get(base, &keys::complete(&meta.id))?.is_some() {
        return Ok(());
    }
    let Some(dcs) = cluster_dcs(base, ov)? else {
        return Ok(());
    };
    let mut latest = i64::MIN;
    // DCs suspended from completion by an admin that do not hold it: the
    // message completes without them, and its events say so.
    let mut without = Vec::new();
    for dc in dcs {
        let k = keys::holder(&meta.id, &dc);
        match ov.get(base, &k)? {
            Some(v) => latest = latest.max(decode(&k, &v)?),
            None if crate::events::is_suspended(base, ov, &dc)? => without.push(dc),
            None => return Ok(()),
        }
    }
    ov.put(keys::complete(&meta.id), encode(&latest));
    ov.delete(keys::incomplete(&meta.id));
    if !raise {
        return Ok(());
    }
    crate::events::raise_events(base, ov, ctx, meta, latest, now_ms.max(latest), &without)
}

/// Refuses records of `origin`'s feed under another identity than the one
/// this DC's cursor on it belongs to; stores it on first contact.
fn check_identity(
    base: &dyn KvRead,
    ov: &mut Overlay,
    origin: &str,
    identity: &str,
) -> Result<(), StateError> {
    if !identity.is_empty() {
        let ik = keys::feed_identity(origin);
        match ov.get(base, &ik)? {
            Some(v) => {
                let expected: String = decode(&ik, &v)?;
                if expected != identity {
                    return Err(StateError::FeedIdentityChanged {
                        origin: origin.to_string(),
                        expected,
                        found: identity.to_string(),
                    });
                }
            }
            // First contact (or a cursor from before identities): the
            // cursor belongs to this feed from now on.
            None => ov.put(ik, encode(&identity.to_string())),
        }
    }
    Ok(())
}

/// What this DC last heard from another DC's feed (the proposer's clock,
/// key `j`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHeard {
    /// The last pull applied from it, records or a keep-alive: it was up
    /// and reachable then (a takeover from it waits for its silence).
    pub contact_ms: i64,
    /// The last pull after which this DC had applied the feed up to the
    /// head the origin reported: it had read everything the origin wrote
    /// until shortly before then (a DC back from an outage waits for this,
    /// see `events::check_caught_up`).
    pub caught_up_ms: i64,
}

/// What this DC last heard from `origin` (zeros: nothing yet).
pub fn peer_heard(kv: &dyn KvRead, origin: &str) -> Result<PeerHeard, StateError> {
    let k = keys::heard(origin);
    Ok(match kv.get(&k)? {
        Some(v) => decode(&k, &v)?,
        None => PeerHeard::default(),
    })
}

/// One `ApplyRemote` command's content.
pub(crate) struct Pulled<'a> {
    pub origin: &'a str,
    pub identity: &'a str,
    pub records: &'a [(u64, FeedRecord)],
    pub received_ms: i64,
    pub payload_here: &'a [MessageId],
    pub head: u64,
}

pub(crate) fn apply_remote(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    p: Pulled<'_>,
) -> CommandResponse {
    let Pulled {
        origin,
        identity,
        records,
        received_ms,
        payload_here,
        head,
    } = p;
    if origin == ctx.local_dc {
        return Err(StateError::OwnFeed {
            origin: origin.to_string(),
        });
    }
    check_identity(base, ov, origin, identity)?;
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
        // A feed is gap-free: applying past a gap would skip records for
        // good, since the cursor only moves forward. Refuse the batch (the
        // whole command rolls back); the replicator reconnects from the cursor.
        if *seq != cursor + 1 {
            return Err(StateError::FeedGap {
                origin: origin.to_string(),
                cursor,
                next: *seq,
            });
        }
        apply_one(
            base,
            ov,
            ctx,
            origin,
            rec,
            received_ms,
            payload_here,
            Via::Feed,
        )?;
        cursor = *seq;
        applied += 1;
    }
    ov.put(ck, encode(&cursor));
    let hk = keys::heard(origin);
    let mut heard: PeerHeard = ov.load(base, &hk)?.unwrap_or_default();
    heard.contact_ms = heard.contact_ms.max(received_ms);
    if cursor >= head {
        heard.caught_up_ms = heard.caught_up_ms.max(received_ms);
    }
    ov.put(hk, encode(&heard));
    Ok(CommandResult::Remote { applied, cursor })
}

/// How a record reached this DC.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The origin's feed: a `Message` record means the origin holds it.
    Feed,
    /// A resync of the origin's state: holds come as their own records.
    Resync,
}

#[allow(clippy::too_many_arguments)]
fn apply_one(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    origin: &str,
    rec: &FeedRecord,
    received_ms: i64,
    payload_here: &[MessageId],
    via: Via,
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
        FeedRecord::Message {
            meta,
            inline,
            idempotency_key,
        } => {
            if creation_known(base, ov, ctx, &meta.id)? {
                return Ok(());
            }
            let regs = load_attrs(base, ov, &meta.id)?;
            let merged;
            let meta = if regs.is_empty() {
                meta
            } else {
                // Attribute changes from another DC arrived first; every
                // change is newer than the creation, so they all apply.
                let mut m = meta.clone();
                apply_attr_values(&mut m.attributes, regs.iter().map(|(k, r)| (k, &r.value)));
                merged = m;
                &merged
            };
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
            let put = crate::put_message(
                base,
                ov,
                meta,
                inline.as_deref(),
                idempotency_key.as_deref(),
                KeyUse::Remote,
            )?;
            let duplicate = match put {
                crate::Put::NewDuplicate { winner, loser } => Some((winner, loser)),
                _ => None,
            };
            if let Some((winner, loser)) = duplicate {
                if loser == meta.id && held_here(base, ov, ctx, &winner)? {
                    // A twin of a file this DC already holds: gone at once.
                    return remove_twin(base, ov, &loser, received_ms);
                }
            }
            if via == Via::Feed {
                ov.put(keys::holder(&meta.id, origin), encode(&meta.created_ms));
            }
            ov.put(keys::metadata_since(&meta.id), encode(&received_ms));
            if inline.is_some() || meta.segments().is_empty() {
                // Arrived in full with the record: held since it arrived
                // (not since the origin created it, which may be an outage
                // earlier).
                hold_locally(base, ov, ctx, meta, received_ms, via == Via::Feed)?;
            } else if payload_here.contains(&meta.id) && orphan(base, ov, &meta.id)?.is_none() {
                // Segments were pushed with the record and stored first
                // (and the orphan collector did not condemn them while the
                // record was late: then they are fetched, and verified).
                hold_locally(base, ov, ctx, meta, received_ms, via == Via::Feed)?;
            } else {
                ov.put(keys::missing(&meta.id), Vec::new());
            }
            if let Some((winner, loser)) = duplicate {
                // Every DC sees both records and decides alike: the newer
                // copy goes, so the key answers with one message
                // everywhere; but only once this DC holds the older one
                // (the newer may be its only copy of the file until then).
                // Its `Gone` record keeps a replay of it a success.
                if held_here(base, ov, ctx, &winner)? {
                    remove_twin(base, ov, &loser, received_ms)?;
                } else {
                    ov.put(keys::merge(&winner), loser.as_bytes().to_vec());
                }
            }
        }
        FeedRecord::Withdrawn {
            meta,
            idempotency_key,
            settled,
        } => {
            if *settled && load_tombstone(base, ov, &meta.id)?.is_some() {
                // Every DC acknowledged its delete at the origin: nothing
                // to wait for here either.
                if let Some(dcs) = cluster_dcs(base, ov)? {
                    return purge(base, ov, &meta.id, &dcs);
                }
            }
            if creation_known(base, ov, ctx, &meta.id)? {
                return Ok(());
            }
            // Created and removed before we read it: it is recorded as
            // gone (its key answers, a replay is the same success, the
            // delete that follows is acknowledged), never listed.
            create_mailbox(
                base,
                ov,
                &meta.mailbox,
                true,
                meta.created_ms,
                &mut Vec::new(),
            )?;
            crate::put_message(
                base,
                ov,
                meta,
                None,
                idempotency_key.as_deref(),
                KeyUse::Remote,
            )?;
            crate::delete_message(base, ov, &meta.id, received_ms)?;
            if *settled {
                // Every DC acknowledged its delete: a late acknowledgement
                // is old news, not a tombstone to wait on.
                if let Some(mut g) = gone(base, ov, &meta.id)? {
                    g.settled = true;
                    ov.put(keys::gone(&meta.id), encode(&g));
                }
            }
        }
        FeedRecord::Deleted { id, at_ms } => {
            remote_tombstone(base, ov, ctx, id, origin, *at_ms)?;
        }
        FeedRecord::TombstoneAck { id, dc, at_ms } => {
            remote_tombstone(base, ov, ctx, id, dc, *at_ms)?;
        }
        FeedRecord::Attributes { id, changes, stamp } => {
            remote_attributes(base, ov, id, changes, stamp)?;
        }
        FeedRecord::Rule { name, rule, stamp } => {
            crate::events::set_rule_remote(base, ov, name, rule.as_ref(), stamp)?;
        }
        FeedRecord::Account { record } => {
            crate::accounts::set_account_remote(base, ov, record)?;
        }
        FeedRecord::Suspension { dc, suspension } => {
            crate::events::set_suspension_remote(base, ov, dc, suspension)?;
        }
        FeedRecord::Event { event } => {
            crate::events::apply_remote_event(base, ov, ctx, event, via == Via::Feed)?;
        }
        FeedRecord::QueueOwner { queue, owner } => {
            crate::events::set_owner_remote(base, ov, queue, owner)?;
        }
        FeedRecord::EventGuard { key, id } => {
            if key.first() == Some(&b'v') && ov.get(base, key)?.is_none() {
                ov.put(key.clone(), id.as_bytes().to_vec());
            }
        }
        FeedRecord::Held { id, dc, at_ms } => {
            // Removed here already (deleted, or a twin): nothing to track.
            // (A hold that arrives before the message, from a third DC's
            // feed, is kept: the message comes later.)
            if message(base, ov, id)?.is_none() && gone(base, ov, id)?.is_some() {
                return Ok(());
            }
            ov.put(keys::holder(id, dc), encode(at_ms));
            if let Some(meta) = message(base, ov, id)? {
                maybe_complete(base, ov, ctx, &meta, received_ms, via == Via::Feed)?;
            }
        }
    }
    Ok(())
}

/// A message's creation (its record, or its withdrawal) arrives: whether
/// this DC knows the message already. Deleted before we saw it: now we
/// have, and acknowledge the delete. Here already, or here and deleted
/// since (its tombstone purged): nothing to do.
fn creation_known(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    id: &MessageId,
) -> Result<bool, StateError> {
    if let Some(mut t) = load_tombstone(base, ov, id)? {
        if !t.seen_creation {
            t.seen_creation = true;
            settle_tombstone(base, ov, ctx, id, t)?;
        }
        return Ok(true);
    }
    Ok(message(base, ov, id)?.is_some() || gone(base, ov, id)?.is_some())
}

fn held_here(
    base: &dyn KvRead,
    ov: &Overlay,
    ctx: &ApplyCtx,
    id: &MessageId,
) -> Result<bool, StateError> {
    Ok(ov.get(base, &keys::holder(id, &ctx.local_dc))?.is_some())
}

/// This DC now holds `meta` in full: record it and tell the other DCs.
fn hold_locally(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    meta: &MessageMeta,
    at_ms: i64,
    raise: bool,
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
    maybe_complete(base, ov, ctx, meta, at_ms, raise)?;
    // A newer twin of this file waited for this DC to hold it.
    let mk = keys::merge(&meta.id);
    if let Some(raw) = ov.get(base, &mk)? {
        ov.delete(mk.clone());
        let loser = keys::decode_id(&mk, &raw)?;
        if message(base, ov, &loser)?.is_some() {
            remove_twin(base, ov, &loser, at_ms)?;
        }
    }
    Ok(())
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
            hold_locally(base, ov, ctx, &meta, at_ms, true)?;
            Ok(CommandResult::None)
        }
    }
}

/// Own feed records after `since`, at most `limit`, as they are sent:
/// inline payloads read from their messages (see [`FeedRecord::Withdrawn`]).
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
            Ok((seq, with_inline(kv, decode(k, v)?)?))
        })
        .collect()
}

/// Puts an inline message's payload back into its feed record.
fn with_inline(kv: &dyn KvRead, rec: FeedRecord) -> Result<FeedRecord, StateError> {
    let FeedRecord::Message {
        meta,
        inline: None,
        idempotency_key,
    } = rec
    else {
        return Ok(rec);
    };
    if !matches!(meta.payload, mailbox_types::Payload::Inline) {
        return Ok(FeedRecord::Message {
            meta,
            inline: None,
            idempotency_key,
        });
    }
    let k = keys::inline(&meta.id);
    match kv.get(&k)? {
        Some(data) => Ok(FeedRecord::Message {
            meta,
            inline: Some(data),
            idempotency_key,
        }),
        // Read a moment after the record: gone since, with its payload.
        None if kv.get(&keys::message(&meta.id))?.is_none() => {
            let settled = match kv.get(&keys::gone(&meta.id))? {
                Some(v) => decode::<crate::Gone>(&keys::gone(&meta.id), &v)?.settled,
                // Its record expired (after the retention): settled unless
                // a tombstone still waits.
                None => kv.get(&keys::tombstone(&meta.id))?.is_none(),
            };
            Ok(FeedRecord::Withdrawn {
                meta,
                idempotency_key,
                settled,
            })
        }
        None if meta.size == 0 => Ok(FeedRecord::Message {
            meta,
            inline: Some(Vec::new()),
            idempotency_key,
        }),
        None => Err(StateError::Corrupt {
            key: keys::hex(&k),
            reason: format!("inline message of {} bytes without its payload", meta.size),
        }),
    }
}

/// Last own feed sequence number (0 when empty).
pub fn feed_head(kv: &dyn KvRead) -> Result<u64, StateError> {
    kv.get(keys::FEED_SEQ)?
        .map(|v| decode(keys::FEED_SEQ, &v))
        .transpose()
        .map(|o| o.unwrap_or(0))
}

/// The identity of `origin`'s feed that this DC's cursor on it belongs to.
pub fn remote_feed_identity(kv: &dyn KvRead, origin: &str) -> Result<Option<String>, StateError> {
    let k = keys::feed_identity(origin);
    kv.get(&k)?.map(|v| decode(&k, &v)).transpose()
}

/// Last applied sequence number of `origin`'s feed.
pub fn cursor(kv: &dyn KvRead, origin: &str) -> Result<u64, StateError> {
    let k = keys::cursor(origin);
    kv.get(&k)?
        .map(|v| decode(&k, &v))
        .transpose()
        .map(|o| o.unwrap_or(0))
}

/// Messages whose metadata is here but whose payload is not, oldest
/// first, from after `after` (a page of the index at a time).
/// Also returns the last id of the index page read when the page was full
/// (where the next page starts), `None` at the end of the index.
pub fn missing_payloads_page(
    kv: &dyn KvRead,
    after: Option<&MessageId>,
    limit: usize,
) -> Result<(Vec<MessageMeta>, Option<MessageId>), StateError> {
    let after = after.map(keys::missing);
    let rows = kv.scan(keys::MISSING_PREFIX, after.as_deref(), limit)?;
    let next = match rows.last() {
        Some((k, _)) if rows.len() == limit => Some(keys::decode_id(k, &k[1..])?),
        _ => None,
    };
    let mut out = Vec::new();
    for (k, _) in rows {
        let id = keys::decode_id(&k, &k[1..])?;
        if let Some(m) = crate::get_message(kv, &id)? {
            out.push(m);
        }
    }
    Ok((out, next))
}

fn missing_payloads_after(
    kv: &dyn KvRead,
    after: Option<&MessageId>,
    limit: usize,
) -> Result<Vec<MessageMeta>, StateError> {
    let after = after.map(keys::missing);
    let rows = kv.scan(keys::MISSING_PREFIX, after.as_deref(), limit)?;
    let mut out = Vec::new();
    for (k, _) in rows {
        let id = keys::decode_id(&k, &k[1..])?;
        if let Some(m) = crate::get_message(kv, &id)? {
            out.push(m);
        }
    }
    Ok(out)
}

/// The first `limit` messages missing their payload here, oldest first.
pub fn missing_payloads(kv: &dyn KvRead, limit: usize) -> Result<Vec<MessageMeta>, StateError> {
    missing_payloads_after(kv, None, limit)
}

/// When this DC got a message's metadata: its arrival for replicated
/// messages, its creation for local ones.
pub fn metadata_since(kv: &dyn KvRead, meta: &MessageMeta) -> Result<i64, StateError> {
    let k = keys::metadata_since(&meta.id);
    Ok(kv
        .get(&k)?
        .map(|v| decode(&k, &v))
        .transpose()?
        .unwrap_or(meta.created_ms))
}

/// Whether `id` is in the missing-payload index.
pub fn is_missing(kv: &dyn KvRead, id: &MessageId) -> Result<bool, StateError> {
    Ok(kv.get(&keys::missing(id))?.is_some())
}

/// DCs holding a message in full, with the time since when.
pub fn holders(kv: &dyn KvRead, id: &MessageId) -> Result<Vec<(String, i64)>, StateError> {
    crate::named_records(kv, &keys::holders_prefix(id), 1024)
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

/// Whether a message id was deleted and not every DC has acknowledged it yet.
pub fn is_tombstoned(kv: &dyn KvRead, id: &MessageId) -> Result<bool, StateError> {
    Ok(kv.get(&keys::tombstone(id))?.is_some())
}

/// A message's tombstone, while it is kept.
pub fn tombstone(kv: &dyn KvRead, id: &MessageId) -> Result<Option<Tombstone>, StateError> {
    load_tombstone(kv, &Overlay::new(), id)
}

/// Tombstones still waiting for some DC's acknowledgement (counted up to
/// `limit`).
pub fn tombstone_count(kv: &dyn KvRead, limit: usize) -> Result<usize, StateError> {
    Ok(kv.scan(keys::TOMBSTONE_PREFIX, None, limit)?.len())
}

/// The last-writer-wins registers of a message's changed attributes.
pub fn attribute_registers(
    kv: &dyn KvRead,
    id: &MessageId,
) -> Result<BTreeMap<String, AttrRegister>, StateError> {
    load_attrs(kv, &Overlay::new(), id)
}

/// Feed records trimmed per [`Command::FeedCursors`] at most.
///
/// [`Command::FeedCursors`]: crate::Command::FeedCursors
pub const TRIM_MAX: u64 = 50_000;

/// Own feed records up to this sequence number are trimmed (0: none).
pub fn feed_floor(kv: &dyn KvRead) -> Result<u64, StateError> {
    kv.get(keys::FEED_FLOOR)?
        .map(|v| decode(keys::FEED_FLOOR, &v))
        .transpose()
        .map(|o| o.unwrap_or(0))
}

/// Remote DCs' reported cursors on this DC's feed.
pub fn feed_acks(kv: &dyn KvRead) -> Result<Vec<(String, crate::FeedAck)>, StateError> {
    kv.scan(keys::FEED_ACK_PREFIX, None, 1024)?
        .into_iter()
        .map(|(k, v)| {
            let dc = String::from_utf8_lossy(&k[1..]).into_owned();
            Ok((dc, decode(&k, &v)?))
        })
        .collect()
}

pub(crate) fn feed_cursors(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    cursors: &BTreeMap<String, crate::FeedAck>,
) -> CommandResponse {
    let head: u64 = ov.load(base, keys::FEED_SEQ)?.unwrap_or(0);
    for (dc, ack) in cursors {
        if *dc == ctx.local_dc {
            continue;
        }
        let k = keys::feed_ack(dc);
        let known: Option<crate::FeedAck> = ov.load(base, &k)?;
        // A cursor past the head is not one of ours (a stale report from
        // before this log was rebuilt): it must not trim anything.
        let cursor = ack.cursor.min(head);
        let newer = match &known {
            // The same DC's log: its cursor only moves forward.
            Some(k) if k.identity == ack.identity => cursor > k.cursor,
            // Rebuilt since (or first report): what it says now counts,
            // lower or not.
            _ => true,
        };
        if newer {
            ov.put(
                k,
                encode(&crate::FeedAck {
                    identity: ack.identity.clone(),
                    cursor,
                }),
            );
        }
    }
    let floor: u64 = ov.load(base, keys::FEED_FLOOR)?.unwrap_or(0);
    // Every other cluster DC must have applied a record before it goes; a
    // DC with no report yet keeps everything. Alone in the cluster, no one
    // reads the feed (a DC added later is resynced from the state).
    let Some(dcs) = cluster_dcs(base, ov)? else {
        return Ok(CommandResult::Trimmed { floor, more: false });
    };
    let mut target = head;
    for dc in dcs.iter().filter(|d| **d != ctx.local_dc) {
        let ack: Option<crate::FeedAck> = ov.load(base, &keys::feed_ack(dc))?;
        target = target.min(ack.map_or(0, |a| a.cursor));
    }
    let upto = target.min(floor.saturating_add(TRIM_MAX));
    if upto <= floor {
        return Ok(CommandResult::Trimmed { floor, more: false });
    }
    for seq in floor + 1..=upto {
        ov.delete(keys::feed(seq));
    }
    ov.put(keys::FEED_FLOOR.to_vec(), encode(&upto));
    Ok(CommandResult::Trimmed {
        floor: upto,
        more: upto < target,
    })
}

/// One [`Command::ApplyResync`], borrowed.
///
/// [`Command::ApplyResync`]: crate::Command::ApplyResync
pub(crate) struct Resync<'a> {
    pub origin: &'a str,
    pub identity: &'a str,
    pub records: &'a [FeedRecord],
    pub received_ms: i64,
    pub payload_here: &'a [MessageId],
    pub floor: u64,
    pub done: bool,
}

pub(crate) fn apply_resync(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    r: Resync<'_>,
) -> CommandResponse {
    if r.origin == ctx.local_dc {
        return Err(StateError::OwnFeed {
            origin: r.origin.to_string(),
        });
    }
    check_identity(base, ov, r.origin, r.identity)?;
    let ck = keys::cursor(r.origin);
    let cursor: u64 = ov.load(base, &ck)?.unwrap_or(0);
    // (A resync at floor 0, for a DC at cursor 0, applies until a feed
    // record moves the cursor.)
    if cursor > r.floor || (cursor == r.floor && cursor > 0) {
        // A resync from an older pull, overtaken by the feed: stale.
        return Ok(CommandResult::Remote { applied: 0, cursor });
    }
    for rec in r.records {
        apply_one(
            base,
            ov,
            ctx,
            r.origin,
            rec,
            r.received_ms,
            r.payload_here,
            Via::Resync,
        )?;
    }
    let cursor = if r.done {
        ov.put(ck, encode(&r.floor));
        r.floor
    } else {
        cursor
    };
    Ok(CommandResult::Remote {
        applied: r.records.len() as u64,
        cursor,
    })
}

/// A page of `origin`'s state as feed records, for a resync of DC `asker`
/// (see [`Command::ApplyResync`]), in these phases:
///
/// 0. every event rule in force, every rule delete (its stamp), every
///    DC suspension register, every queue-ownership register and every
///    event as it has it (the asker keeps the newest version), and the
///    guards of events purged since (so none is raised again): first, so
///    that messages completing during the resync meet them (and raise
///    nothing already raised);
/// 1. every mailbox;
/// 2. every message it holds: those it or `asker` originated in full
///    (payload, key; `asker`'s own only where the origin holds them, so a
///    DC rebuilt from empty gets its messages back from the copies
///    elsewhere), and for all its hold and attribute registers (what its
///    trimmed `Held` and `Attributes` records said);
/// 3. the messages it or `asker` originated that are gone, as `Withdrawn`
///    with their pending delete (after phase 2, so a message deleted
///    while the scan runs is in one of the two);
/// 4. its acknowledgements of pending tombstones;
/// 5. every account register (deleted ones too, so a delete wins there).
///
/// Returns the records and where the next page starts (`None`: done). A
/// page ends after `max_records` state rows or `max_inline` inline bytes.
///
/// [`Command::ApplyResync`]: crate::Command::ApplyResync
pub fn resync_page(
    kv: &dyn KvRead,
    origin: &str,
    asker: &str,
    after: Option<&[u8]>,
    max_records: usize,
    max_inline: usize,
) -> Result<(Vec<FeedRecord>, Option<Vec<u8>>), StateError> {
    // A position is the phase's number and the last key it read.
    const PHASES: [&[u8]; 11] = [
        keys::RULE_PREFIX,
        keys::RULE_DELETED_PREFIX,
        keys::SUSPENSION_PREFIX,
        keys::QUEUE_OWNER_PREFIX,
        keys::EVENT_PREFIX,
        b"v",
        b"M",
        b"m",
        b"g",
        keys::TOMBSTONE_PREFIX,
        keys::ACCOUNT_PREFIX,
    ];
    let mut out = Vec::new();
    let (mut rows_read, mut inline) = (0usize, 0usize);
    let (start, mut pos) = match after {
        Some([phase, key @ ..]) => (*phase as usize, Some(key.to_vec())),
        _ => (0, None),
    };
    for (n, phase) in PHASES.iter().enumerate().skip(start) {
        if n > start {
            pos = None;
        }
        loop {
            let rows = kv.scan(phase, pos.as_deref(), 64)?;
            let full = rows.len() == 64;
            for (k, v) in rows {
                match n {
                    0 => {
                        let r: crate::RuleRecord = decode(&k, &v)?;
                        out.push(FeedRecord::Rule {
                            name: String::from_utf8_lossy(&k[1..]).into_owned(),
                            rule: r.rule,
                            stamp: r.stamp,
                        });
                    }
                    1 => out.push(FeedRecord::Rule {
                        name: String::from_utf8_lossy(&k[1..]).into_owned(),
                        rule: None,
                        stamp: decode(&k, &v)?,
                    }),
                    2 => out.push(FeedRecord::Suspension {
                        dc: String::from_utf8_lossy(&k[1..]).into_owned(),
                        suspension: decode(&k, &v)?,
                    }),
                    3 => out.push(FeedRecord::QueueOwner {
                        queue: String::from_utf8_lossy(&k[1..]).into_owned(),
                        owner: decode(&k, &v)?,
                    }),
                    4 => out.push(crate::events::replica_copy(&decode(&k, &v)?)),
                    5 => {
                        // The guards of events purged after the retention
                        // (the others came with their events): a rebuilt
                        // origin must not raise those again.
                        let id = mailbox_types::EventId::from_bytes(
                            v.as_slice().try_into().map_err(|_| StateError::Corrupt {
                                key: keys::hex(&k),
                                reason: "bad event id in an event guard".into(),
                            })?,
                        );
                        if kv.get(&keys::event(&id))?.is_none() {
                            out.push(FeedRecord::EventGuard { key: k.clone(), id });
                        }
                    }
                    6 => out.push(FeedRecord::Mailbox {
                        record: decode(&k, &v)?,
                    }),
                    7 => {
                        let meta: MessageMeta = decode(&k, &v)?;
                        inline += resync_message(kv, origin, asker, meta, &mut out)?;
                    }
                    8 => {
                        // Of every origin: the asker records them as gone (a
                        // replayed creation then stays deleted) and can
                        // acknowledge their deletes.
                        let g: crate::Gone = decode(&k, &v)?;
                        {
                            let id = g.meta.id;
                            out.push(FeedRecord::Withdrawn {
                                idempotency_key: message_key(kv, &id)?,
                                meta: g.meta,
                                settled: g.settled,
                            });
                            if let Some(t) = tombstone(kv, &id)? {
                                if t.acks.contains(origin) {
                                    out.push(FeedRecord::Deleted { id, at_ms: t.at_ms });
                                }
                            }
                        }
                    }
                    10 => out.push(FeedRecord::Account {
                        record: Box::new(crate::accounts::decode_record(&k, &v)?),
                    }),
                    _ => {
                        let t: Tombstone = decode(&k, &v)?;
                        if t.acks.contains(origin) {
                            out.push(FeedRecord::TombstoneAck {
                                id: keys::decode_id(&k, &k[1..])?,
                                dc: origin.to_string(),
                                at_ms: t.at_ms,
                            });
                        }
                    }
                }
                rows_read += 1;
                let mut p = vec![n as u8];
                p.extend_from_slice(&k);
                pos = Some(k);
                if rows_read >= max_records || inline >= max_inline {
                    return Ok((out, Some(p)));
                }
            }
            if !full {
                break;
            }
        }
    }
    Ok((out, None))
}

fn message_key(kv: &dyn KvRead, id: &MessageId) -> Result<Option<String>, StateError> {
    Ok(kv
        .get(&keys::message_idempotency(id))?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// A message's records for a resync; returns its inline payload bytes.
fn resync_message(
    kv: &dyn KvRead,
    origin: &str,
    asker: &str,
    meta: MessageMeta,
    out: &mut Vec<FeedRecord>,
) -> Result<usize, StateError> {
    let id = meta.id;
    let hk = keys::holder(&id, origin);
    let held = kv.get(&hk)?.map(|v| decode::<i64>(&hk, &v)).transpose()?;
    // The record itself only for messages this feed carries (and the
    // asker's own, as a copy held here: the receiver counts the sender as
    // a holder).
    let full = meta.origin_dc == origin || (meta.origin_dc == asker && held.is_some());
    let mut bytes = 0;
    if full {
        let rec = with_inline(
            kv,
            FeedRecord::Message {
                idempotency_key: message_key(kv, &id)?,
                meta,
                inline: None,
            },
        )?;
        if let FeedRecord::Message {
            inline: Some(b), ..
        } = &rec
        {
            bytes = b.len();
        }
        out.push(rec);
    }
    if let Some(at_ms) = held {
        out.push(FeedRecord::Held {
            id,
            dc: origin.to_string(),
            at_ms,
        });
    }
    // The registers, so later concurrent changes compare against the
    // stamps that won here, not against the creation.
    let mut by_stamp: BTreeMap<Stamp, BTreeMap<String, Option<String>>> = BTreeMap::new();
    for (name, reg) in attribute_registers(kv, &id)? {
        by_stamp
            .entry(reg.stamp)
            .or_default()
            .insert(name, reg.value);
    }
    for (stamp, changes) in by_stamp {
        out.push(FeedRecord::Attributes { id, changes, stamp });
    }
    Ok(bytes)
}
