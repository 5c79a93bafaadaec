//! Event rules and replication-complete events, inside the state machine.
//!
//! - **Rules** are cluster configuration: each is a last-writer-wins
//!   register (hybrid logical clock, then DC name) that every DC's feed
//!   carries, so all DCs converge on the same rules whatever order changes
//!   arrive in. A deleted rule stays as a stamped tombstone, so an older
//!   write that arrives late cannot bring it back.
//! - **Raising.** When the origin DC records that every DC holds a message
//!   (`replication::maybe_complete`), it raises one event per enabled
//!   matching rule, in the same write. The event's id is derived from the
//!   message and the rule, and a per-message index says which rules already
//!   raised one, so a replayed log, a leader change or a re-evaluation
//!   (`EvaluateRule`) never raises a second event for the same pair.
//! - **Delivery state.** Leases, answers, backoff and dead-lettering are
//!   commands too, so every node of the DC agrees on each event's state and
//!   a leader change loses nothing: a lease taken before it is still
//!   honoured (or expires) after it. Time and randomness come from the
//!   proposer (`now_ms`, `seed`), never from the applying node.
//! - The attempt budget counts real failures only (a `retry` answer or an
//!   expired lease); a delivery alone costs nothing. Backoff is exponential
//!   with full jitter, drawn from the command's seed and the event id.
//! - **Indexes**, kept in step with each event by [`put_event`]: the due
//!   index (`w`) holds exactly the events a consumer may lease now or
//!   later (pending and not waiting behind an earlier event of their
//!   mailbox) and the leased ones (at their lease's end); the status index
//!   (`y`) serves listings and the dead-letter queue; per-queue counts
//!   (`S`) serve metrics without scans.
//! - **Replication and ownership.** Every DC holds every event. One DC
//!   *handles* each event (leases it, takes answers, replays it): its lane
//!   (the DC that raised it), unless an admin handed the queue to one DC
//!   (`TakeoverQueue`, a last-writer-wins register `Q`). The handling DC
//!   stamps each change (HLC) and sends the whole event through its feed;
//!   the others keep the newest stamp. Readers that act (lease, expire)
//!   read only the lanes this DC handles, so a takeover moves nothing: the
//!   new owner finds the taken-over events in their lanes, a lease that was
//!   running when the old owner died runs out here and the event is
//!   delivered again with the same id, and what completed there and
//!   reached this DC is never delivered again. A change the old owner made
//!   but never sent is lost with it: the takeover names the newest change
//!   seen from it, so an admin knows how far behind the hand-over starts.
//! - **Fencing a handler that comes back.** A takeover is refused (unless
//!   forced) while a DC losing the queue was heard from within
//!   [`TAKEOVER_SILENCE_MS`]; a DC that was out of action for longer than
//!   [`LATE_EXPIRY_MS`] leases nothing until it has caught up with every
//!   other DC's feed head. Together: an old handler back from an outage
//!   reads the takeover before it delivers again. Not covered: a handler
//!   cut off from the other DCs but not from its consumers keeps
//!   delivering until the link heals (duplicates with the same event ids,
//!   never losses).

use std::collections::BTreeMap;

use mailbox_types::event::MAX_ATTEMPT_HISTORY;
use mailbox_types::{
    Attempt, AttemptOutcome, Event, EventId, EventMessage, EventOrdering, EventRule, EventStatus,
    Lease, MessageId, MessageMeta, Stamp,
};
use serde::{Deserialize, Serialize};

use crate::replication::{feed_append, max_hlc, ApplyCtx, FeedRecord};
use crate::{
    decode, encode, keys, message, CommandResponse, CommandResult, KvRead, Overlay, StateError,
};

/// Rules a cluster may have at most (every completion reads them all).
pub const MAX_RULES: usize = 1000;
/// Events one lease command hands out at most.
pub const MAX_LEASE_BATCH: u32 = 1000;
/// Longest explicit retry delay a consumer may ask for (24 h).
pub const MAX_RETRY_DELAY_MS: u64 = 24 * 3600 * 1000;
/// Longest error text kept per attempt.
const MAX_ERROR_TEXT: usize = 2048;

/// A rule as stored: its value (`None` once deleted) and the stamp of the
/// write that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRecord {
    /// The rule; `None` after a delete.
    pub rule: Option<EventRule>,
    /// Who wrote it, and when.
    pub stamp: Stamp,
}

/// Events of one queue by status, and how many were raised in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Events ever raised into the queue (also the last raise sequence).
    pub raised: u64,
    /// Waiting for delivery.
    pub pending: u64,
    /// Leased to a consumer.
    pub processing: u64,
    /// Completed.
    pub complete: u64,
    /// Dead-lettered.
    pub failed: u64,
    /// Discarded from the dead-letter queue.
    pub discarded: u64,
    /// Times an event of the queue was dead-lettered, ever (a replayed
    /// event that fails again counts again).
    pub dead_lettered: u64,
    /// Finished events purged after the retention, ever.
    pub purged: u64,
    /// Per lane: no entry of the lane's due index is due before this:
    /// scans start here instead of at the index's head, where the entries
    /// of events already leased and answered were deleted (RocksDB would
    /// step over every one of those deletes until compaction, a cost that
    /// grew with the queue's history). A full key position, not just a
    /// time: a page of `rules evaluate` raises thousands of events due at
    /// one millisecond, and a floor at that millisecond stepped over the
    /// deletes of every one already leased. Also the list of the queue's
    /// lanes.
    pub due_floors: BTreeMap<String, DuePos>,
}

/// A position in a lane's due index: scans start just after it (a due
/// time and an event id, as in the index's keys).
pub type DuePos = (i64, [u8; 16]);

/// The position just before `pos` (scans start after a position, so a
/// floor that must include the entry at `pos` stands here).
fn before_pos(pos: DuePos) -> DuePos {
    if pos == (0, [0; 16]) {
        return pos; // The head: nothing is before it (no id is all zeros).
    }
    let (ms, mut id) = pos;
    for b in id.iter_mut().rev() {
        if *b > 0 {
            *b -= 1;
            return (ms, id);
        }
        *b = 0xff;
    }
    (ms.saturating_sub(1).max(0), [0xff; 16])
}

impl QueueCounts {
    /// Lane `lane`'s due floor (the head, when it has none yet).
    pub fn floor(&self, lane: &str) -> DuePos {
        self.due_floors.get(lane).copied().unwrap_or((0, [0; 16]))
    }

    fn lower_floor(&mut self, lane: &str, pos: DuePos) {
        let f = self.due_floors.entry(lane.to_string()).or_insert(pos);
        *f = (*f).min(pos);
    }
}

impl QueueCounts {
    fn slot(&mut self, s: EventStatus) -> Option<&mut u64> {
        match s {
            EventStatus::Pending => Some(&mut self.pending),
            EventStatus::Processing => Some(&mut self.processing),
            EventStatus::Complete => Some(&mut self.complete),
            EventStatus::Failed => Some(&mut self.failed),
            EventStatus::Discarded => Some(&mut self.discarded),
            EventStatus::PendingReplication => None,
        }
    }
}

/// A consumer's answer to a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventAck {
    /// Processed: done.
    Complete,
    /// A transient failure: deliver again after `delay_ms` (or the
    /// policy's backoff), unless the attempts are used up.
    Retry {
        /// Wait this long instead of the policy's backoff.
        delay_ms: Option<u64>,
        /// Why.
        reason: String,
    },
    /// A permanent failure: dead-letter now.
    Fail {
        /// Why.
        reason: String,
    },
    /// Still working: extend the lease.
    Progress {
        /// From now, this long (default: the policy's lease).
        lease_ms: Option<u64>,
    },
    /// Not processed, and no failure of the event's: the sink could not be
    /// reached (a webhook receiver that is down). Pending again after
    /// `delay_ms`; the attempt budget is untouched.
    Defer {
        /// Wait this long.
        delay_ms: u64,
        /// Why.
        reason: String,
    },
}

/// The one-byte code of a status in the status index.
pub fn status_code(s: EventStatus) -> u8 {
    match s {
        EventStatus::PendingReplication => b'_',
        EventStatus::Pending => b'p',
        EventStatus::Processing => b'r',
        EventStatus::Complete => b'c',
        EventStatus::Failed => b'f',
        EventStatus::Discarded => b'd',
    }
}

/// The key of position `pos` of `queue`'s lane `lane` (with an all-zero
/// id, just before every entry at its time: no event id is all zeros, ids
/// carry a version).
fn due_floor_key(queue: &str, lane: &str, pos: DuePos) -> Vec<u8> {
    keys::due(queue, lane, pos.0, &EventId::from_bytes(pos.1))
}

/// Just before every due-index entry at `ms` or later.
fn at_ms(ms: i64) -> DuePos {
    (ms, [0; 16])
}

/// The lease-end-index key of `ev`, while it is leased.
fn lease_key(ev: &Event) -> Option<Vec<u8>> {
    (ev.status == EventStatus::Processing)
        .then(|| keys::lease_end(&ev.queue, ev.lane(), ev.due_ms, &ev.id))
}

/// The due-index key of `ev`, if it belongs there.
fn due_key(ev: &Event) -> Option<Vec<u8>> {
    match ev.status {
        EventStatus::Pending if !ev.blocked => {
            Some(keys::due(&ev.queue, ev.lane(), ev.due_ms, &ev.id))
        }
        EventStatus::Processing => Some(keys::due(&ev.queue, ev.lane(), ev.due_ms, &ev.id)),
        _ => None,
    }
}

/// The retention-index key of `ev`, once it is finished for good
/// (dead-lettered events stay until replayed or discarded).
fn finished_key(ev: &Event) -> Option<Vec<u8>> {
    matches!(ev.status, EventStatus::Complete | EventStatus::Discarded)
        .then(|| keys::finished(ev.updated_ms, &ev.id))
}

/// The order-chain key of `ev` (per-mailbox ordering).
fn order_key(ev: &Event) -> Vec<u8> {
    keys::order(&ev.queue, ev.lane(), &ev.message.mailbox, ev.seq, &ev.id)
}

/// Who writes a change to an event.
#[derive(Clone, Copy)]
pub(crate) enum Writer<'a> {
    /// This DC (the one handling the event, or its origin raising it): the
    /// change is stamped and sent to the other DCs through the feed.
    Local(&'a ApplyCtx),
    /// Another DC's change, arrived through a feed (or a consequence of
    /// one, made alike in every DC that does not handle the event).
    Replica,
}

/// Attempts a replicated copy of an event carries at most (the newest):
/// a feed batch of events stays a few MiB whatever consumers answered.
pub const MAX_REPLICATED_ATTEMPTS: usize = 10;

/// The feed record of `ev`: the event with its newest attempts.
pub(crate) fn replica_copy(ev: &Event) -> FeedRecord {
    let mut copy = ev.clone();
    if copy.attempts.len() > MAX_REPLICATED_ATTEMPTS {
        copy.attempts
            .drain(..copy.attempts.len() - MAX_REPLICATED_ATTEMPTS);
    }
    FeedRecord::Event {
        event: Box::new(copy),
    }
}

/// Whether `ev` is the one deliverable (or running) event of its mailbox
/// chain: per-mailbox, not finished, not waiting.
fn runs(ev: &Event) -> bool {
    ev.ordering == EventOrdering::PerMailbox && !ev.status.is_final() && !ev.blocked
}

/// Events of `ev`'s mailbox chain that are deliverable or running (one at
/// most, but for a moment while copies from two handlers cross).
fn runners(base: &dyn KvRead, ov: &Overlay, ev: &Event) -> Result<u32, StateError> {
    Ok(ov
        .load::<u32>(
            base,
            &keys::chain_runners(&ev.queue, ev.lane(), &ev.message.mailbox),
        )?
        .unwrap_or(0))
}

fn load_counts(base: &dyn KvRead, ov: &Overlay, q: &str) -> Result<QueueCounts, StateError> {
    Ok(ov.load(base, &keys::queue(q))?.unwrap_or_default())
}

/// Whether `ev` may be delivered as far as its mailbox chain goes: it is
/// not per-mailbox, or it is its chain's head (the first unfinished).
fn chain_clear(base: &dyn KvRead, ov: &Overlay, ev: &Event) -> Result<bool, StateError> {
    if ev.ordering != EventOrdering::PerMailbox {
        return Ok(true);
    }
    Ok(chain_head(base, ov, ev, None)?.is_some_and(|h| h.id == ev.id))
}

/// The first live event of `ev`'s mailbox chain, skipping entries left
/// behind by older copies (their event gone, finished, or since moved);
/// with `stale`, those entries are collected there.
fn chain_head(
    base: &dyn KvRead,
    ov: &Overlay,
    ev: &Event,
    mut stale: Option<&mut Vec<Vec<u8>>>,
) -> Result<Option<Event>, StateError> {
    let chain = keys::order_prefix(&ev.queue, ev.lane(), &ev.message.mailbox);
    let mut after: Option<Vec<u8>> = None;
    loop {
        let rows = ov.scan(base, &chain, after.as_deref(), 64)?;
        let Some((last, _)) = rows.last() else {
            return Ok(None);
        };
        let last = last.clone();
        for (k, v) in rows {
            let id =
                EventId::from_bytes(v.as_slice().try_into().map_err(|_| StateError::Corrupt {
                    key: keys::hex(&k),
                    reason: "bad event id in the order chain".into(),
                })?);
            match load_event(base, ov, &id)? {
                Some(e) if !e.status.is_final() && order_key(&e) == k => return Ok(Some(e)),
                _ => {
                    if let Some(s) = stale.as_deref_mut() {
                        s.push(k);
                    }
                }
            }
        }
        after = Some(last);
    }
}

/// After `ev` was made to wait again at lease time: if nothing of its
/// chain is running, its head is released (it may be waiting behind an
/// event the crossed copies had released, which is now waiting too).
fn release_if_idle(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    ev: &Event,
    now_ms: i64,
) -> Result<(), StateError> {
    let Some(mut head) = chain_head(base, ov, ev, None)? else {
        return Ok(());
    };
    if !head.blocked {
        return Ok(());
    }
    let chain = keys::order_prefix(&ev.queue, ev.lane(), &ev.message.mailbox);
    // A long chain is all waiting but its head and what crossed copies
    // released; a bounded look finds a running one in practice.
    for (_, v) in ov.scan(base, &chain, None, 256)? {
        if let Ok(id) = <[u8; 16]>::try_from(v.as_slice()) {
            if load_event(base, ov, &EventId::from_bytes(id))?
                .is_some_and(|e| e.status == EventStatus::Processing)
            {
                return Ok(());
            }
        }
    }
    let prev = head.clone();
    head.blocked = false;
    head.due_ms = head.due_ms.max(now_ms);
    head.updated_ms = head.updated_ms.max(now_ms);
    put_event(base, ov, Writer::Local(ctx), Some(&prev), &mut head)
}

/// Stores `ev` (whose stored form was `prev`) with its indexes and counts;
/// a handler's change is stamped and sent through the feed first.
fn put_event(
    base: &dyn KvRead,
    ov: &mut Overlay,
    w: Writer<'_>,
    prev: Option<&Event>,
    ev: &mut Event,
) -> Result<(), StateError> {
    if let Writer::Local(ctx) = w {
        let mut hlc = max_hlc(base, ov)?;
        if let Some(p) = prev {
            hlc = hlc.max(p.stamp.hlc);
        }
        let hlc = hlc.tick(ev.updated_ms);
        ov.put(keys::MAX_HLC.to_vec(), encode(&hlc));
        ev.stamp = Stamp::new(hlc, ctx.local_dc.clone());
        feed_append(base, ov, &replica_copy(ev))?;
        // Dead-lettered here: the rule's error webhook is told (by the
        // leader's notifier, from this outbox, so a crash loses nothing).
        if ev.status == EventStatus::Failed && prev.is_none_or(|p| p.status != EventStatus::Failed)
        {
            let notify = load_rule(base, ov, &ev.rule)?
                .and_then(|r| r.rule)
                .is_some_and(|r| r.error_webhook.is_some());
            if notify {
                ov.put(keys::notice(&ev.rule, ev.updated_ms, &ev.id), Vec::new());
            }
        }
    }
    let mut counts = load_counts(base, ov, &ev.queue)?;
    if let Some(p) = prev {
        if p.status != ev.status {
            ov.delete(keys::status(status_code(p.status), &p.queue, &p.id));
            if let Some(c) = counts.slot(p.status) {
                *c = c.saturating_sub(1);
            }
            if let Some(c) = counts.slot(ev.status) {
                *c += 1;
            }
            if ev.status == EventStatus::Failed {
                counts.dead_lettered += 1;
            }
        }
        if let Some(k) = due_key(p) {
            if due_key(ev).as_ref() != Some(&k) {
                ov.delete(k);
            }
        }
        if let Some(k) = lease_key(p) {
            if lease_key(ev).as_ref() != Some(&k) {
                ov.delete(k);
            }
        }
        if let Some(k) = finished_key(p) {
            if finished_key(ev).as_ref() != Some(&k) {
                ov.delete(k);
            }
        }
    } else if let Some(c) = counts.slot(ev.status) {
        *c += 1;
    }
    ov.put(
        keys::status(status_code(ev.status), &ev.queue, &ev.id),
        Vec::new(),
    );
    if let Some(k) = due_key(ev) {
        counts.lower_floor(ev.lane(), before_pos((ev.due_ms.max(0), *ev.id.as_bytes())));
        ov.put(k, Vec::new());
    }
    if let Some(k) = lease_key(ev) {
        ov.put(k, Vec::new());
    }
    if let Some(k) = finished_key(ev) {
        ov.put(k, Vec::new());
    }
    ov.put(keys::queue(&ev.queue), encode(&counts));
    ov.put(keys::event(&ev.id), encode(ev));
    if ev.ordering == EventOrdering::PerMailbox {
        // The mailbox chain holds the unfinished events, and counts the
        // one that runs. (A copy from another DC may carry another raise
        // sequence, after a rebuild: the old position goes.)
        if let Some(p) = prev.filter(|p| order_key(p) != order_key(ev)) {
            ov.delete(order_key(p));
        }
        if ev.status.is_final() {
            ov.delete(order_key(ev));
        } else {
            ov.put(order_key(ev), ev.id.as_bytes().to_vec());
        }
        let was = prev.is_some_and(runs);
        if was != runs(ev) {
            let k = keys::chain_runners(&ev.queue, ev.lane(), &ev.message.mailbox);
            let n = runners(base, ov, ev)?;
            let n = if runs(ev) { n + 1 } else { n.saturating_sub(1) };
            if n == 0 {
                ov.delete(k);
            } else {
                ov.put(k, encode(&n));
            }
        }
        // The DC handling it keeps the chain going: when nothing of the
        // mailbox runs, its first waiting event is released.
        if let Writer::Local(ctx) = w {
            if handler_of(base, ov, ev)? == ctx.local_dc {
                release_head(base, ov, w, ev, ev.updated_ms)?;
            }
        }
    }
    Ok(())
}

/// The event id that ends an index key.
fn tail_event_id(k: &[u8]) -> Result<EventId, StateError> {
    let b: [u8; 16] = k
        .get(k.len().saturating_sub(16)..)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| StateError::Corrupt {
            key: keys::hex(k),
            reason: "index key without an event id".into(),
        })?;
    Ok(EventId::from_bytes(b))
}

fn load_event(base: &dyn KvRead, ov: &Overlay, id: &EventId) -> Result<Option<Event>, StateError> {
    ov.load(base, &keys::event(id))
}

/// A rule's register: in force (`R`), or deleted (`U`, its stamp only).
fn load_rule(
    base: &dyn KvRead,
    ov: &Overlay,
    name: &str,
) -> Result<Option<RuleRecord>, StateError> {
    if let Some(r) = ov.load::<RuleRecord>(base, &keys::rule(name))? {
        return Ok(Some(r));
    }
    Ok(ov
        .load::<Stamp>(base, &keys::rule_deleted(name))?
        .map(|stamp| RuleRecord { rule: None, stamp }))
}

fn store_rule(ov: &mut Overlay, name: &str, rec: &RuleRecord) {
    if rec.rule.is_some() {
        ov.put(keys::rule(name), encode(rec));
        ov.delete(keys::rule_deleted(name));
    } else {
        ov.delete(keys::rule(name));
        ov.put(keys::rule_deleted(name), encode(&rec.stamp));
    }
}

/// A stable pseudo-random number from the proposer's seed, the event and a
/// counter (splitmix64 over their bytes): every node draws the same.
fn draw(seed: u64, id: &EventId, n: u32) -> u64 {
    let mut x = seed ^ u64::from(n).rotate_left(32);
    for chunk in id.as_bytes().chunks(8) {
        x ^= u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x = z ^ (z >> 31);
    }
    x
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_ERROR_TEXT {
        return s.to_string();
    }
    let mut end = MAX_ERROR_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

// ---------------------------------------------------------------- rules

/// A local rule change (`rule: None` deletes `name`), stamped above
/// everything this DC has seen and sent to every DC through the feed.
pub(crate) fn set_rule_local(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    name: &str,
    rule: Option<&EventRule>,
    wall_ms: i64,
) -> CommandResponse {
    let prev = load_rule(base, ov, name)?;
    match rule {
        Some(r) => {
            r.validate().map_err(|e| StateError::Invalid {
                reason: e.to_string(),
            })?;
            // A webhook rule's queue is its own: the webhook delivers
            // whatever is in it, and a pull consumer would race it.
            for (k, v) in ov.scan(base, keys::RULE_PREFIX, None, usize::MAX)? {
                let other: RuleRecord = decode(&k, &v)?;
                if let Some(o) = other
                    .rule
                    .filter(|o| o.name != r.name && o.queue == r.queue)
                {
                    if r.webhook.is_some() || o.webhook.is_some() {
                        return Err(StateError::Invalid {
                            reason: format!(
                                "queue {} is used by rule {}: a rule with a webhook needs a queue of its own",
                                r.queue, o.name
                            ),
                        });
                    }
                }
            }
            if prev.as_ref().is_none_or(|p| p.rule.is_none()) {
                let live = ov.scan(base, keys::RULE_PREFIX, None, MAX_RULES)?.len();
                if live >= MAX_RULES {
                    return Err(StateError::Invalid {
                        reason: format!("a cluster has {MAX_RULES} rules at most"),
                    });
                }
            }
        }
        None => match &prev {
            None => {
                return Err(StateError::RuleNotFound {
                    name: name.to_string(),
                })
            }
            // Deleted already (a retried proposal): the same success.
            Some(p) if p.rule.is_none() => return Ok(CommandResult::None),
            Some(_) => {}
        },
    }
    let mut hlc = max_hlc(base, ov)?;
    if let Some(p) = &prev {
        hlc = hlc.max(p.stamp.hlc);
    }
    let hlc = hlc.tick(wall_ms);
    ov.put(keys::MAX_HLC.to_vec(), encode(&hlc));
    let stamp = Stamp::new(hlc, ctx.local_dc.clone());
    let rec = RuleRecord {
        rule: rule.cloned(),
        stamp: stamp.clone(),
    };
    store_rule(ov, name, &rec);
    feed_append(
        base,
        ov,
        &FeedRecord::Rule {
            name: name.to_string(),
            rule: rule.cloned(),
            stamp,
        },
    )?;
    Ok(CommandResult::None)
}

/// A rule change from another DC's feed: kept if its stamp is newer than
/// what is here.
pub(crate) fn set_rule_remote(
    base: &dyn KvRead,
    ov: &mut Overlay,
    name: &str,
    rule: Option<&EventRule>,
    stamp: &Stamp,
) -> Result<(), StateError> {
    // The "receive" step of the hybrid logical clock.
    if stamp.hlc > max_hlc(base, ov)? {
        ov.put(keys::MAX_HLC.to_vec(), encode(&stamp.hlc));
    }
    if load_rule(base, ov, name)?.is_some_and(|p| p.stamp >= *stamp) {
        return Ok(());
    }
    // No limit here: every DC must converge on the same rules.
    store_rule(
        ov,
        name,
        &RuleRecord {
            rule: rule.cloned(),
            stamp: stamp.clone(),
        },
    );
    Ok(())
}

/// The rules in force, by name.
pub fn list_rules(kv: &dyn KvRead) -> Result<Vec<(EventRule, Stamp)>, StateError> {
    kv.scan(keys::RULE_PREFIX, None, usize::MAX)?
        .into_iter()
        .filter_map(|(k, v)| match decode::<RuleRecord>(&k, &v) {
            Ok(RuleRecord {
                rule: Some(r),
                stamp,
            }) => Some(Ok((r, stamp))),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect()
}

/// One rule in force.
pub fn get_rule(kv: &dyn KvRead, name: &str) -> Result<Option<EventRule>, StateError> {
    let k = keys::rule(name);
    Ok(kv
        .get(&k)?
        .map(|v| decode::<RuleRecord>(&k, &v))
        .transpose()?
        .and_then(|r| r.rule))
}

// ---------------------------------------------------------- suspension

/// Whether a DC is suspended from completion: a last-writer-wins register
/// per DC, cluster configuration like the rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// Suspended (messages complete without it) or resumed.
    pub suspended: bool,
    /// The admin's reason.
    pub reason: String,
    /// When it was set (the proposer's clock).
    pub at_ms: i64,
    /// Who set it, and when.
    pub stamp: Stamp,
}

/// Whether `dc` is suspended from completion now.
pub(crate) fn is_suspended(base: &dyn KvRead, ov: &Overlay, dc: &str) -> Result<bool, StateError> {
    Ok(ov
        .load::<Suspension>(base, &keys::suspension(dc))?
        .is_some_and(|s| s.suspended))
}

/// An admin suspends (or resumes) DC `dc` here; sent to every DC. A
/// suspension completes at once every message here that only `dc` lacked.
pub(crate) fn set_suspension_local(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    dc: &str,
    suspended: bool,
    reason: &str,
    wall_ms: i64,
) -> CommandResponse {
    if dc == ctx.local_dc {
        return Err(StateError::Invalid {
            reason: format!("{dc} is this DC: suspend it from another DC"),
        });
    }
    let dcs: Vec<String> = ov.load(base, keys::CLUSTER_DCS)?.unwrap_or_default();
    if !dcs.iter().any(|d| d == dc) {
        return Err(StateError::Invalid {
            reason: format!("{dc} is not a DC of this cluster ({})", dcs.join(", ")),
        });
    }
    let prev = ov.load::<Suspension>(base, &keys::suspension(dc))?;
    let mut hlc = max_hlc(base, ov)?;
    if let Some(p) = &prev {
        hlc = hlc.max(p.stamp.hlc);
    }
    let hlc = hlc.tick(wall_ms);
    ov.put(keys::MAX_HLC.to_vec(), encode(&hlc));
    let s = Suspension {
        suspended,
        reason: clip(reason),
        at_ms: wall_ms,
        stamp: Stamp::new(hlc, ctx.local_dc.clone()),
    };
    ov.put(keys::suspension(dc), encode(&s));
    feed_append(
        base,
        ov,
        &FeedRecord::Suspension {
            dc: dc.to_string(),
            suspension: s,
        },
    )?;
    if suspended {
        crate::replication::request_recheck(ov);
    }
    Ok(CommandResult::None)
}

/// A suspension register from another DC's feed: kept if newer.
pub(crate) fn set_suspension_remote(
    base: &dyn KvRead,
    ov: &mut Overlay,
    dc: &str,
    s: &Suspension,
) -> Result<(), StateError> {
    if s.stamp.hlc > max_hlc(base, ov)? {
        ov.put(keys::MAX_HLC.to_vec(), encode(&s.stamp.hlc));
    }
    if ov
        .load::<Suspension>(base, &keys::suspension(dc))?
        .is_some_and(|p| p.stamp >= s.stamp)
    {
        return Ok(());
    }
    ov.put(keys::suspension(dc), encode(s));
    if s.suspended {
        crate::replication::request_recheck(ov);
    }
    Ok(())
}

/// Every DC's suspension register (resumed ones too), by DC.
pub fn suspensions(kv: &dyn KvRead) -> Result<Vec<(String, Suspension)>, StateError> {
    kv.scan(keys::SUSPENSION_PREFIX, None, usize::MAX)?
        .into_iter()
        .map(|(k, v)| {
            Ok((
                String::from_utf8_lossy(&k[1..]).into_owned(),
                decode(&k, &v)?,
            ))
        })
        .collect()
}

// ------------------------------------------------------------ ownership

/// Who handles a queue's events: a last-writer-wins register per queue,
/// cluster configuration like the rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOwner {
    /// The DC that handles every event of the queue; `None`: each event's
    /// lane (the DC that raised it), the default.
    pub dc: Option<String>,
    /// The admin's reason.
    pub reason: String,
    /// When it was set (the proposer's clock).
    pub at_ms: i64,
    /// Who set it, and when.
    pub stamp: Stamp,
}

fn load_owner(
    base: &dyn KvRead,
    ov: &Overlay,
    queue: &str,
) -> Result<Option<QueueOwner>, StateError> {
    ov.load(base, &keys::queue_owner(queue))
}

/// The DC that took `queue` over, if it is still a DC of the cluster (a
/// DC that left hands its queues back to their lanes).
fn taken_by(base: &dyn KvRead, ov: &Overlay, queue: &str) -> Result<Option<String>, StateError> {
    let Some(dc) = load_owner(base, ov, queue)?.and_then(|o| o.dc) else {
        return Ok(None);
    };
    let dcs: Vec<String> = ov.load(base, keys::CLUSTER_DCS)?.unwrap_or_default();
    Ok((dcs.is_empty() || dcs.contains(&dc)).then_some(dc))
}

/// The DC that handles `ev` (it leases it, takes its answers, replays it).
fn handler_of(base: &dyn KvRead, ov: &Overlay, ev: &Event) -> Result<String, StateError> {
    Ok(taken_by(base, ov, &ev.queue)?.unwrap_or_else(|| ev.lane().to_string()))
}

/// Refuses a change to `ev` unless this DC handles it.
fn check_handled_here(
    base: &dyn KvRead,
    ov: &Overlay,
    ctx: &ApplyCtx,
    ev: &Event,
) -> Result<(), StateError> {
    let dc = handler_of(base, ov, ev)?;
    if dc == ctx.local_dc {
        Ok(())
    } else {
        Err(StateError::HandledElsewhere {
            queue: ev.queue.clone(),
            dc,
        })
    }
}

/// The lanes of `queue` that DC `local` handles: its own, every lane of a
/// queue it took over, none of a queue another DC took over.
fn lanes_here(
    base: &dyn KvRead,
    ov: &Overlay,
    local: &str,
    queue: &str,
) -> Result<Result<Vec<String>, String>, StateError> {
    match taken_by(base, ov, queue)? {
        None => Ok(Ok(vec![local.to_string()])),
        Some(dc) if dc == local => {
            let mut lanes: Vec<String> = load_counts(base, ov, queue)?
                .due_floors
                .into_keys()
                .collect();
            if !lanes.iter().any(|l| l == local) {
                lanes.push(local.to_string());
            }
            Ok(Ok(lanes))
        }
        Some(dc) => Ok(Err(dc)),
    }
}

/// An admin hands `queue` to DC `dc` (`None`: back to each event's lane);
/// sent to every DC.
#[allow(clippy::too_many_arguments)]
pub(crate) fn set_owner_local(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    queue: &str,
    dc: Option<&str>,
    reason: &str,
    wall_ms: i64,
    force: bool,
) -> CommandResponse {
    mailbox_types::event::validate_event_name("queue name", queue).map_err(|e| {
        StateError::Invalid {
            reason: e.to_string(),
        }
    })?;
    if let Some(dc) = dc {
        let dcs: Vec<String> = ov.load(base, keys::CLUSTER_DCS)?.unwrap_or_default();
        if !dcs.iter().any(|d| d == dc) {
            return Err(StateError::Invalid {
                reason: format!("{dc} is not a DC of this cluster ({})", dcs.join(", ")),
            });
        }
    }
    let prev = load_owner(base, ov, queue)?;
    if prev
        .as_ref()
        .is_some_and(|p| p.dc.as_deref() == dc && p.at_ms == wall_ms && p.reason == clip(reason))
    {
        // This very takeover, applied again (a retried proposal).
        return Ok(CommandResult::None);
    }
    if !force {
        check_handlers_silent(base, ov, ctx, queue, dc, wall_ms)?;
    }
    let mut hlc = max_hlc(base, ov)?;
    if let Some(p) = &prev {
        hlc = hlc.max(p.stamp.hlc);
    }
    let hlc = hlc.tick(wall_ms);
    ov.put(keys::MAX_HLC.to_vec(), encode(&hlc));
    let owner = QueueOwner {
        dc: dc.map(str::to_string),
        reason: clip(reason),
        at_ms: wall_ms,
        stamp: Stamp::new(hlc, ctx.local_dc.clone()),
    };
    ov.put(keys::queue_owner(queue), encode(&owner));
    start_announce(ov, queue, wall_ms);
    feed_append(
        base,
        ov,
        &FeedRecord::QueueOwner {
            queue: queue.to_string(),
            owner: owner.clone(),
        },
    )?;
    Ok(CommandResult::None)
}

/// How long a DC that handles a queue must have been silent (no pull from
/// its feed applied here, keep-alives included) before another DC takes
/// the queue over without `--force`. A DC back within this time has no
/// outage gap to hold it (see [`LATE_EXPIRY_MS`]) and could deliver what
/// the new handler delivers until it reads the takeover.
///
/// Twice [`LATE_EXPIRY_MS`]: a DC's last contact here can predate its
/// death by a few seconds (idle links commit a keep-alive every 5 s), and
/// its last event command can come just before it; a DC silent here for
/// 60 s was down long enough for its own record to show a gap, so it holds
/// when it comes back until it has read the takeover.
pub const TAKEOVER_SILENCE_MS: i64 = 2 * LATE_EXPIRY_MS;

/// Refuses to hand `queue` away from a remote DC heard from within
/// [`TAKEOVER_SILENCE_MS`] of `now_ms`. Who loses events: the owner in
/// force, or, while each event's origin handles it, every DC but the new
/// one.
/// This DC itself is exempt: it reads the change as it makes it.
fn check_handlers_silent(
    base: &dyn KvRead,
    ov: &Overlay,
    ctx: &ApplyCtx,
    queue: &str,
    to: Option<&str>,
    now_ms: i64,
) -> Result<(), StateError> {
    // As `taken_by` reads the register: an owner that left the cluster
    // counts as none, and every lane's DC handles its own again.
    let losing: Vec<String> = match taken_by(base, ov, queue)? {
        Some(d) => vec![d],
        None => ov.load(base, keys::CLUSTER_DCS)?.unwrap_or_default(),
    };
    let mut heard = Vec::new();
    let mut latest = i64::MIN;
    for d in losing
        .iter()
        .filter(|d| d.as_str() != ctx.local_dc && Some(d.as_str()) != to)
    {
        let h: crate::replication::PeerHeard = ov.load(base, &keys::heard(d))?.unwrap_or_default();
        if h.contact_ms > 0 && now_ms.saturating_sub(h.contact_ms) < TAKEOVER_SILENCE_MS {
            heard.push(d.as_str());
            latest = latest.max(h.contact_ms);
        }
    }
    if heard.is_empty() {
        return Ok(());
    }
    Err(StateError::HandlerHeard {
        queue: queue.to_string(),
        dcs: heard.join(", "),
        ago_s: now_ms.saturating_sub(latest).max(0) / 1000,
        silence_s: TAKEOVER_SILENCE_MS / 1000,
    })
}

/// An ownership change from another DC's feed: kept if newer.
pub(crate) fn set_owner_remote(
    base: &dyn KvRead,
    ov: &mut Overlay,
    queue: &str,
    owner: &QueueOwner,
) -> Result<(), StateError> {
    if owner.stamp.hlc > max_hlc(base, ov)? {
        ov.put(keys::MAX_HLC.to_vec(), encode(&owner.stamp.hlc));
    }
    if load_owner(base, ov, queue)?.is_some_and(|p| p.stamp >= owner.stamp) {
        return Ok(());
    }
    ov.put(keys::queue_owner(queue), encode(owner));
    start_announce(ov, queue, owner.at_ms);
    Ok(())
}

/// How far back a re-announcement reaches for finished events: what the
/// old owner finished shortly before it died, and told only some DCs.
pub const ANNOUNCE_HORIZON_MS: i64 = 3_600_000;

/// Where a re-announcement stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Announce {
    /// 0..=2: the unfinished and dead-lettered events (status index);
    /// 3: events finished since `from_ms` (retention index).
    phase: u8,
    /// The last index key read.
    after: Vec<u8>,
    /// The start of the horizon.
    from_ms: i64,
}

/// Every DC that learns of a change of a queue's owner sends its copies
/// of the queue's events again (pages, by the leader's housekeeping), so
/// the new owner and every other DC learn what the old owner told only
/// some of them before it died (the newest version wins everywhere, and a
/// copy already held changes nothing): every unfinished and dead-lettered
/// event, and those finished within [`ANNOUNCE_HORIZON_MS`] before.
fn start_announce(ov: &mut Overlay, queue: &str, at_ms: i64) {
    ov.put(
        keys::announce(queue),
        encode(&Announce {
            phase: 0,
            after: Vec::new(),
            from_ms: at_ms.saturating_sub(ANNOUNCE_HORIZON_MS),
        }),
    );
}

/// Events one re-announcement page sends at most.
pub const MAX_ANNOUNCE_BATCH: usize = 1000;

/// One page of the re-announcement of `queue`'s events (see
/// [`start_announce`]): each event as this DC has it, unchanged (same
/// version, so a DC that has it already keeps its copy). Returns how many
/// were sent and whether more are due.
pub(crate) fn announce_queue(base: &dyn KvRead, ov: &mut Overlay, queue: &str) -> CommandResponse {
    let ck = keys::announce(queue);
    let Some(mut at) = ov.load::<Announce>(base, &ck)? else {
        return Ok(CommandResult::Expired {
            count: 0,
            more: false,
        });
    };
    const UNFINISHED: [EventStatus; 3] = [
        EventStatus::Pending,
        EventStatus::Processing,
        EventStatus::Failed,
    ];
    let mut count = 0usize;
    // Rows read at most per page (the retention index holds every queue's).
    let mut budget = 4 * MAX_ANNOUNCE_BATCH;
    while at.phase <= 3 {
        let (prefix, start) = if (at.phase as usize) < UNFINISHED.len() {
            let p = keys::status_queue_prefix(status_code(UNFINISHED[at.phase as usize]), queue);
            (p, None)
        } else {
            let from = keys::finished(at.from_ms, &EventId::from_bytes([0; 16]));
            (keys::FINISHED_PREFIX.to_vec(), Some(from))
        };
        let after = if at.after.is_empty() {
            start
        } else {
            Some(at.after.clone())
        };
        let want = budget.min(MAX_ANNOUNCE_BATCH - count);
        let rows = ov.scan(base, &prefix, after.as_deref(), want)?;
        let full = rows.len() == want;
        budget -= rows.len();
        for (k, _) in &rows {
            at.after = k.clone();
            if let Some(ev) = load_event(base, ov, &tail_event_id(k)?)? {
                if ev.queue == queue {
                    feed_append(base, ov, &replica_copy(&ev))?;
                    count += 1;
                }
            }
        }
        if full {
            ov.put(ck, encode(&at));
            return Ok(CommandResult::Expired {
                count: count as u64,
                more: true,
            });
        }
        at.phase += 1;
        at.after = Vec::new();
    }
    ov.delete(ck);
    Ok(CommandResult::Expired {
        count: count as u64,
        more: false,
    })
}

/// Queues whose events are due to be re-announced.
pub fn announcements_due(kv: &dyn KvRead) -> Result<Vec<String>, StateError> {
    Ok(kv
        .scan(keys::ANNOUNCE_PREFIX, None, usize::MAX)?
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k[1..]).into_owned())
        .collect())
}

/// Every queue whose ownership was ever set, by name.
pub fn queue_owners(kv: &dyn KvRead) -> Result<Vec<(String, QueueOwner)>, StateError> {
    kv.scan(keys::QUEUE_OWNER_PREFIX, None, usize::MAX)?
        .into_iter()
        .map(|(k, v)| {
            Ok((
                String::from_utf8_lossy(&k[1..]).into_owned(),
                decode(&k, &v)?,
            ))
        })
        .collect()
}

/// The order of two versions of one event:
/// 1. a later replay generation wins;
/// 2. within one, a completion, then a discard, wins over anything else
///    (an old handler that has not yet learned of a takeover, or a clock
///    ahead, cannot undo either: the consumer did the work);
/// 3. then the version with more deliveries: deliveries only grow, so a
///    handler that comes back and settles a lease it granted before a
///    takeover cannot dead-letter (or make due again) what the new handler
///    has delivered since, and a stale copy cannot undo a dead letter made
///    after more deliveries;
/// 4. then a dead letter wins over an unfinished state;
/// 5. then the newer stamp.
///
/// One handler's own changes only ever rise in this order.
fn version(ev: &Event) -> (u32, u8, u32, u8, &Stamp) {
    let (done, failed) = match ev.status {
        EventStatus::Complete => (2, 0),
        EventStatus::Discarded => (1, 0),
        EventStatus::Failed => (0, 1),
        _ => (0, 0),
    };
    (ev.replays, done, ev.deliveries, failed, &ev.stamp)
}

/// A change to an event from another DC's feed (or resync): kept if it
/// is a newer version than this DC's copy (see [`version`]), with the
/// indexes in step. From a feed, where this DC's copy of a mailbox chain
/// then has nothing running, its first waiting event is released, as its
/// handler does too (and if this DC handles it, that is its own change).
/// (Not from a resync, whose records come in id order, not chain order:
/// the chains are as the sender had them.)
pub(crate) fn apply_remote_event(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    ev: &Event,
    from_feed: bool,
) -> Result<(), StateError> {
    if ev.stamp.hlc > max_hlc(base, ov)? {
        ov.put(keys::MAX_HLC.to_vec(), encode(&ev.stamp.hlc));
    }
    let prev = load_event(base, ov, &ev.id)?;
    if prev.as_ref().is_some_and(|p| version(p) >= version(ev)) {
        return Ok(());
    }
    let guard = keys::message_event(&ev.message.id, &ev.rule);
    if prev.is_none() && ov.get(base, &guard)?.is_some() {
        // Raised here once and purged after the retention: an old copy
        // must not bring it back.
        return Ok(());
    }
    let mut new = ev.clone();
    if let Some(p) = &prev {
        // Keep the longer history this DC has (copies carry the newest
        // attempts only).
        if p.attempts.len() > new.attempts.len() {
            let first = new.attempts.first().map_or(u32::MAX, |a| a.number);
            let mut older: Vec<_> = p
                .attempts
                .iter()
                .filter(|a| a.number < first)
                .cloned()
                .collect();
            older.append(&mut new.attempts);
            if older.len() > MAX_ATTEMPT_HISTORY {
                older.drain(..older.len() - MAX_ATTEMPT_HISTORY);
            }
            new.attempts = older;
        }
    }
    put_event(base, ov, Writer::Replica, prev.as_ref(), &mut new)?;
    if prev.is_none() {
        ov.put(guard, ev.id.as_bytes().to_vec());
    }
    if ev.lane() == ctx.local_dc {
        // This DC's own events, coming back (a rebuild): its raise
        // sequence goes on after them, so mailbox chains keep their order.
        let mut counts = load_counts(base, ov, &ev.queue)?;
        if counts.raised < ev.seq {
            counts.raised = ev.seq;
            ov.put(keys::queue(&ev.queue), encode(&counts));
        }
    }
    if from_feed && ev.ordering == EventOrdering::PerMailbox {
        let w = if handler_of(base, ov, ev)? == ctx.local_dc {
            Writer::Local(ctx)
        } else {
            Writer::Replica
        };
        release_head(base, ov, w, ev, ev.updated_ms)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- raising

/// At the origin, in the write that records `meta` as held by every DC:
/// one event per enabled matching rule.
pub(crate) fn raise_events(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    meta: &MessageMeta,
    complete_ms: i64,
    now_ms: i64,
    without: &[String],
) -> Result<(), StateError> {
    // Only rules in force live under this prefix (deletes are apart).
    let rows = ov.scan(base, keys::RULE_PREFIX, None, usize::MAX)?;
    if rows.is_empty() {
        return Ok(());
    }
    for (k, v) in rows {
        let rec: RuleRecord = decode(&k, &v)?;
        if let Some(rule) = rec.rule.filter(|r| r.enabled && r.matches(meta)) {
            raise_one(base, ov, ctx, &rule, meta, complete_ms, now_ms, without)?;
        }
    }
    Ok(())
}

/// Raises `rule`'s event for `meta` unless it has one; whether it did.
#[allow(clippy::too_many_arguments)]
fn raise_one(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    rule: &EventRule,
    meta: &MessageMeta,
    complete_ms: i64,
    now_ms: i64,
    without: &[String],
) -> Result<bool, StateError> {
    let mk = keys::message_event(&meta.id, &rule.name);
    if ov.get(base, &mk)?.is_some() {
        return Ok(false);
    }
    let id = EventId::for_message(&meta.id, &rule.name);
    if ov.get(base, &keys::event(&id))?.is_some() {
        ov.put(mk, id.as_bytes().to_vec());
        return Ok(false);
    }
    let mut counts = load_counts(base, ov, &rule.queue)?;
    counts.raised += 1;
    let seq = counts.raised;
    ov.put(keys::queue(&rule.queue), encode(&counts));
    let mut blocked = false;
    if rule.ordering == EventOrdering::PerMailbox {
        let chain = keys::order_prefix(&rule.queue, &ctx.local_dc, &meta.mailbox);
        blocked = !ov.scan(base, &chain, None, 1)?.is_empty();
    }
    let mut ev = Event {
        id,
        rule: rule.name.clone(),
        queue: rule.queue.clone(),
        message: EventMessage::from(meta),
        complete_ms,
        raised_ms: now_ms,
        without: without.to_vec(),
        status: EventStatus::Pending,
        blocked,
        deliveries: 0,
        failures: 0,
        failures_at_replay: 0,
        due_ms: now_ms,
        lease: None,
        attempts: Vec::new(),
        retry: rule.retry,
        ordering: rule.ordering,
        seq,
        note: String::new(),
        updated_ms: now_ms,
        stamp: Stamp::default(),
        replays: 0,
    };
    put_event(base, ov, Writer::Local(ctx), None, &mut ev)?;
    ov.put(mk, id.as_bytes().to_vec());
    Ok(true)
}

/// Messages one `EvaluateRule` looks at at most.
pub const MAX_EVALUATE_BATCH: u32 = 10_000;

/// Raises `name`'s event for every message completed here (this DC being
/// its origin) after `after` that matches and has none; a page of at most
/// `limit` messages. Returns how many were raised and where to go on.
pub(crate) fn evaluate_rule(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    name: &str,
    after: Option<&MessageId>,
    limit: u32,
    now_ms: i64,
) -> CommandResponse {
    let Some(rule) = load_rule(base, ov, name)?.and_then(|r| r.rule) else {
        return Err(StateError::RuleNotFound {
            name: name.to_string(),
        });
    };
    if !rule.enabled {
        return Err(StateError::Invalid {
            reason: format!("rule {name} is disabled: enable it first"),
        });
    }
    let limit = limit.clamp(1, MAX_EVALUATE_BATCH) as usize;
    let after_key = after.map(keys::complete);
    let rows = ov.scan(base, b"q", after_key.as_deref(), limit)?;
    let full = rows.len() == limit;
    let scanned = rows.len() as u64;
    let (mut added, mut last) = (0u64, None);
    for (k, v) in rows {
        let id = keys::decode_id(&k, &k[1..])?;
        last = Some(id);
        let complete_ms: i64 = decode(&k, &v)?;
        let Some(meta) = message(base, ov, &id)? else {
            continue;
        };
        if meta.origin_dc == ctx.local_dc
            && rule.matches(&meta)
            && raise_one(base, ov, ctx, &rule, &meta, complete_ms, now_ms, &[])?
        {
            added += 1;
        }
    }
    Ok(CommandResult::Evaluated {
        scanned,
        added,
        next: if full { last } else { None },
    })
}

// ---------------------------------------------------------------- delivery

/// Due events of `queue` looked at per lease command at most, beyond
/// twice the ones asked for (leases that ran out are settled on the way).
const LEASE_SCAN_SLACK: usize = 16;

/// A consumer's request for events (see `Command::LeaseEvents`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseAsk<'a> {
    pub queue: &'a str,
    pub consumer: &'a str,
    pub max: u32,
    pub lease_ms: Option<u64>,
    pub now_ms: i64,
    pub seed: u64,
    pub request: u64,
}

/// A consumer's last lease request and what it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct LastLease {
    request: u64,
    given: Vec<(EventId, u32)>,
}

/// Leases up to `max` due events of `queue` to `consumer`, from the lanes
/// this DC handles, and first settles leases of those that ran out (each
/// counts as a failure). The same request applied again (a proposal
/// retried after its reply was lost) answers with what the first one
/// leased, still leased, instead of leasing more to nobody.
pub(crate) fn lease_events(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    ask: LeaseAsk<'_>,
) -> CommandResponse {
    let lk = keys::last_lease(ask.consumer, ask.queue);
    if let Some(last) = ov.load::<LastLease>(base, &lk)? {
        if last.request == ask.request {
            let mut again = Vec::new();
            for (id, n) in &last.given {
                if let Some(ev) = load_event(base, ov, id)? {
                    if ev.status == EventStatus::Processing && ev.deliveries == *n {
                        again.push(ev);
                    }
                }
            }
            return Ok(CommandResult::Leased { events: again });
        }
    }
    let lanes = match lanes_here(base, ov, &ctx.local_dc, ask.queue)? {
        Ok(lanes) => lanes,
        Err(dc) => {
            return Err(StateError::HandledElsewhere {
                queue: ask.queue.to_string(),
                dc,
            })
        }
    };
    let max = ask.max.clamp(1, MAX_LEASE_BATCH) as usize;
    let mut out = Vec::new();
    // Lanes in turn from a different one each request, so a busy lane
    // does not starve the others.
    let mut lanes = lanes;
    let start = (ask.request % lanes.len().max(1) as u64) as usize;
    lanes.rotate_left(start);
    for lane in &lanes {
        if out.len() >= max {
            break;
        }
        lease_lane(base, ov, ctx, &ask, lane, max, &mut out)?;
    }
    ov.put(
        lk,
        encode(&LastLease {
            request: ask.request,
            given: out.iter().map(|e| (e.id, e.deliveries)).collect(),
        }),
    );
    Ok(CommandResult::Leased { events: out })
}

/// [`lease_events`] in one lane, until `out` holds `max` events.
fn lease_lane(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    ask: &LeaseAsk<'_>,
    lane: &str,
    max: usize,
    out: &mut Vec<Event>,
) -> Result<(), StateError> {
    let LeaseAsk {
        queue,
        consumer,
        lease_ms,
        now_ms,
        seed,
        ..
    } = *ask;
    let lease_ms = lease_ms.map(|l| l.clamp(1_000, mailbox_types::event::MAX_LEASE_MS));
    let prefix = keys::due_prefix(queue, lane);
    let floor = load_counts(base, ov, queue)?.floor(lane);
    let from = due_floor_key(queue, lane, floor);
    let want = max - out.len();
    let scan_limit = want.saturating_mul(2) + LEASE_SCAN_SLACK;
    // Only what is due by now: entries past it (leases under way, later
    // retries) are not needed, and the iterator must not step over the
    // deletes of every answered lease among them.
    let before = due_floor_key(queue, lane, at_ms(now_ms.saturating_add(1)));
    let rows = ov.scan_below(base, &prefix, Some(&from), Some(&before), scan_limit)?;
    // The floor is recomputed below from what is left: while this runs it
    // stands at "nothing written yet", and every due entry written
    // meanwhile (leases, retries, a mailbox's next event) lowers it through
    // `put_event`, so afterwards it holds the earliest of those.
    let mut c = load_counts(base, ov, queue)?;
    c.due_floors
        .insert(lane.to_string(), (i64::MAX, [0xff; 16]));
    ov.put(keys::queue(queue), encode(&c));
    let mut processed = 0;
    for (k, _) in &rows {
        if out.len() >= max {
            break;
        }
        let (ms, id) = keys::decode_due(k, prefix.len())?;
        if ms > now_ms {
            break;
        }
        processed += 1;
        let Some(mut ev) = load_event(base, ov, &id)? else {
            return Err(StateError::Corrupt {
                key: keys::hex(k),
                reason: "due index names a missing event".into(),
            });
        };
        let prev = ev.clone();
        match ev.status {
            EventStatus::Processing => {
                expire_lease(base, ov, ctx, &mut ev, seed)?;
                put_event(base, ov, Writer::Local(ctx), Some(&prev), &mut ev)?;
            }
            EventStatus::Pending if !chain_clear(base, ov, &ev)? => {
                // Two of one mailbox never run at once. Copies from two
                // handlers that crossed (an old one that had not heard of
                // a takeover released the next event) can leave two of a
                // chain deliverable: only its head is, the other waits
                // again (released when the head finishes).
                ev.blocked = true;
                put_event(base, ov, Writer::Local(ctx), Some(&prev), &mut ev)?;
                release_if_idle(base, ov, ctx, &ev, now_ms)?;
            }
            EventStatus::Pending => {
                ev.deliveries += 1;
                ev.attempts.push(Attempt {
                    number: ev.deliveries,
                    leased_ms: now_ms,
                    consumer: consumer.to_string(),
                    outcome: None,
                    ended_ms: 0,
                    error: String::new(),
                });
                if ev.attempts.len() > MAX_ATTEMPT_HISTORY {
                    ev.attempts.remove(0);
                }
                let until = now_ms.saturating_add(lease_ms.unwrap_or(ev.retry.lease_ms) as i64);
                ev.lease = Some(Lease {
                    consumer: consumer.to_string(),
                    until_ms: until,
                });
                ev.status = EventStatus::Processing;
                ev.due_ms = until;
                ev.updated_ms = now_ms;
                put_event(base, ov, Writer::Local(ctx), Some(&prev), &mut ev)?;
                out.push(ev);
            }
            _ => {
                return Err(StateError::Corrupt {
                    key: keys::hex(k),
                    reason: format!("due index names a {} event", ev.status.as_str()),
                })
            }
        }
    }
    // Entries left: the first row not taken (rows are in order), or, when
    // every row read was taken, whatever lies past the last one (only if
    // the scan stopped at its limit), or nothing at all.
    let pos = |k: &[u8]| -> Result<DuePos, StateError> {
        let (ms, id) = keys::decode_due(k, prefix.len())?;
        Ok((ms, *id.as_bytes()))
    };
    let left = if processed < rows.len() {
        before_pos(pos(&rows[processed].0)?)
    } else if rows.len() == scan_limit {
        pos(&rows[rows.len() - 1].0)?
    } else {
        // Everything due by now was read and taken.
        at_ms(now_ms.saturating_add(1)).max(floor)
    };
    let mut counts = load_counts(base, ov, queue)?;
    counts.lower_floor(lane, left);
    ov.put(keys::queue(queue), encode(&counts));
    Ok(())
}

/// Settles the leases that ran out by `now_ms` in every lane this DC
/// handles (at most `limit`), so an abandoned event is retried or
/// dead-lettered even when no consumer asks for its queue. Returns how
/// many, and whether more are due.
pub(crate) fn expire_leases(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    now_ms: i64,
    seed: u64,
    limit: usize,
) -> CommandResponse {
    let mut count = 0u64;
    let mut more = false;
    let queues = ov.scan(base, keys::QUEUE_PREFIX, None, usize::MAX)?;
    'queues: for (qk, _) in queues {
        let queue = String::from_utf8_lossy(&qk[1..]).into_owned();
        let Ok(lanes) = lanes_here(base, ov, &ctx.local_dc, &queue)? else {
            continue;
        };
        for lane in lanes {
            let prefix = keys::lease_end_prefix(&queue, &lane);
            let before = keys::lease_end(
                &queue,
                &lane,
                now_ms.saturating_add(1),
                &EventId::from_bytes([0; 16]),
            );
            let want = (limit as u64).saturating_sub(count) as usize;
            let rows = ov.scan_below(base, &prefix, None, Some(&before), want + 1)?;
            for (k, _) in rows {
                if count == limit as u64 {
                    more = true;
                    break 'queues;
                }
                let id = tail_event_id(&k)?;
                let Some(mut ev) = load_event(base, ov, &id)? else {
                    return Err(StateError::Corrupt {
                        key: keys::hex(&k),
                        reason: "lease-end index names a missing event".into(),
                    });
                };
                let prev = ev.clone();
                expire_lease(base, ov, ctx, &mut ev, seed)?;
                put_event(base, ov, Writer::Local(ctx), Some(&prev), &mut ev)?;
                count += 1;
            }
        }
    }
    Ok(CommandResult::Expired { count, more })
}

/// A stretch this long without any event command applied in the DC is a
/// gap: it was down, or without a quorum (its leader's housekeeping
/// proposes an expiry at least every 10 s, so a DC that can act, busy or
/// idle, never goes this long). A lease that ran out inside a gap was not
/// settled because the DC could not act, and its consumer may have
/// answered into it: that missing answer is not counted as a failure.
pub const LATE_EXPIRY_MS: i64 = 30_000;

/// When the DC last applied an event command, and its last gap.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Activity {
    last_ms: i64,
    gap_from: i64,
    gap_to: i64,
}

/// Records that an event command (a lease, an answer, an expiry) is
/// applied at `now_ms`, and the gap before it if it came more than
/// [`LATE_EXPIRY_MS`] after the one before.
pub(crate) fn note_activity(
    base: &dyn KvRead,
    ov: &mut Overlay,
    now_ms: i64,
) -> Result<(), StateError> {
    let mut a: Activity = ov.load(base, keys::EVENT_ACTIVITY)?.unwrap_or_default();
    if a.last_ms > 0 && now_ms.saturating_sub(a.last_ms) > LATE_EXPIRY_MS {
        a.gap_from = a.last_ms;
        a.gap_to = now_ms;
    }
    a.last_ms = a.last_ms.max(now_ms);
    ov.put(keys::EVENT_ACTIVITY.to_vec(), encode(&a));
    Ok(())
}

/// When this DC last applied an event command (0: never).
#[cfg(test)]
pub(crate) fn last_activity(kv: &dyn KvRead) -> i64 {
    kv.get(keys::EVENT_ACTIVITY)
        .ok()
        .flatten()
        .and_then(|v| decode::<Activity>(keys::EVENT_ACTIVITY, &v).ok())
        .map_or(0, |a| a.last_ms)
}

/// Where DC `local` holds leases after an outage (see
/// [`check_caught_up`]): the DCs it waits for and until when; read-only,
/// so callers can wait without proposing a lease that would be refused.
pub fn catching_up(
    kv: &dyn KvRead,
    local: &str,
    now_ms: i64,
) -> Result<Option<(String, i64)>, StateError> {
    let ctx = ApplyCtx::new(local);
    Ok(
        match check_caught_up(kv, &Overlay::default(), &ctx, now_ms)? {
            Some(CommandResult::CatchingUp { dcs, until_ms }) => Some((dcs, until_ms)),
            _ => None,
        },
    )
}

/// Refuses leases for a while after a gap (see [`LATE_EXPIRY_MS`]) until
/// this DC has caught up with every other DC's feed, as that stood when it
/// served a pull received since the gap (its head then, a keep-alive's
/// included): a queue may have been taken over while it was out of
/// action, and delivering before it reads that would repeat what the new
/// handler delivers.
/// Leases go ahead anyway `LATE_EXPIRY_MS` after the gap (another DC may
/// be down too, or have nothing new to send).
pub(crate) fn check_caught_up(
    base: &dyn KvRead,
    ov: &Overlay,
    ctx: &ApplyCtx,
    now_ms: i64,
) -> Result<Option<CommandResult>, StateError> {
    let a: Activity = ov.load(base, keys::EVENT_ACTIVITY)?.unwrap_or_default();
    let until_ms = a.gap_to.saturating_add(LATE_EXPIRY_MS);
    if a.gap_to == 0 || now_ms >= until_ms {
        return Ok(None);
    }
    let dcs: Vec<String> = ov.load(base, keys::CLUSTER_DCS)?.unwrap_or_default();
    let mut waiting = Vec::new();
    for dc in dcs.iter().filter(|d| **d != ctx.local_dc) {
        let heard: crate::replication::PeerHeard =
            ov.load(base, &keys::heard(dc))?.unwrap_or_default();
        // Caught up with the other DC's feed, as it stood when it served
        // a pull received since this DC was back: a takeover it made
        // while this DC was out, however deep in its backlog, is read.
        // (Pulls from before the outage are no news of what happened
        // during it.)
        if heard.caught_up_ms < a.gap_to {
            waiting.push(dc.as_str());
        }
    }
    if waiting.is_empty() {
        return Ok(None);
    }
    Ok(Some(CommandResult::CatchingUp {
        dcs: waiting.join(", "),
        until_ms,
    }))
}

/// A lease ran out without an answer: a failure, backed off from the
/// lease's end; unless the answer could not have been taken (it ran out
/// in a gap, see [`LATE_EXPIRY_MS`], or another DC granted it): then the
/// event is delivered again at once and no attempt is counted.
fn expire_lease(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    ev: &mut Event,
    seed: u64,
) -> Result<(), StateError> {
    let until = ev.lease.as_ref().map_or(ev.due_ms, |l| l.until_ms);
    // A lease another DC granted (it handled the queue until a takeover,
    // and is down): its consumer's answer can never arrive here, which is
    // no failure of the event's. Delivered again, no attempt counted.
    let elsewhere = ev.stamp.dc != ctx.local_dc && !ev.stamp.dc.is_empty();
    let gap: Activity = ov.load(base, keys::EVENT_ACTIVITY)?.unwrap_or_default();
    let in_gap = until > gap.gap_from && until <= gap.gap_to;
    let uncounted = elsewhere || in_gap;
    if let Some(a) = ev.attempts.last_mut().filter(|a| a.outcome.is_none()) {
        a.outcome = Some(AttemptOutcome::Expired);
        a.ended_ms = until;
        a.error = if elsewhere {
            format!(
                "leased in DC {}, which no longer handles the queue: delivered again here, no attempt counted",
                ev.stamp.dc
            )
        } else if uncounted {
            format!(
                "the lease ran out while this DC could not act (down, or without a quorum, for {} s): delivered again, no attempt counted",
                (gap.gap_to - gap.gap_from) / 1000
            )
        } else {
            format!(
                "no answer within the lease ({} ms)",
                until.saturating_sub(a.leased_ms)
            )
        };
    }
    ev.updated_ms = until;
    if uncounted {
        ev.lease = None;
        ev.status = EventStatus::Pending;
        ev.due_ms = until;
        return Ok(());
    }
    transient_failure(base, ov, ctx, ev, until, None, seed)
}

/// A failure that may pass: retried after a backoff, or dead-lettered
/// once the attempts are used up.
fn transient_failure(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    ev: &mut Event,
    from_ms: i64,
    delay_ms: Option<u64>,
    seed: u64,
) -> Result<(), StateError> {
    ev.failures += 1;
    ev.lease = None;
    let used = ev.failures - ev.failures_at_replay;
    if used >= ev.retry.max_attempts {
        return finish(base, ov, ctx, ev, EventStatus::Failed, from_ms);
    }
    let wait = match delay_ms {
        Some(d) => d.min(MAX_RETRY_DELAY_MS),
        None => ev.retry.backoff_ms(used, draw(seed, &ev.id, ev.failures)),
    };
    ev.status = EventStatus::Pending;
    ev.due_ms = from_ms.saturating_add(wait as i64);
    Ok(())
}

/// Ends `ev` as complete, failed or discarded. (With per-mailbox ordering,
/// `put_event` then takes it out of its mailbox chain and releases the
/// next one, after its own change in the feed.)
fn finish(
    _base: &dyn KvRead,
    _ov: &mut Overlay,
    _ctx: &ApplyCtx,
    ev: &mut Event,
    status: EventStatus,
    _now_ms: i64,
) -> Result<(), StateError> {
    ev.status = status;
    ev.lease = None;
    Ok(())
}

/// When nothing of `ev`'s mailbox chain runs, makes its first waiting
/// event deliverable.
fn release_head(
    base: &dyn KvRead,
    ov: &mut Overlay,
    w: Writer<'_>,
    ev: &Event,
    now_ms: i64,
) -> Result<(), StateError> {
    if runners(base, ov, ev)? > 0 {
        return Ok(());
    }
    // (From `finish`, `ev` left the chain already; from a feed, `ev` is
    // stored, and released here if it is the head.) Entries whose event
    // is gone or finished (left behind by an older copy) are cleared.
    let mut stale = Vec::new();
    let head = chain_head(base, ov, ev, Some(&mut stale))?;
    for k in stale {
        ov.delete(k);
    }
    if let Some(mut next) = head.filter(|h| h.blocked) {
        let prev = next.clone();
        next.blocked = false;
        next.due_ms = next.due_ms.max(now_ms);
        next.updated_ms = next.updated_ms.max(now_ms);
        put_event(base, ov, w, Some(&prev), &mut next)?;
    }
    Ok(())
}

/// A consumer's answer to delivery `attempt` of event `id`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ack_event(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    id: &EventId,
    attempt: u32,
    consumer: &str,
    ack: &EventAck,
    now_ms: i64,
    seed: u64,
) -> CommandResponse {
    let Some(mut ev) = load_event(base, ov, id)? else {
        return Err(StateError::EventNotFound { id: id.to_string() });
    };
    let current = ev.status == EventStatus::Processing && ev.deliveries == attempt;
    let wanted = match ack {
        EventAck::Complete => Some(AttemptOutcome::Complete),
        EventAck::Retry { .. } => Some(AttemptOutcome::Retry),
        EventAck::Fail { .. } => Some(AttemptOutcome::Fail),
        EventAck::Progress { .. } => None,
        EventAck::Defer { .. } => Some(AttemptOutcome::Deferred),
    };
    // The same answer again (a proposal retried after its reply was lost):
    // the same success, nothing changes. A `complete` for any delivery of
    // a complete event is that too.
    let same_again = ev
        .attempts
        .iter()
        .any(|a| a.number == attempt && a.outcome == wanted);
    let complete_again = matches!(ack, EventAck::Complete)
        && ev.status == EventStatus::Complete
        && (1..=ev.deliveries).contains(&attempt);
    if !current && wanted.is_some() && (same_again || complete_again) {
        return Ok(CommandResult::EventUpdated {
            event: Box::new(ev),
        });
    }
    check_handled_here(base, ov, ctx, &ev)?;
    // A late `complete` for a delivery whose lease ran out, while the event
    // is not finished: the work is done, so the event is complete (fewer
    // duplicate deliveries); a delivery in flight ends with it.
    if !current
        && matches!(ack, EventAck::Complete)
        && !ev.status.is_final()
        && attempt >= 1
        && attempt <= ev.deliveries
    {
        let prev = ev.clone();
        for a in ev.attempts.iter_mut() {
            if a.number == attempt {
                a.outcome = Some(AttemptOutcome::Complete);
                a.error = clip(&format!("{} (completed late, after the lease)", a.error));
            } else if a.outcome.is_none() {
                a.outcome = Some(AttemptOutcome::Complete);
                a.ended_ms = now_ms;
                a.error = format!("completed by delivery {attempt}'s late answer");
            }
        }
        ev.updated_ms = now_ms;
        finish(base, ov, ctx, &mut ev, EventStatus::Complete, now_ms)?;
        put_event(base, ov, Writer::Local(ctx), Some(&prev), &mut ev)?;
        return Ok(CommandResult::EventUpdated {
            event: Box::new(ev),
        });
    }
    // The delivery number is the lease's token: any other answer to an
    // earlier delivery (its lease ran out and the event went to someone
    // else, or was settled) changes nothing.
    if !current {
        return Err(StateError::LeaseLost {
            id: id.to_string(),
            attempt,
            reason: format!(
                "the event is {} now, at delivery {}",
                ev.status.as_str(),
                ev.deliveries
            ),
        });
    }
    let prev = ev.clone();
    ev.updated_ms = now_ms;
    let end = |ev: &mut Event, outcome: AttemptOutcome, error: &str| {
        if let Some(a) = ev.attempts.last_mut().filter(|a| a.outcome.is_none()) {
            a.outcome = Some(outcome);
            a.ended_ms = now_ms;
            a.error = clip(error);
            if a.consumer != consumer && !consumer.is_empty() {
                a.error = clip(&format!("{error} (answered by {consumer})"));
            }
        }
    };
    match ack {
        EventAck::Complete => {
            end(&mut ev, AttemptOutcome::Complete, "");
            finish(base, ov, ctx, &mut ev, EventStatus::Complete, now_ms)?;
        }
        EventAck::Retry { delay_ms, reason } => {
            end(&mut ev, AttemptOutcome::Retry, reason);
            transient_failure(base, ov, ctx, &mut ev, now_ms, *delay_ms, seed)?;
        }
        EventAck::Fail { reason } => {
            end(&mut ev, AttemptOutcome::Fail, reason);
            finish(base, ov, ctx, &mut ev, EventStatus::Failed, now_ms)?;
        }
        EventAck::Defer { delay_ms, reason } => {
            end(&mut ev, AttemptOutcome::Deferred, reason);
            ev.lease = None;
            ev.status = EventStatus::Pending;
            ev.due_ms = now_ms.saturating_add((*delay_ms).min(MAX_RETRY_DELAY_MS) as i64);
        }
        EventAck::Progress { lease_ms } => {
            let ms = lease_ms
                .unwrap_or(ev.retry.lease_ms)
                .min(mailbox_types::event::MAX_LEASE_MS);
            let until = now_ms.saturating_add(ms as i64);
            if let Some(l) = ev.lease.as_mut() {
                l.until_ms = until;
            }
            ev.due_ms = until;
        }
    }
    put_event(base, ov, Writer::Local(ctx), Some(&prev), &mut ev)?;
    Ok(CommandResult::EventUpdated {
        event: Box::new(ev),
    })
}

/// Admin replay: dead-lettered or discarded events (and, with `force`,
/// complete ones) are delivered again, same id, delivery numbers going on
/// and a fresh attempt budget.
pub(crate) fn replay_events(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    ids: &[EventId],
    force: bool,
    now_ms: i64,
) -> CommandResponse {
    let (mut changed, mut refused) = (Vec::new(), Vec::new());
    for id in ids {
        let Some(mut ev) = load_event(base, ov, id)? else {
            refused.push((*id, "no such event".to_string()));
            continue;
        };
        if ev.status == EventStatus::Pending
            && ev.updated_ms == now_ms
            && ev.failures_at_replay == ev.failures
        {
            // This very replay, applied again (a retried proposal).
            changed.push(*id);
            continue;
        }
        if let Err(e) = check_handled_here(base, ov, ctx, &ev) {
            refused.push((*id, e.to_string()));
            continue;
        }
        match ev.status {
            EventStatus::Failed | EventStatus::Discarded => {}
            EventStatus::Complete if force => {
                ev.note = format!("replayed after complete (forced) at {now_ms}");
            }
            EventStatus::Complete => {
                refused.push((
                    *id,
                    "is complete: replaying delivers it again; use --force if that is meant".into(),
                ));
                continue;
            }
            s => {
                refused.push((*id, format!("is {}, not dead-lettered", s.as_str())));
                continue;
            }
        }
        let prev = ev.clone();
        ev.status = EventStatus::Pending;
        ev.replays += 1;
        ev.failures_at_replay = ev.failures;
        ev.lease = None;
        ev.due_ms = now_ms;
        ev.updated_ms = now_ms;
        ev.blocked = false;
        if ev.ordering == EventOrdering::PerMailbox {
            // Behind whatever of its mailbox is under way (even newer
            // events): two of one mailbox never run at once. When that
            // finishes, the chain's first, which may be this one, goes.
            let chain = keys::order_prefix(&ev.queue, ev.lane(), &ev.message.mailbox);
            ev.blocked = !ov.scan(base, &chain, None, 1)?.is_empty();
        }
        put_event(base, ov, Writer::Local(ctx), Some(&prev), &mut ev)?;
        changed.push(*id);
    }
    Ok(CommandResult::EventsChanged { changed, refused })
}

/// Admin discard of dead-lettered events, with the reason kept.
pub(crate) fn discard_events(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ctx: &ApplyCtx,
    ids: &[EventId],
    reason: &str,
    now_ms: i64,
) -> CommandResponse {
    let (mut changed, mut refused) = (Vec::new(), Vec::new());
    for id in ids {
        let Some(mut ev) = load_event(base, ov, id)? else {
            refused.push((*id, "no such event".to_string()));
            continue;
        };
        if ev.status == EventStatus::Discarded && ev.updated_ms == now_ms && ev.note == clip(reason)
        {
            // This very discard, applied again (a retried proposal).
            changed.push(*id);
            continue;
        }
        if let Err(e) = check_handled_here(base, ov, ctx, &ev) {
            refused.push((*id, e.to_string()));
            continue;
        }
        if ev.status != EventStatus::Failed {
            refused.push((*id, format!("is {}, not dead-lettered", ev.status.as_str())));
            continue;
        }
        let prev = ev.clone();
        ev.status = EventStatus::Discarded;
        ev.note = clip(reason);
        ev.updated_ms = now_ms;
        put_event(base, ov, Writer::Local(ctx), Some(&prev), &mut ev)?;
        changed.push(*id);
    }
    Ok(CommandResult::EventsChanged { changed, refused })
}

// -------------------------------------------------------------- retention

/// Events one purge command removes at most.
pub const MAX_PURGE_BATCH: usize = 1000;

/// Removes up to `limit` events finished (complete or discarded) before
/// `before_ms`, oldest first; returns how many and whether more are due.
/// Dead-lettered events are not touched. The per-message guard (`v`)
/// stays while the message exists, so re-evaluating a rule still raises
/// nothing for it; the mailbox order chain no longer holds a finished
/// event. Every DC purges its own copies, by its leader's clock.
pub(crate) fn purge_events(
    base: &dyn KvRead,
    ov: &mut Overlay,
    before_ms: i64,
    limit: usize,
) -> CommandResponse {
    let below = keys::finished(before_ms, &EventId::from_bytes([0; 16]));
    let limit = limit.clamp(1, MAX_PURGE_BATCH);
    let rows = ov.scan_below(base, keys::FINISHED_PREFIX, None, Some(&below), limit + 1)?;
    let more = rows.len() > limit;
    let mut count = 0u64;
    for (k, _) in rows.into_iter().take(limit) {
        let id = tail_event_id(&k)?;
        ov.delete(k);
        let Some(ev) = load_event(base, ov, &id)? else {
            continue;
        };
        if finished_key(&ev).is_none() {
            // Replayed since: its entry was stale (put_event removes it).
            continue;
        }
        let mut counts = load_counts(base, ov, &ev.queue)?;
        if let Some(c) = counts.slot(ev.status) {
            *c = c.saturating_sub(1);
        }
        counts.purged += 1;
        ov.put(keys::queue(&ev.queue), encode(&counts));
        ov.delete(keys::status(status_code(ev.status), &ev.queue, &ev.id));
        ov.delete(keys::event(&ev.id));
        if message(base, ov, &ev.message.id)?.is_none() {
            ov.delete(keys::message_event(&ev.message.id, &ev.rule));
        }
        count += 1;
    }
    Ok(CommandResult::Expired { count, more })
}

/// The rules with dead-letter notices in this DC's outbox, or sealed
/// notifications waiting (one seek per rule, so their count does not
/// matter).
pub fn notice_rules(kv: &dyn KvRead) -> Result<Vec<String>, StateError> {
    let mut rules = rules_under(kv, keys::NOTICE_PREFIX)?;
    rules.extend(rules_under(kv, keys::SEALED_PREFIX)?);
    rules.sort();
    rules.dedup();
    Ok(rules)
}

/// The distinct rule names of keys `tag rule 0 ...`.
fn rules_under(kv: &dyn KvRead, tag: &[u8]) -> Result<Vec<String>, StateError> {
    let mut rules = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    while let Some((k, _)) = kv.scan(tag, after.as_deref(), 1)?.into_iter().next() {
        let end = k[1..]
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| StateError::Corrupt {
                key: keys::hex(&k),
                reason: "bad notice key".into(),
            })?;
        rules.push(String::from_utf8_lossy(&k[1..1 + end]).into_owned());
        // Past every key of this rule: they all go on with a 0 byte.
        let mut next = k[..1 + end].to_vec();
        next.push(1);
        after = Some(next);
    }
    Ok(rules)
}

/// A dead-letter notification sealed for delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedNotification {
    /// The JSON body, exactly as sent.
    pub body: Vec<u8>,
    /// Dead letters it reports.
    pub count: u64,
}

/// Sealed notifications of `rule` waiting to be delivered, by id.
pub fn sealed_notifications(
    kv: &dyn KvRead,
    rule: &str,
    limit: usize,
) -> Result<Vec<(String, SealedNotification)>, StateError> {
    crate::named_records(kv, &keys::sealed_prefix(rule), limit)
}

/// Seals a notification (see `Command::SealNotices`): `count` 1 if it was
/// sealed, 0 if some notice had left the outbox already.
pub(crate) fn seal_notices(
    base: &dyn KvRead,
    ov: &mut Overlay,
    rule: &str,
    id: &str,
    body: &[u8],
    notices: &[(i64, EventId)],
) -> CommandResponse {
    for (ms, ev) in notices {
        if ov.get(base, &keys::notice(rule, *ms, ev))?.is_none() {
            return Ok(CommandResult::Expired {
                count: 0,
                more: false,
            });
        }
    }
    for (ms, ev) in notices {
        ov.delete(keys::notice(rule, *ms, ev));
    }
    ov.put(
        keys::sealed(rule, id),
        encode(&SealedNotification {
            body: body.to_vec(),
            count: notices.len() as u64,
        }),
    );
    Ok(CommandResult::Expired {
        count: 1,
        more: false,
    })
}

/// Dead-letters of `rule` this DC has yet to notify, oldest first (at
/// most `limit`).
pub fn notices(
    kv: &dyn KvRead,
    rule: &str,
    limit: usize,
) -> Result<Vec<(i64, EventId)>, StateError> {
    let prefix = keys::notice_prefix(rule);
    kv.scan(&prefix, None, limit)?
        .into_iter()
        .map(|(k, _)| {
            let ms = k
                .get(prefix.len()..prefix.len() + 8)
                .and_then(|b| b.try_into().ok())
                .map(|b: [u8; 8]| u64::from_be_bytes(b) as i64)
                .ok_or_else(|| StateError::Corrupt {
                    key: keys::hex(&k),
                    reason: "bad notice key".into(),
                })?;
            Ok((ms, tail_event_id(&k)?))
        })
        .collect()
}

/// When the oldest finished event that retention will purge finished.
pub fn oldest_finished(kv: &dyn KvRead) -> Result<Option<i64>, StateError> {
    Ok(kv
        .scan(keys::FINISHED_PREFIX, None, 1)?
        .into_iter()
        .next()
        .and_then(|(k, _)| k.get(1..9).and_then(|b| b.try_into().ok()))
        .map(|b: [u8; 8]| u64::from_be_bytes(b) as i64))
}

// ---------------------------------------------------------------- queries

/// One event.
pub fn get_event(kv: &dyn KvRead, id: &EventId) -> Result<Option<Event>, StateError> {
    let k = keys::event(id);
    kv.get(&k)?.map(|v| decode(&k, &v)).transpose()
}

/// Message `id`'s events, one per rule that raised one.
pub fn events_of_message(kv: &dyn KvRead, id: &MessageId) -> Result<Vec<Event>, StateError> {
    let mut out = Vec::new();
    for (k, v) in kv.scan(&keys::message_events_prefix(id), None, MAX_RULES)? {
        let eid =
            EventId::from_bytes(v.as_slice().try_into().map_err(|_| StateError::Corrupt {
                key: keys::hex(&k),
                reason: "bad event id".into(),
            })?);
        if let Some(ev) = get_event(kv, &eid)? {
            out.push(ev);
        }
    }
    Ok(out)
}

/// A page of events, optionally of one queue and one status, in key order;
/// `after` is the `next` of the previous page.
pub fn list_events(
    kv: &dyn KvRead,
    queue: Option<&str>,
    status: Option<EventStatus>,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<(Vec<Event>, Option<Vec<u8>>), StateError> {
    let prefix = match (status, queue) {
        (Some(s), Some(q)) => keys::status_queue_prefix(status_code(s), q),
        (Some(s), None) => keys::status_prefix(status_code(s)),
        (None, _) => keys::EVENT_PREFIX.to_vec(),
    };
    let mut out = Vec::new();
    let mut pos = after.map(<[u8]>::to_vec);
    loop {
        let rows = kv.scan(&prefix, pos.as_deref(), limit.max(1))?;
        let full = rows.len() == limit.max(1);
        for (k, v) in rows {
            pos = Some(k.clone());
            let ev: Event = if status.is_some() {
                match get_event(kv, &tail_event_id(&k)?)? {
                    Some(ev) => ev,
                    None => continue,
                }
            } else {
                decode(&k, &v)?
            };
            if queue.is_some_and(|q| q != ev.queue) {
                continue;
            }
            out.push(ev);
            if out.len() == limit {
                return Ok((out, pos));
            }
        }
        if !full {
            return Ok((out, None));
        }
    }
}

/// Every queue with its counts, by name.
pub fn queue_counts(kv: &dyn KvRead) -> Result<Vec<(String, QueueCounts)>, StateError> {
    kv.scan(keys::QUEUE_PREFIX, None, usize::MAX)?
        .into_iter()
        .map(|(k, v)| {
            Ok((
                String::from_utf8_lossy(&k[1..]).into_owned(),
                decode(&k, &v)?,
            ))
        })
        .collect()
}

/// When `queue`'s next event that DC `local` handles is due (or its
/// earliest lease there runs out); `None` also where another DC handles
/// the queue. (Only entries due before `before_ms` are looked at: callers
/// ask "what is due within the next moment", and the index past that
/// holds the deleted entries of answered leases, which a scan would step
/// over.)
pub fn next_due(
    kv: &dyn KvRead,
    local: &str,
    queue: &str,
    before_ms: i64,
) -> Result<Option<i64>, StateError> {
    let ov = Overlay::default();
    let Ok(lanes) = lanes_here(kv, &ov, local, queue)? else {
        return Ok(None);
    };
    let counts = load_counts(kv, &ov, queue)?;
    let mut best: Option<i64> = None;
    for lane in lanes {
        let prefix = keys::due_prefix(queue, &lane);
        let from = due_floor_key(queue, &lane, counts.floor(&lane));
        let before = due_floor_key(
            queue,
            &lane,
            at_ms(best.unwrap_or(before_ms).min(before_ms)),
        );
        if from >= before {
            continue;
        }
        if let Some((k, _)) = kv
            .scan_below(&prefix, Some(&from), &before, 1)?
            .into_iter()
            .next()
        {
            let ms = keys::decode_due(&k, prefix.len())?.0;
            best = Some(best.map_or(ms, |b| b.min(ms)));
        }
    }
    Ok(best)
}

/// Who handles `queue`'s events: a DC that took it over, or `None`, each
/// event's lane.
pub fn queue_handler(kv: &dyn KvRead, queue: &str) -> Result<Option<String>, StateError> {
    taken_by(kv, &Overlay::default(), queue)
}

/// Refuses, naming the DC to ask, where DC `local` handles no event of
/// `queue` (another DC took it over).
pub fn check_queue_here(kv: &dyn KvRead, local: &str, queue: &str) -> Result<(), StateError> {
    match lanes_here(kv, &Overlay::default(), local, queue)? {
        Ok(_) => Ok(()),
        Err(dc) => Err(StateError::HandledElsewhere {
            queue: queue.to_string(),
            dc,
        }),
    }
}

/// The earliest end of a running lease that DC `local` handles, over
/// every queue, if one ends before `before_ms` (only that far is read:
/// past it lie the deletes of answered leases).
pub fn earliest_lease_end(
    kv: &dyn KvRead,
    local: &str,
    before_ms: i64,
) -> Result<Option<i64>, StateError> {
    let ov = Overlay::default();
    let mut best: Option<i64> = None;
    for (qk, _) in kv.scan(keys::QUEUE_PREFIX, None, usize::MAX)? {
        let queue = String::from_utf8_lossy(&qk[1..]).into_owned();
        let Ok(lanes) = lanes_here(kv, &ov, local, &queue)? else {
            continue;
        };
        for lane in lanes {
            let prefix = keys::lease_end_prefix(&queue, &lane);
            let before = keys::lease_end(&queue, &lane, before_ms, &EventId::from_bytes([0; 16]));
            if let Some((k, _)) = kv.scan_below(&prefix, None, &before, 1)?.into_iter().next() {
                let ms = k
                    .get(prefix.len()..prefix.len() + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(|b: [u8; 8]| u64::from_be_bytes(b) as i64)
                    .ok_or_else(|| StateError::Corrupt {
                        key: keys::hex(&k),
                        reason: "bad lease-end key".into(),
                    })?;
                best = Some(best.map_or(ms, |b| b.min(ms)));
            }
        }
    }
    Ok(best)
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
