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
    /// No entry of the queue's due index is due before this: scans start
    /// here instead of at the index's head, where the entries of events
    /// already leased and answered were deleted (RocksDB would step over
    /// every one of those deletes until compaction, a cost that grew with
    /// the queue's history).
    pub due_floor_ms: i64,
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

/// The position just before every due-index entry of `queue` at `floor_ms`
/// or later (no event id is all zeros: ids carry a version).
fn due_floor_key(queue: &str, floor_ms: i64) -> Vec<u8> {
    keys::due(queue, floor_ms, &EventId::from_bytes([0; 16]))
}

/// The lease-end-index key of `ev`, while it is leased.
fn lease_key(ev: &Event) -> Option<Vec<u8>> {
    (ev.status == EventStatus::Processing).then(|| keys::lease_end(ev.due_ms, &ev.id))
}

/// The due-index key of `ev`, if it belongs there.
fn due_key(ev: &Event) -> Option<Vec<u8>> {
    match ev.status {
        EventStatus::Pending if !ev.blocked => Some(keys::due(&ev.queue, ev.due_ms, &ev.id)),
        EventStatus::Processing => Some(keys::due(&ev.queue, ev.due_ms, &ev.id)),
        _ => None,
    }
}

fn load_counts(base: &dyn KvRead, ov: &Overlay, q: &str) -> Result<QueueCounts, StateError> {
    Ok(ov.load(base, &keys::queue(q))?.unwrap_or_default())
}

/// Stores `ev` (whose stored form was `prev`) with its indexes and counts.
fn put_event(
    base: &dyn KvRead,
    ov: &mut Overlay,
    prev: Option<&Event>,
    ev: &Event,
) -> Result<(), StateError> {
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
    } else if let Some(c) = counts.slot(ev.status) {
        *c += 1;
    }
    ov.put(
        keys::status(status_code(ev.status), &ev.queue, &ev.id),
        Vec::new(),
    );
    if let Some(k) = due_key(ev) {
        counts.due_floor_ms = counts.due_floor_ms.min(ev.due_ms.max(0));
        ov.put(k, Vec::new());
    }
    if let Some(k) = lease_key(ev) {
        ov.put(k, ev.queue.as_bytes().to_vec());
    }
    ov.put(keys::queue(&ev.queue), encode(&counts));
    ov.put(keys::event(&ev.id), encode(ev));
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

// ---------------------------------------------------------------- raising

/// At the origin, in the write that records `meta` as held by every DC:
/// one event per enabled matching rule.
pub(crate) fn raise_events(
    base: &dyn KvRead,
    ov: &mut Overlay,
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
            raise_one(base, ov, &rule, meta, complete_ms, now_ms, without)?;
        }
    }
    Ok(())
}

/// Raises `rule`'s event for `meta` unless it has one; whether it did.
fn raise_one(
    base: &dyn KvRead,
    ov: &mut Overlay,
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
    let mut counts = load_counts(base, ov, &rule.queue)?;
    counts.raised += 1;
    let seq = counts.raised;
    ov.put(keys::queue(&rule.queue), encode(&counts));
    let mut blocked = false;
    if rule.ordering == EventOrdering::PerMailbox {
        let chain = keys::order_prefix(&rule.queue, &meta.mailbox);
        blocked = !ov.scan(base, &chain, None, 1)?.is_empty();
        ov.put(
            keys::order(&rule.queue, &meta.mailbox, seq),
            id.as_bytes().to_vec(),
        );
    }
    let ev = Event {
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
    };
    put_event(base, ov, None, &ev)?;
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
            && raise_one(base, ov, &rule, &meta, complete_ms, now_ms, &[])?
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

/// Leases up to `max` due events of `queue` to `consumer`, and first
/// settles leases of that queue that ran out (each counts as a failure).
/// The same request applied again (a proposal retried after its reply was
/// lost) answers with what the first one leased, still leased, instead of
/// leasing more to nobody.
pub(crate) fn lease_events(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ask: LeaseAsk<'_>,
) -> CommandResponse {
    let LeaseAsk {
        queue,
        consumer,
        max,
        lease_ms,
        now_ms,
        seed,
        request,
    } = ask;
    let lk = keys::last_lease(consumer, queue);
    if let Some(last) = ov.load::<LastLease>(base, &lk)? {
        if last.request == request {
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
    let lease_ms = lease_ms.map(|l| l.clamp(1_000, mailbox_types::event::MAX_LEASE_MS));
    let max = max.clamp(1, MAX_LEASE_BATCH) as usize;
    let prefix = keys::due_prefix(queue);
    let floor = load_counts(base, ov, queue)?.due_floor_ms;
    let from = due_floor_key(queue, floor);
    let scan_limit = max.saturating_mul(2) + LEASE_SCAN_SLACK;
    // Only what is due by now: entries past it (leases under way, later
    // retries) are not needed, and the iterator must not step over the
    // deletes of every answered lease among them.
    let before = due_floor_key(queue, now_ms.saturating_add(1));
    let rows = ov.scan_below(base, &prefix, Some(&from), Some(&before), scan_limit)?;
    // The floor is recomputed below from what is left: while this command
    // runs it stands at "nothing written yet", and every due entry written
    // meanwhile (leases, retries, a mailbox's next event) lowers it through
    // `put_event`, so afterwards it holds the earliest of those.
    let mut c = load_counts(base, ov, queue)?;
    c.due_floor_ms = i64::MAX;
    ov.put(keys::queue(queue), encode(&c));
    let mut processed = 0;
    let mut out = Vec::new();
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
                expire_lease(base, ov, &mut ev, seed)?;
                put_event(base, ov, Some(&prev), &ev)?;
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
                put_event(base, ov, Some(&prev), &ev)?;
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
    let left = if processed < rows.len() {
        keys::decode_due(&rows[processed].0, prefix.len())?.0
    } else if rows.len() == scan_limit {
        keys::decode_due(&rows[rows.len() - 1].0, prefix.len())?.0
    } else {
        // Everything due by now was read and taken.
        now_ms.saturating_add(1).max(floor)
    };
    let mut counts = load_counts(base, ov, queue)?;
    counts.due_floor_ms = counts.due_floor_ms.min(left);
    ov.put(keys::queue(queue), encode(&counts));
    ov.put(
        lk,
        encode(&LastLease {
            request,
            given: out.iter().map(|e| (e.id, e.deliveries)).collect(),
        }),
    );
    Ok(CommandResult::Leased { events: out })
}

/// Settles the leases of every queue that ran out by `now_ms` (at most
/// `limit`, oldest first), so an abandoned event is retried or
/// dead-lettered even when no consumer asks for its queue. Returns how
/// many, and whether more are due.
pub(crate) fn expire_leases(
    base: &dyn KvRead,
    ov: &mut Overlay,
    now_ms: i64,
    seed: u64,
    limit: usize,
) -> CommandResponse {
    let mut count = 0u64;
    let rows = ov.scan(base, keys::LEASE_END_PREFIX, None, limit + 1)?;
    let mut more = false;
    for (k, _) in rows {
        let ms = k
            .get(1..9)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 8]| u64::from_be_bytes(b) as i64)
            .ok_or_else(|| StateError::Corrupt {
                key: keys::hex(&k),
                reason: "bad lease-end key".into(),
            })?;
        if ms > now_ms {
            break;
        }
        if count == limit as u64 {
            more = true;
            break;
        }
        let id = tail_event_id(&k)?;
        let Some(mut ev) = load_event(base, ov, &id)? else {
            return Err(StateError::Corrupt {
                key: keys::hex(&k),
                reason: "lease-end index names a missing event".into(),
            });
        };
        let prev = ev.clone();
        expire_lease(base, ov, &mut ev, seed)?;
        put_event(base, ov, Some(&prev), &ev)?;
        count += 1;
    }
    Ok(CommandResult::Expired { count, more })
}

/// A lease ran out without an answer: a failure, backed off from the
/// lease's end.
fn expire_lease(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ev: &mut Event,
    seed: u64,
) -> Result<(), StateError> {
    let until = ev.lease.as_ref().map_or(ev.due_ms, |l| l.until_ms);
    if let Some(a) = ev.attempts.last_mut().filter(|a| a.outcome.is_none()) {
        a.outcome = Some(AttemptOutcome::Expired);
        a.ended_ms = until;
        a.error = format!(
            "no answer within the lease ({} ms)",
            until.saturating_sub(a.leased_ms)
        );
    }
    ev.updated_ms = until;
    transient_failure(base, ov, ev, until, None, seed)
}

/// A failure that may pass: retried after a backoff, or dead-lettered
/// once the attempts are used up.
fn transient_failure(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ev: &mut Event,
    from_ms: i64,
    delay_ms: Option<u64>,
    seed: u64,
) -> Result<(), StateError> {
    ev.failures += 1;
    ev.lease = None;
    let used = ev.failures - ev.failures_at_replay;
    if used >= ev.retry.max_attempts {
        return finish(base, ov, ev, EventStatus::Failed, from_ms);
    }
    let wait = match delay_ms {
        Some(d) => d.min(MAX_RETRY_DELAY_MS),
        None => ev.retry.backoff_ms(used, draw(seed, &ev.id, ev.failures)),
    };
    ev.status = EventStatus::Pending;
    ev.due_ms = from_ms.saturating_add(wait as i64);
    Ok(())
}

/// Ends `ev` as complete, failed or discarded; with per-mailbox ordering
/// the next event of its mailbox becomes deliverable.
fn finish(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ev: &mut Event,
    status: EventStatus,
    now_ms: i64,
) -> Result<(), StateError> {
    ev.status = status;
    ev.lease = None;
    if ev.ordering == EventOrdering::PerMailbox && !ev.blocked {
        ov.delete(keys::order(&ev.queue, &ev.message.mailbox, ev.seq));
        let chain = keys::order_prefix(&ev.queue, &ev.message.mailbox);
        if let Some((k, v)) = ov.scan(base, &chain, None, 1)?.into_iter().next() {
            let next_id =
                EventId::from_bytes(v.as_slice().try_into().map_err(|_| StateError::Corrupt {
                    key: keys::hex(&k),
                    reason: "bad event id in the order chain".into(),
                })?);
            if next_id != ev.id {
                if let Some(mut next) = load_event(base, ov, &next_id)? {
                    if next.blocked {
                        let prev = next.clone();
                        next.blocked = false;
                        next.due_ms = next.due_ms.max(now_ms);
                        put_event(base, ov, Some(&prev), &next)?;
                    }
                }
            }
        }
    } else if ev.ordering == EventOrdering::PerMailbox {
        // Finished while waiting (discarded, say): just leave the chain.
        ov.delete(keys::order(&ev.queue, &ev.message.mailbox, ev.seq));
    }
    Ok(())
}

/// A consumer's answer to delivery `attempt` of event `id`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ack_event(
    base: &dyn KvRead,
    ov: &mut Overlay,
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
        finish(base, ov, &mut ev, EventStatus::Complete, now_ms)?;
        put_event(base, ov, Some(&prev), &ev)?;
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
            finish(base, ov, &mut ev, EventStatus::Complete, now_ms)?;
        }
        EventAck::Retry { delay_ms, reason } => {
            end(&mut ev, AttemptOutcome::Retry, reason);
            transient_failure(base, ov, &mut ev, now_ms, *delay_ms, seed)?;
        }
        EventAck::Fail { reason } => {
            end(&mut ev, AttemptOutcome::Fail, reason);
            finish(base, ov, &mut ev, EventStatus::Failed, now_ms)?;
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
    put_event(base, ov, Some(&prev), &ev)?;
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
        ev.failures_at_replay = ev.failures;
        ev.lease = None;
        ev.due_ms = now_ms;
        ev.updated_ms = now_ms;
        ev.blocked = false;
        if ev.ordering == EventOrdering::PerMailbox {
            let chain = keys::order_prefix(&ev.queue, &ev.message.mailbox);
            let own = keys::order(&ev.queue, &ev.message.mailbox, ev.seq);
            // Behind whatever of its mailbox is under way (even newer
            // events): two of one mailbox never run at once. When that
            // finishes, the chain's first, which may be this one, goes.
            ev.blocked = !ov.scan(base, &chain, None, 1)?.is_empty();
            ov.put(own, ev.id.as_bytes().to_vec());
        }
        put_event(base, ov, Some(&prev), &ev)?;
        changed.push(*id);
    }
    Ok(CommandResult::EventsChanged { changed, refused })
}

/// Admin discard of dead-lettered events, with the reason kept.
pub(crate) fn discard_events(
    base: &dyn KvRead,
    ov: &mut Overlay,
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
        if ev.status != EventStatus::Failed {
            refused.push((*id, format!("is {}, not dead-lettered", ev.status.as_str())));
            continue;
        }
        let prev = ev.clone();
        ev.status = EventStatus::Discarded;
        ev.note = clip(reason);
        ev.updated_ms = now_ms;
        put_event(base, ov, Some(&prev), &ev)?;
        changed.push(*id);
    }
    Ok(CommandResult::EventsChanged { changed, refused })
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

/// When `queue`'s next event is due (or its earliest lease runs out).
/// (Only entries due before `before_ms` are looked at: callers ask "what
/// is due within the next moment", and the index past that holds the
/// deleted entries of answered leases, which a scan would step over.)
pub fn next_due(kv: &dyn KvRead, queue: &str, before_ms: i64) -> Result<Option<i64>, StateError> {
    let prefix = keys::due_prefix(queue);
    let qk = keys::queue(queue);
    let floor = kv
        .get(&qk)?
        .map(|v| decode::<QueueCounts>(&qk, &v))
        .transpose()?
        .map_or(0, |c| c.due_floor_ms);
    let from = due_floor_key(queue, floor);
    let before = due_floor_key(queue, before_ms);
    if from >= before {
        return Ok(None);
    }
    match kv
        .scan_below(&prefix, Some(&from), &before, 1)?
        .into_iter()
        .next()
    {
        Some((k, _)) => Ok(Some(keys::decode_due(&k, prefix.len())?.0)),
        None => Ok(None),
    }
}

/// The earliest end of a running lease, over every queue.
pub fn earliest_lease_end(kv: &dyn KvRead) -> Result<Option<i64>, StateError> {
    Ok(kv
        .scan(keys::LEASE_END_PREFIX, None, 1)?
        .into_iter()
        .next()
        .and_then(|(k, _)| k.get(1..9).and_then(|b| b.try_into().ok()))
        .map(|b: [u8; 8]| u64::from_be_bytes(b) as i64))
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
