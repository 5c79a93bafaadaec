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
//! - an idempotency key maps to exactly one message per mailbox, in every
//!   DC (keys replicate with their message; concurrent uses in two DCs
//!   settle on the older message everywhere), and keeps answering for the
//!   idempotency retention after the message was deleted;
//! - the same `PutMessage` applied twice (a forward retried after its reply
//!   was lost) is the same success on every path: after an attribute
//!   change, after its key was used, after a delete (a deleted message is
//!   remembered as [`Gone`] for the retention, so it never comes back);
//! - a message whose segments the orphan collector condemned (committed
//!   through the log before anything is removed) is never committed with
//!   them: such a proposal is refused.

pub mod accounts;
pub mod events;
pub mod keys;
mod query;
pub mod replication;

use std::collections::BTreeMap;

use mailbox_types::{
    Event, EventId, EventRule, MailboxPath, MailboxRecord, MessageId, MessageMeta,
};
use serde::{Deserialize, Serialize};

pub use events::{EventAck, QueueCounts, QueueOwner, RuleRecord, Suspension};
pub use query::{
    feed_identity, get_gone, get_mailbox, get_message, inline_payload, list_mailboxes,
    list_messages, orphan_pending, pending_orphans,
};
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
        /// The origin feed's identity, as its batches carry it (empty when
        /// unknown): refused when this DC's cursor belongs to another.
        identity: String,
        /// The origin feed's last sequence number when it served these
        /// records: reaching it means this DC has read everything the
        /// origin had written by then (see [`replication::PeerHeard`]).
        /// May come with no records: a keep-alive's proof of contact.
        head: u64,
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
    /// The orphan collector's decision to remove the segments of messages
    /// that have no committed message: committed before anything is
    /// removed, so a `PutMessage` of such an id applied later is refused
    /// instead of committing a message whose segments are gone, and one
    /// applied earlier makes the collector skip it.
    CondemnOrphans {
        /// Candidate ids (segment directories without a message).
        ids: Vec<MessageId>,
        /// When, ms since the epoch (proposer's clock).
        at_ms: i64,
    },
    /// The condemned segments of these ids are removed from the segment
    /// store (the fetcher may now write there again).
    OrphansCollected {
        /// The ids.
        ids: Vec<MessageId>,
    },
    /// Forgets deleted messages' records (idempotency keys, replay guards)
    /// and orphan decisions made before `before_ms` (now minus the
    /// idempotency retention, by the proposer's clock).
    Expire {
        /// Cut-off, ms since the epoch.
        before_ms: i64,
    },
    /// Gives this DC's feed its identity, once: later ones are ignored, so
    /// a DC log keeps the identity it was created with, and a DC rebuilt
    /// from empty gets a new one (other DCs then refuse to continue their
    /// cursor on it instead of silently skipping its new records).
    InitFeedIdentity {
        /// A fresh unique string (a UUID).
        identity: String,
    },
    /// Admin recovery after a remote DC's feed changed identity (it was
    /// rebuilt from empty): forget the cursor on `origin`'s feed, so it is
    /// read again from its start. Re-reading is safe: every record applies
    /// idempotently (existing messages are skipped, deletes stay deleted).
    ResetFeed {
        /// The remote DC.
        origin: String,
    },
    /// Remote DCs report how far they have applied this DC's feed (each
    /// cursor is committed in its DC's log when reported). Records that
    /// every other cluster DC has applied are trimmed, a bounded number
    /// per command; a report never moves a DC's known cursor back.
    FeedCursors {
        /// Remote DC name → its cursor on this DC's feed.
        cursors: BTreeMap<String, FeedAck>,
    },
    /// `origin`'s state, for a DC whose cursor is below `origin`'s trimmed
    /// feed (it was rebuilt, reset, or joined late): feed records without
    /// sequence numbers, each applied as a feed record would be. Ignored
    /// once the cursor stands at or past `floor`; the last batch (`done`)
    /// moves the cursor to `floor`, and the feed continues after it
    /// (records already covered apply idempotently).
    ApplyResync {
        /// The DC whose state this is.
        origin: String,
        /// Its feed identity.
        identity: String,
        /// Records describing the state.
        records: Vec<FeedRecord>,
        /// When they arrived (proposer's clock).
        received_ms: i64,
        /// Messages whose every segment arrived with the records.
        payload_here: Vec<MessageId>,
        /// The origin's feed floor when the resync began.
        floor: u64,
        /// The last batch of the resync.
        done: bool,
    },
    /// Adds or replaces an event rule (cluster configuration: stamped and
    /// sent to every DC through the feed, last writer wins).
    PutRule {
        /// The rule, validated again here.
        rule: EventRule,
        /// The proposer's wall clock, ms since the epoch.
        wall_ms: i64,
    },
    /// Deletes an event rule everywhere (events it raised stay).
    DeleteRule {
        /// The rule.
        name: String,
        /// The proposer's wall clock, ms since the epoch.
        wall_ms: i64,
    },
    /// Raises rule `name`'s event for messages completed here that match
    /// and have none yet: one page of the completed messages after `after`.
    EvaluateRule {
        /// The rule.
        name: String,
        /// Where the previous page ended.
        after: Option<MessageId>,
        /// Messages to look at.
        limit: u32,
        /// The proposer's clock.
        now_ms: i64,
    },
    /// Leases up to `max` due events of `queue` to `consumer` (and settles
    /// that queue's leases that ran out first).
    LeaseEvents {
        /// The queue.
        queue: String,
        /// Who takes them (shown in each attempt).
        consumer: String,
        /// How many at most.
        max: u32,
        /// Lease length; the rule's when `None`.
        lease_ms: Option<u64>,
        /// The proposer's clock.
        now_ms: i64,
        /// Randomness for backoff jitter (the proposer's).
        seed: u64,
        /// The request's id (random): a retried proposal of the same
        /// request is answered with the events the first one leased.
        request: u64,
    },
    /// A consumer's answer to delivery `attempt` of event `id`.
    AckEvent {
        /// The event.
        id: EventId,
        /// The delivery answered (the lease's token).
        attempt: u32,
        /// Who answers.
        consumer: String,
        /// The answer.
        ack: EventAck,
        /// The proposer's clock.
        now_ms: i64,
        /// Randomness for backoff jitter.
        seed: u64,
    },
    /// Delivers dead-lettered (or, forced, complete) events again.
    ReplayEvents {
        /// The events.
        ids: Vec<EventId>,
        /// Also complete ones.
        force: bool,
        /// The proposer's clock.
        now_ms: i64,
    },
    /// Removes dead-lettered events from the dead-letter queue (kept as
    /// discarded, with the reason).
    DiscardEvents {
        /// The events.
        ids: Vec<EventId>,
        /// Why.
        reason: String,
        /// The proposer's clock.
        now_ms: i64,
    },
    /// Settles leases that ran out by `now_ms`, in every queue.
    ExpireLeases {
        /// The proposer's clock.
        now_ms: i64,
        /// Randomness for backoff jitter.
        seed: u64,
    },
    /// Suspends DC `dc` from completion (messages then complete without
    /// it, and their events fire, marked so), or resumes it. Cluster
    /// configuration: sent to every DC, last writer wins.
    SuspendDc {
        /// The DC.
        dc: String,
        /// Suspend, or resume.
        suspended: bool,
        /// The admin's reason (kept, shown).
        reason: String,
        /// The proposer's wall clock.
        wall_ms: i64,
    },
    /// One page of the re-check of origin messages not yet complete,
    /// while one is due (after a DC was suspended or left the cluster).
    RecheckCompletion {
        /// The proposer's clock (when raised events become due).
        now_ms: i64,
    },
    /// An admin hands every event of `queue` to DC `dc` (`None`: back to
    /// the DC that raised each), when the DC handling them is down.
    TakeoverQueue {
        /// The queue.
        queue: String,
        /// The DC that handles its events from now on.
        dc: Option<String>,
        /// Why.
        reason: String,
        /// The proposer's clock.
        wall_ms: i64,
        /// Hand the queue over even from a DC heard from within
        /// [`events::TAKEOVER_SILENCE_MS`] (it may still be delivering).
        force: bool,
    },
    /// Removes events finished (complete or discarded) before `before_ms`,
    /// a bounded page (the leader's housekeeping, after the retention).
    PurgeEvents {
        /// The proposer's clock minus the retention.
        before_ms: i64,
    },
    /// Dead-letter notices sent (or dropped: the rule has no error webhook
    /// any more): out of the outbox.
    ClearNotices {
        /// The rule they were for.
        rule: String,
        /// Each notice's time and event.
        notices: Vec<(i64, EventId)>,
    },
    /// One page of the re-announcement of a taken-over queue's events.
    AnnounceQueue {
        /// The queue.
        queue: String,
    },
    /// A dead-letter notification about to be sent, sealed: its notices
    /// leave the outbox and the exact body is kept under its id, so every
    /// retry (by any leader) sends the same id with the same content. Only
    /// if every notice is still in the outbox (else nothing changes:
    /// another proposal sealed them).
    SealNotices {
        /// The rule.
        rule: String,
        /// The notification's `webhook-id`.
        id: String,
        /// The JSON body.
        body: Vec<u8>,
        /// The notices it reports.
        notices: Vec<(i64, EventId)>,
    },
    /// A sealed notification was delivered (or its rule lost its error
    /// webhook): forgotten.
    ClearSealed {
        /// The rule.
        rule: String,
        /// The notification's id.
        id: String,
    },
    /// An admin sets (or deletes, `value: None`) an account record: a
    /// user, a grant or a token; sent to every DC (see [`accounts`]).
    SetAccount {
        /// Which record.
        key: mailbox_types::account::AccountKey,
        /// Its new value; `None` deletes it.
        value: Option<mailbox_types::account::AccountValue>,
        /// The proposer's clock.
        wall_ms: i64,
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
    /// The ids whose segments the collector may now remove.
    Condemned {
        /// Condemned ids without a committed message.
        ids: Vec<MessageId>,
    },
    /// Records forgotten by [`Command::Expire`].
    Expired {
        /// How many.
        count: u64,
        /// Whether more are due (propose again).
        more: bool,
    },
    /// Remote feed records were applied.
    Remote {
        /// How many were new.
        applied: u64,
        /// The origin's cursor afterwards.
        cursor: u64,
    },
    // (New variants go last: bincode numbers them by position.)
    /// Remote DCs' cursors on this DC's feed were recorded.
    Trimmed {
        /// Own feed records up to here are trimmed.
        floor: u64,
        /// Whether more can be trimmed (report again).
        more: bool,
    },
    /// A page of a rule's evaluation.
    Evaluated {
        /// Completed messages looked at.
        scanned: u64,
        /// Events raised.
        added: u64,
        /// Where the next page starts (`None`: done).
        next: Option<MessageId>,
    },
    /// Events leased by [`Command::LeaseEvents`].
    Leased {
        /// The events, each at its new delivery.
        events: Vec<Event>,
    },
    /// An event after an answer.
    EventUpdated {
        /// The event (boxed: it carries its attempts and message context).
        event: Box<Event>,
    },
    /// Events replayed or discarded, and the ones refused with why.
    EventsChanged {
        /// Changed.
        changed: Vec<EventId>,
        /// Refused, with the reason.
        refused: Vec<(EventId, String)>,
    },
    /// No lease: this DC was out of action (down, or without a quorum)
    /// and has not yet heard from every other DC since (one may have
    /// taken its queues over). Not a refusal, so that the DC's record of
    /// when it came back stands; the caller retries.
    CatchingUp {
        /// The DCs not heard from since.
        dcs: String,
        /// When it leases anyway (ms since the epoch).
        until_ms: i64,
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
    /// The orphan collector condemned this id's segments before the
    /// message committed (an upload that stalled past the grace period).
    #[error("the segments of message {id} were removed as orphans (the upload stalled for longer than the orphan grace period); upload again")]
    SegmentsCollected {
        /// The id.
        id: String,
    },
    /// A remote feed's identity differs from the one this DC's cursor on
    /// it belongs to: the remote DC's log was rebuilt from empty.
    #[error("DC {origin}'s feed is {found}, but this DC's cursor belongs to feed {expected}: {origin} was rebuilt; see docs/operations.md, 'A DC rebuilt from empty'")]
    FeedIdentityChanged {
        /// The remote DC.
        origin: String,
        /// The identity this DC's cursor belongs to.
        expected: String,
        /// The identity offered.
        found: String,
    },
    /// Records of this DC's own feed offered as another DC's.
    #[error("refusing to apply our own feed ({origin}) as remote")]
    OwnFeed {
        /// The DC.
        origin: String,
    },
    /// Reading the underlying store failed. Not a refusal: the node cannot
    /// know what the command would have done (see [`StateError::is_fatal`]).
    #[error("state read failed: {reason}")]
    Read {
        /// What the store said.
        reason: String,
    },
    /// The node is replacing its state with a snapshot from the leader: a
    /// read now could see part of it. Retry, or ask another node.
    #[error("this node is installing a snapshot of the state; retry shortly or ask another node")]
    Installing,
    // (New variants go last: bincode numbers them by position.)
    /// A value the state machine checks again (a rule) is not valid.
    #[error("{reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
    /// No such event rule.
    #[error("rule {name} does not exist")]
    RuleNotFound {
        /// The rule.
        name: String,
    },
    /// No such event.
    #[error("event {id} does not exist")]
    EventNotFound {
        /// The event.
        id: String,
    },
    /// An answer to a delivery that is no longer leased (its lease ran out
    /// and it was settled or delivered again).
    #[error("event {id}: delivery {attempt} is no longer leased ({reason}); its outcome is what happened since")]
    LeaseLost {
        /// The event.
        id: String,
        /// The delivery answered.
        attempt: u32,
        /// Where the event is now.
        reason: String,
    },
    /// A change to an event (a lease, an answer, a replay) asked of a DC
    /// that does not handle its queue.
    #[error("the events of queue {queue} are handled by DC {dc}: ask a node there (if {dc} is down, an admin can hand the queue over: mailbox events takeover {queue} --dc <this DC>)")]
    HandledElsewhere {
        /// The queue.
        queue: String,
        /// The DC that handles it.
        dc: String,
    },
    /// A takeover from a DC this DC heard from lately: it is probably up
    /// and delivering, and would deliver again what the new handler does
    /// until it reads the takeover.
    #[error("queue {queue} is handled by {dcs}, heard from {ago_s} s ago: it may still be delivering, and handing the queue over now could deliver events twice; hand it over once {dcs} has been silent for {silence_s} s, or pass --force if it is down for certain")]
    HandlerHeard {
        /// The queue.
        queue: String,
        /// The DCs that handle it and were heard from lately.
        dcs: String,
        /// How long ago the latest of them was heard from, seconds.
        ago_s: i64,
        /// The silence a takeover needs, seconds.
        silence_s: i64,
    },
    /// No such user, grant or token.
    #[error("{what} does not exist")]
    AccountNotFound {
        /// What was looked for.
        what: String,
    },
}

impl StateError {
    /// Whether this error says the node's own storage failed (an I/O error
    /// or undecodable bytes) rather than that the command was refused.
    /// Refusals are deterministic: every node refuses alike. A failed read
    /// is not: treating it as a refusal would make this node skip a
    /// command its peers applied, and silently diverge. Such errors stop
    /// the node's state machine instead.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StateError::Read { .. } | StateError::Corrupt { .. } | StateError::Installing
        )
    }
}

/// The first storage failure (see [`StateError::is_fatal`]) in a
/// response, looking into batches.
pub fn fatal_error(r: &CommandResponse) -> Option<&StateError> {
    match r {
        Err(e) if e.is_fatal() => Some(e),
        Ok(CommandResult::Batch(rs)) => rs.iter().find_map(fatal_error),
        _ => None,
    }
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

    /// [`KvRead::scan`], and only keys below `before`. A store bounds its
    /// iterator there, so it never steps over deleted keys past it; this
    /// default reads the same rows and cuts them.
    fn scan_below(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        before: &[u8],
        limit: usize,
    ) -> Result<KvPairs, StateError> {
        let mut rows = self.scan(prefix, after, limit)?;
        rows.retain(|(k, _)| k.as_slice() < before);
        Ok(rows)
    }
}

/// Key/value pairs returned by a scan, in key order.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A key and its overlay value before the current command touched it.
type UndoEntry = (Vec<u8>, Option<Option<Vec<u8>>>);

/// Pending writes of one apply batch: later commands in the same batch must
/// see the writes of earlier ones, so reads go through this overlay first.
///
/// It also remembers what it read from `base`: the base does not change
/// while one batch is applied (only the apply writes the state, after the
/// batch, and openraft never installs a snapshot during an apply), and
/// every command of a batch reads the same few records again (its
/// mailbox, the cluster's DC list). An overlay therefore lives for one
/// batch over one base.
#[derive(Debug, Default)]
pub struct Overlay {
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Previous overlay values of keys touched by the command being
    /// applied, so a refused command can be rolled back.
    undo: Vec<UndoEntry>,
    /// Values read from the base (`None`: absent), small ones only.
    reads: std::cell::RefCell<std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>>,
    /// The base the cached reads came from (its address), checked in
    /// debug builds: an overlay reused over another base would answer
    /// from a stale cache.
    base: std::cell::Cell<usize>,
}

/// Base values larger than this are not kept by the overlay's read cache
/// (records read again within a batch are small; payloads are not).
const READ_CACHE_MAX_VALUE: usize = 4096;
/// Keys the read cache holds at most (a large remote batch reads many).
const READ_CACHE_MAX_KEYS: usize = 4096;

impl Overlay {
    /// An empty overlay.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn get(&self, base: &dyn KvRead, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        let addr = base as *const dyn KvRead as *const () as usize;
        if self.base.get() == 0 {
            self.base.set(addr);
        }
        debug_assert_eq!(self.base.get(), addr, "one overlay is read over one base");
        if let Some(v) = self.reads.borrow().get(key) {
            return Ok(v.clone());
        }
        let v = base.get(key)?;
        let mut reads = self.reads.borrow_mut();
        if reads.len() < READ_CACHE_MAX_KEYS
            && v.as_ref().is_none_or(|v| v.len() <= READ_CACHE_MAX_VALUE)
        {
            reads.insert(key.to_vec(), v.clone());
        }
        Ok(v)
    }

    /// [`KvRead::scan`] over `base` with this overlay's pending writes
    /// applied, so a command sees what earlier commands of its batch wrote
    /// (results never depend on where batch boundaries fall).
    pub(crate) fn scan(
        &self,
        base: &dyn KvRead,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StateError> {
        self.scan_below(base, prefix, after, None, limit)
    }

    /// [`Overlay::scan`], and only keys below `before` (see
    /// [`KvRead::scan_below`]).
    pub(crate) fn scan_below(
        &self,
        base: &dyn KvRead,
        prefix: &[u8],
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<KvPairs, StateError> {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Included(prefix.to_vec()),
        };
        let end = match before {
            Some(b) => Bound::Excluded(b.to_vec()),
            None => Bound::Unbounded,
        };
        // An empty range (BTreeMap::range panics on a reversed one).
        if let Some(b) = before {
            if after.unwrap_or(prefix) >= b {
                return Ok(Vec::new());
            }
        }
        let base_scan = |want: usize| match before {
            Some(b) => base.scan_below(prefix, after, b, want),
            None => base.scan(prefix, after, want),
        };
        let pending: Vec<_> = self
            .writes
            .range((start, end))
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect();
        if pending.is_empty() {
            return base_scan(limit);
        }
        // Each pending delete can hide one base row: read that many more.
        let deletes = pending.iter().filter(|(_, v)| v.is_none()).count();
        // (Saturating: "no limit" is usize::MAX.)
        let want = limit.saturating_add(deletes);
        let rows = base_scan(want)?;
        // When the base had more rows than read, pending writes past its
        // last row read may sort before base rows not read: leave them out.
        let bound = (rows.len() == want).then(|| rows.last().map(|(k, _)| k.clone()));
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = rows.into_iter().collect();
        for (k, v) in pending {
            if let Some(Some(b)) = &bound {
                if *k > *b {
                    break;
                }
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    /// A decoded record, seen through the pending writes.
    pub(crate) fn load<T: for<'de> Deserialize<'de>>(
        &self,
        base: &dyn KvRead,
        key: &[u8],
    ) -> Result<Option<T>, StateError> {
        self.get(base, key)?.map(|v| decode(key, &v)).transpose()
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

/// Up to `limit` records under `prefix`, each with the rest of its key
/// (a name: a DC, an id) as text.
pub(crate) fn named_records<T: for<'de> Deserialize<'de>>(
    kv: &dyn KvRead,
    prefix: &[u8],
    limit: usize,
) -> Result<Vec<(String, T)>, StateError> {
    kv.scan(prefix, None, limit)?
        .into_iter()
        .map(|(k, v)| {
            Ok((
                String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                decode(&k, &v)?,
            ))
        })
        .collect()
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
            match put_message(
                base,
                overlay,
                meta,
                inline.as_deref(),
                idempotency_key.as_deref(),
                KeyUse::Local,
            )? {
                Put::New => {
                    replication::mark_new_local(base, overlay, ctx, meta)?;
                    replication::feed_append(
                        base,
                        overlay,
                        // Without the inline payload: the message record's
                        // is the one copy (`feed_since` reads it from there).
                        &FeedRecord::Message {
                            meta: meta.clone(),
                            inline: None,
                            idempotency_key: idempotency_key.clone(),
                        },
                    )?;
                    Ok(CommandResult::Message {
                        meta: meta.clone(),
                        deduplicated: false,
                    })
                }
                Put::NewDuplicate { .. } => unreachable!("only remote puts merge duplicates"),
                Put::Replay(meta) => Ok(CommandResult::Message {
                    meta,
                    deduplicated: false,
                }),
                Put::Deduplicated(meta) => Ok(CommandResult::Message {
                    meta,
                    deduplicated: true,
                }),
            }
        }
        Command::DeleteMessage { id, at_ms } => {
            replication::delete_here(base, overlay, ctx, id, *at_ms)
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
            identity,
            head,
        } => replication::apply_remote(
            base,
            overlay,
            ctx,
            replication::Pulled {
                origin,
                identity,
                records,
                received_ms: *received_ms,
                payload_here,
                head: *head,
            },
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
            // And the last one some messages waited for.
            replication::request_recheck(overlay);
            Ok(CommandResult::None)
        }
        Command::CondemnOrphans { ids, at_ms } => condemn_orphans(base, overlay, ids, *at_ms),
        Command::OrphansCollected { ids } => {
            for id in ids {
                if let Some(mut o) = orphan(base, overlay, id)? {
                    o.collected = true;
                    overlay.put(keys::orphan(id), encode(&o));
                }
            }
            Ok(CommandResult::None)
        }
        Command::Expire { before_ms } => expire(base, overlay, *before_ms),
        Command::InitFeedIdentity { identity } => {
            if overlay.get(base, keys::FEED_IDENTITY)?.is_none() {
                overlay.put(keys::FEED_IDENTITY.to_vec(), encode(identity));
            }
            Ok(CommandResult::None)
        }
        Command::FeedCursors { cursors } => replication::feed_cursors(base, overlay, ctx, cursors),
        Command::ApplyResync {
            origin,
            identity,
            records,
            received_ms,
            payload_here,
            floor,
            done,
        } => replication::apply_resync(
            base,
            overlay,
            ctx,
            replication::Resync {
                origin,
                identity,
                records,
                received_ms: *received_ms,
                payload_here,
                floor: *floor,
                done: *done,
            },
        ),
        Command::ResetFeed { origin } => {
            overlay.delete(keys::cursor(origin));
            overlay.delete(keys::feed_identity(origin));
            Ok(CommandResult::None)
        }
        Command::PutRule { rule, wall_ms } => {
            events::set_rule_local(base, overlay, ctx, &rule.name, Some(rule), *wall_ms)
        }
        Command::DeleteRule { name, wall_ms } => {
            events::set_rule_local(base, overlay, ctx, name, None, *wall_ms)
        }
        Command::EvaluateRule {
            name,
            after,
            limit,
            now_ms,
        } => events::evaluate_rule(base, overlay, ctx, name, after.as_ref(), *limit, *now_ms),
        Command::LeaseEvents {
            queue,
            consumer,
            max,
            lease_ms,
            now_ms,
            seed,
            request,
        } => {
            events::note_activity(base, overlay, *now_ms)?;
            if let Some(r) = events::check_caught_up(base, overlay, ctx, *now_ms)? {
                return Ok(r);
            }
            events::lease_events(
                base,
                overlay,
                ctx,
                events::LeaseAsk {
                    queue,
                    consumer,
                    max: *max,
                    lease_ms: *lease_ms,
                    now_ms: *now_ms,
                    seed: *seed,
                    request: *request,
                },
            )
        }
        Command::AckEvent {
            id,
            attempt,
            consumer,
            ack,
            now_ms,
            seed,
        } => {
            events::note_activity(base, overlay, *now_ms)?;
            events::ack_event(
                base, overlay, ctx, id, *attempt, consumer, ack, *now_ms, *seed,
            )
        }
        Command::ReplayEvents { ids, force, now_ms } => {
            events::replay_events(base, overlay, ctx, ids, *force, *now_ms)
        }
        Command::DiscardEvents {
            ids,
            reason,
            now_ms,
        } => events::discard_events(base, overlay, ctx, ids, reason, *now_ms),
        Command::ExpireLeases { now_ms, seed } => {
            events::note_activity(base, overlay, *now_ms)?;
            events::expire_leases(base, overlay, ctx, *now_ms, *seed, 1024)
        }
        Command::SuspendDc {
            dc,
            suspended,
            reason,
            wall_ms,
        } => events::set_suspension_local(base, overlay, ctx, dc, *suspended, reason, *wall_ms),
        Command::RecheckCompletion { now_ms } => {
            replication::recheck_completion(base, overlay, ctx, *now_ms)
        }
        Command::TakeoverQueue {
            queue,
            dc,
            reason,
            wall_ms,
            force,
        } => events::set_owner_local(
            base,
            overlay,
            ctx,
            queue,
            dc.as_deref(),
            reason,
            *wall_ms,
            *force,
        ),
        Command::PurgeEvents { before_ms } => {
            events::purge_events(base, overlay, *before_ms, events::MAX_PURGE_BATCH)
        }
        Command::AnnounceQueue { queue } => events::announce_queue(base, overlay, queue),
        Command::SealNotices {
            rule,
            id,
            body,
            notices,
        } => events::seal_notices(base, overlay, rule, id, body, notices),
        Command::SetAccount {
            key,
            value,
            wall_ms,
        } => accounts::set_account_local(base, overlay, ctx, key, value.as_ref(), *wall_ms),
        Command::ClearSealed { rule, id } => {
            overlay.delete(keys::sealed(rule, id));
            Ok(CommandResult::None)
        }
        Command::ClearNotices { rule, notices } => {
            for (ms, id) in notices {
                overlay.delete(keys::notice(rule, *ms, id));
            }
            Ok(CommandResult::None)
        }
    }
}

/// A remote DC's report of how far it applied this DC's feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedAck {
    /// The reporting DC's own feed identity (it changes when that DC is
    /// rebuilt from empty, and with it the cursor may go back).
    pub identity: String,
    /// Its cursor on this DC's feed.
    pub cursor: u64,
}

/// What remains of a deleted message (see [`keys::gone`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gone {
    /// When it was deleted.
    pub at_ms: i64,
    /// Its metadata, which its idempotency key still answers with.
    pub meta: MessageMeta,
    /// Whether its tombstone was purged (every DC acknowledged the delete):
    /// a late acknowledgement then is old news, not a new tombstone.
    pub settled: bool,
}

/// The orphan collector's decision on an id's segments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orphan {
    /// When it was condemned.
    pub at_ms: i64,
    /// Whether the segments were removed since.
    pub collected: bool,
}

pub(crate) fn message(
    base: &dyn KvRead,
    ov: &Overlay,
    id: &MessageId,
) -> Result<Option<MessageMeta>, StateError> {
    ov.load(base, &keys::message(id))
}

pub(crate) fn gone(
    base: &dyn KvRead,
    ov: &Overlay,
    id: &MessageId,
) -> Result<Option<Gone>, StateError> {
    ov.load(base, &keys::gone(id))
}

pub(crate) fn orphan(
    base: &dyn KvRead,
    ov: &Overlay,
    id: &MessageId,
) -> Result<Option<Orphan>, StateError> {
    ov.load(base, &keys::orphan(id))
}

fn condemn_orphans(
    base: &dyn KvRead,
    ov: &mut Overlay,
    ids: &[MessageId],
    at_ms: i64,
) -> CommandResponse {
    let mut out = Vec::new();
    for id in ids {
        let prior = orphan(base, ov, id)?;
        if message(base, ov, id)?.is_some() {
            // Committed before the decision: its segments are no orphans.
            // Committed after an unfinished one (a record that came late
            // for a payload pushed early): not held here, its fetch waits
            // for the removal, so the decision is carried out.
            if prior.as_ref().is_some_and(|o| !o.collected) {
                out.push(*id);
            }
            continue;
        }
        match prior {
            Some(o) if !o.collected => {}
            _ => {
                // New, or found again after a collection (a late write):
                // condemned anew, its expiry counted from now.
                ov.put(
                    keys::orphan(id),
                    encode(&Orphan {
                        at_ms,
                        collected: false,
                    }),
                );
                ov.put(keys::expiry(at_ms, keys::EXPIRE_ORPHAN, id), Vec::new());
            }
        }
        out.push(*id);
    }
    Ok(CommandResult::Condemned { ids: out })
}

/// Records expired per [`Command::Expire`] at most (the proposer repeats
/// while `more`).
const EXPIRE_BATCH: usize = 1024;

fn expire(base: &dyn KvRead, ov: &mut Overlay, before_ms: i64) -> CommandResponse {
    let rows = ov.scan(base, keys::EXPIRY_PREFIX, None, EXPIRE_BATCH + 1)?;
    let mut count = 0;
    let mut more = false;
    for (k, _) in rows {
        let (ms, what, id) = keys::decode_expiry(&k)?;
        if ms >= before_ms {
            break;
        }
        if count == EXPIRE_BATCH as u64 {
            more = true;
            break;
        }
        ov.delete(k);
        count += 1;
        match what {
            keys::EXPIRE_GONE => {
                let Some(g) = gone(base, ov, &id)? else {
                    continue;
                };
                ov.delete(keys::gone(&id));
                ov.delete(keys::reacked(&id));
                let ik = keys::message_idempotency(&id);
                if let Some(key) = ov.get(base, &ik)? {
                    let kk = keys::idempotency(&g.meta.mailbox, &String::from_utf8_lossy(&key));
                    if ov.get(base, &kk)?.as_deref() == Some(id.as_bytes().as_slice()) {
                        ov.delete(kk);
                    }
                    ov.delete(ik);
                }
            }
            // Re-condemned later: that decision has its own entry.
            keys::EXPIRE_ORPHAN if orphan(base, ov, &id)?.is_some_and(|o| o.at_ms == ms) => {
                ov.delete(keys::orphan(&id));
            }
            _ => {}
        }
    }
    Ok(CommandResult::Expired { count, more })
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

/// How `put_message` treats an idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyUse {
    /// An upload here: a key already used answers with its message.
    Local,
    /// A message of another DC's feed: it exists there, so it is stored
    /// whatever the key; when two DCs used one key concurrently, the key
    /// maps to the older message (smaller id) in every DC.
    Remote,
}

/// Outcome of a put that was not refused.
#[derive(Debug)]
pub(crate) enum Put {
    /// Stored now.
    New,
    /// This very message was stored by an earlier apply of the same
    /// proposal (it may have changed or been deleted since).
    Replay(MessageMeta),
    /// The idempotency key belongs to this earlier message.
    Deduplicated(MessageMeta),
    /// Stored (a remote message), but another message already here has
    /// the same idempotency key and the same payload: the same file was
    /// uploaded into two DCs that could not see each other (a retry into
    /// the other DC during a partition). The newer of the two (`loser`,
    /// possibly the one just stored) is a duplicate.
    NewDuplicate {
        /// The older message, which stays.
        winner: MessageId,
        /// The newer message, which every DC removes once it holds the
        /// older one's payload (never before: the newer may be this DC's
        /// only copy of the file).
        loser: MessageId,
    },
}

/// Whether `existing` is the message `meta` describes, as first stored:
/// everything but the mutable attributes agrees.
fn same_upload(existing: &MessageMeta, meta: &MessageMeta) -> bool {
    existing.id == meta.id
        && existing.mailbox == meta.mailbox
        && existing.name == meta.name
        && existing.size == meta.size
        && existing.sha256 == meta.sha256
        && existing.created_ms == meta.created_ms
        && existing.origin_dc == meta.origin_dc
        && existing.payload == meta.payload
}

pub(crate) fn put_message(
    base: &dyn KvRead,
    ov: &mut Overlay,
    meta: &MessageMeta,
    inline: Option<&[u8]>,
    idem: Option<&str>,
    key_use: KeyUse,
) -> Result<Put, StateError> {
    // The id first: a replayed proposal is recognised however the message
    // changed since, and never falls through to the key check (which would
    // call it a duplicate of itself) or to a second store.
    if let Some(existing) = message(base, ov, &meta.id)? {
        if same_upload(&existing, meta) {
            return Ok(Put::Replay(existing));
        }
        return Err(StateError::MessageExists {
            id: meta.id.to_string(),
        });
    }
    if let Some(g) = gone(base, ov, &meta.id)? {
        if same_upload(&g.meta, meta) {
            return Ok(Put::Replay(g.meta));
        }
        return Err(StateError::MessageExists {
            id: meta.id.to_string(),
        });
    }
    if key_use == KeyUse::Local && orphan(base, ov, &meta.id)?.is_some() {
        return Err(StateError::SegmentsCollected {
            id: meta.id.to_string(),
        });
    }
    if ov.get(base, &keys::mailbox(&meta.mailbox))?.is_none() {
        return Err(StateError::MailboxNotFound {
            path: meta.mailbox.to_string(),
        });
    }
    let mut claim_key = idem.is_some();
    let mut duplicate = None;
    if let Some(k) = idem {
        let ikey = keys::idempotency(&meta.mailbox, k);
        if let Some(raw) = ov.get(base, &ikey)? {
            let id = keys::decode_id(&ikey, &raw)?;
            let earlier = match message(base, ov, &id)? {
                Some(m) => Some(m),
                None => gone(base, ov, &id)?.map(|g| g.meta),
            };
            if let Some(earlier) = earlier {
                match key_use {
                    KeyUse::Local => return Ok(Put::Deduplicated(earlier)),
                    KeyUse::Remote => {
                        claim_key = meta.id < earlier.id;
                        let alive = message(base, ov, &earlier.id)?.is_some();
                        if alive && earlier.sha256 == meta.sha256 && earlier.size == meta.size {
                            duplicate = Some((meta.id.min(earlier.id), meta.id.max(earlier.id)));
                        }
                    }
                }
            }
        }
    }
    let mkey = keys::message(&meta.id);
    ov.put(mkey, encode(meta));
    ov.put(keys::listing(&meta.mailbox, &meta.id), Vec::new());
    if let Some(data) = inline {
        ov.put(keys::inline(&meta.id), data.to_vec());
    }
    if let Some(k) = idem {
        if claim_key {
            ov.put(
                keys::idempotency(&meta.mailbox, k),
                meta.id.as_bytes().to_vec(),
            );
        }
        // Remember the key on the message: its expiry after a delete
        // drops the key if it still points here.
        ov.put(keys::message_idempotency(&meta.id), k.as_bytes().to_vec());
    }
    Ok(match duplicate {
        Some((winner, loser)) => Put::NewDuplicate { winner, loser },
        None => Put::New,
    })
}

/// Removes a message deleted at `at_ms`, keeping a [`Gone`] record (and
/// its idempotency key) until the retention expires.
pub(crate) fn delete_message(
    base: &dyn KvRead,
    ov: &mut Overlay,
    id: &MessageId,
    at_ms: i64,
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
    ov.delete(keys::merge(id));
    ov.delete(keys::incomplete(id));
    ov.put(
        keys::gone(id),
        encode(&Gone {
            at_ms,
            meta: meta.clone(),
            settled: false,
        }),
    );
    ov.put(keys::expiry(at_ms, keys::EXPIRE_GONE, id), Vec::new());
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
