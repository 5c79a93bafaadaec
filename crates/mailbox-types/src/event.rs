//! Replication-complete events: rules, the events they raise, and the retry
//! policy that drives their delivery.
//!
//! An [`EventRule`] selects messages (mailbox, name globs, size range,
//! attributes) and names the queue its events go to. When a message is held
//! by every DC, its origin DC raises one [`Event`] per matching rule, with an
//! id derived from the message and the rule ([`EventId::for_message`]), so a
//! replay of the log, a leader change or a re-evaluation can never make a
//! second one. Everything here is data and pure functions: the transitions
//! live in the state machine (`mailbox-state`), delivery in the server.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::{Digest, MailboxPath, MessageId, MessageMeta, NameGlob, TypesError};

/// Stable identifier of an event: the same for every delivery, retry and
/// replay of it, so consumers can deduplicate on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventId(pub Uuid);

impl EventId {
    /// The id of rule `rule`'s event for message `msg`. The first 8 bytes
    /// are the message id's (its creation millisecond first), so events
    /// sort by message age; the rest are a SHA-256 of both, so two rules
    /// never share an id.
    pub fn for_message(msg: &MessageId, rule: &str) -> EventId {
        let mut h = Sha256::new();
        h.update(b"mailbox-event\0");
        h.update(msg.as_bytes());
        h.update(rule.as_bytes());
        let d = h.finalize();
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&msg.as_bytes()[..8]);
        b[8..].copy_from_slice(&d[..8]);
        // Version 8 (custom), RFC 4122 variant: it reads as a UUID.
        b[6] = (b[6] & 0x0f) | 0x80;
        b[8] = (b[8] & 0x3f) | 0x80;
        EventId(Uuid::from_bytes(b))
    }

    /// The 16 bytes, which sort like the id.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Rebuilds an id from [`EventId::as_bytes`].
    pub fn from_bytes(b: [u8; 16]) -> Self {
        EventId(Uuid::from_bytes(b))
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for EventId {
    type Err = TypesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(EventId)
            .map_err(|e| TypesError::invalid("event id", format!("{s:?}: {e}")))
    }
}

/// In what order a rule's events are delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventOrdering {
    /// Any order; consumers take whatever is due.
    #[default]
    None,
    /// A mailbox's next event is delivered only once the previous one
    /// (in the order they were raised) is complete, dead-lettered or
    /// discarded.
    PerMailbox,
}

impl EventOrdering {
    /// `none` or `per-mailbox`.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventOrdering::None => "none",
            EventOrdering::PerMailbox => "per-mailbox",
        }
    }
}

impl FromStr for EventOrdering {
    type Err = TypesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "none" => Ok(EventOrdering::None),
            "per-mailbox" => Ok(EventOrdering::PerMailbox),
            other => Err(TypesError::invalid(
                "ordering",
                format!("{other:?}: use none or per-mailbox"),
            )),
        }
    }
}

/// How an event is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Failed deliveries (`retry` answers and expired leases) before the
    /// event is dead-lettered.
    pub max_attempts: u32,
    /// Backoff cap after the first failure; it doubles with each failure.
    pub initial_backoff_ms: u64,
    /// Largest backoff cap.
    pub max_backoff_ms: u64,
    /// How long a consumer holds an event before it is offered again.
    pub lease_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            lease_ms: 30_000,
        }
    }
}

/// Most failed deliveries a policy may allow.
pub const MAX_ATTEMPTS_LIMIT: u32 = 100;
/// Longest lease a policy or a consumer may ask for (12 h).
pub const MAX_LEASE_MS: u64 = 12 * 3600 * 1000;

impl RetryPolicy {
    /// Checks the bounds; the message names the field.
    pub fn validate(&self) -> Result<(), TypesError> {
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(TypesError::invalid(
                "max attempts",
                format!(
                    "{} is not within 1..={MAX_ATTEMPTS_LIMIT}",
                    self.max_attempts
                ),
            ));
        }
        if self.initial_backoff_ms == 0 || self.initial_backoff_ms > self.max_backoff_ms {
            return Err(TypesError::invalid(
                "backoff",
                format!(
                    "initial {} ms must be above 0 and at most the maximum {} ms",
                    self.initial_backoff_ms, self.max_backoff_ms
                ),
            ));
        }
        if self.max_backoff_ms > 24 * 3600 * 1000 {
            return Err(TypesError::invalid("backoff", "the maximum is 24h at most"));
        }
        if !(1_000..=MAX_LEASE_MS).contains(&self.lease_ms) {
            return Err(TypesError::invalid(
                "lease",
                format!("{} ms is not within 1s..=12h", self.lease_ms),
            ));
        }
        Ok(())
    }

    /// The backoff cap after `failures` failures (≥ 1): the initial backoff
    /// doubled per failure after the first, at most the maximum.
    pub fn backoff_cap_ms(&self, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(62);
        self.initial_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms)
    }

    /// Full jitter: a wait drawn uniformly from `0..=cap` with `random`.
    pub fn backoff_ms(&self, failures: u32, random: u64) -> u64 {
        random % (self.backoff_cap_ms(failures) + 1)
    }
}

/// An HTTP sink a rule pushes its events to (Standard Webhooks format).
/// Its `Debug` hides the secrets, so no log line can show them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookSink {
    /// `http://` or `https://` URL the events are POSTed to.
    pub url: String,
    /// Per-request timeout.
    pub timeout_ms: u64,
    /// `whsec_` secrets; every one signs (two during a rotation).
    pub secrets: Vec<String>,
}

impl WebhookSink {
    /// Checks the URL, the secrets (never quoted in the error) and the
    /// timeout; `error` names the fields as the error webhook's.
    pub fn validate(&self, error: bool) -> Result<(), TypesError> {
        let (url_f, secret_f, timeout_f) = if error {
            (
                "error webhook url",
                "error webhook secret",
                "error webhook timeout",
            )
        } else {
            ("webhook url", "webhook secret", "webhook timeout")
        };
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(TypesError::invalid(
                url_f,
                format!("{:?} must start with http:// or https://", self.url),
            ));
        }
        if self.secrets.is_empty() || self.secrets.len() > 2 {
            return Err(TypesError::invalid(
                secret_f,
                "one secret, or two during a rotation",
            ));
        }
        for s in &self.secrets {
            let key = s.strip_prefix("whsec_").ok_or_else(|| {
                TypesError::invalid(secret_f, "must be whsec_ followed by base64")
            })?;
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(key) {
                Ok(k) if k.len() >= 16 => {}
                Ok(_) => {
                    return Err(TypesError::invalid(
                        secret_f,
                        "decodes to fewer than 16 bytes: too weak",
                    ))
                }
                Err(_) => {
                    return Err(TypesError::invalid(
                        secret_f,
                        "the part after whsec_ is not valid base64",
                    ))
                }
            }
        }
        if !(100..=300_000).contains(&self.timeout_ms) {
            return Err(TypesError::invalid(
                timeout_f,
                format!("{} ms must be within 100 ms..5 min", self.timeout_ms),
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSink")
            .field("url", &self.url)
            .field("timeout_ms", &self.timeout_ms)
            .field("secrets", &format_args!("<{} hidden>", self.secrets.len()))
            .finish()
    }
}

/// Longest rule or queue name.
pub const MAX_RULE_NAME: usize = 64;

/// Validates a rule or queue name: 1..=64 of `A-Z a-z 0-9 . _ -`.
pub fn validate_event_name(field: &'static str, s: &str) -> Result<(), TypesError> {
    if s.is_empty() || s.len() > MAX_RULE_NAME {
        return Err(TypesError::invalid(
            field,
            format!("{s:?} must be 1 to {MAX_RULE_NAME} characters"),
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(TypesError::invalid(
            field,
            format!("{s:?} contains {c:?} (use letters, digits, '.', '_' and '-')"),
        ));
    }
    Ok(())
}

/// A rule that raises an event for every matching message once it is held
/// by every DC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRule {
    /// Unique name.
    pub name: String,
    /// A disabled rule raises nothing (events it raised are delivered).
    pub enabled: bool,
    /// The mailbox whose messages it selects.
    pub mailbox: MailboxPath,
    /// Also the mailboxes below `mailbox`.
    pub subtree: bool,
    /// Name globs, one of which must match (none: every name).
    pub include: Vec<String>,
    /// Name globs none of which may match.
    pub exclude: Vec<String>,
    /// Smallest size selected, bytes.
    pub min_size: Option<u64>,
    /// Largest size selected, bytes.
    pub max_size: Option<u64>,
    /// Attributes the message must have, with these values.
    pub attributes: BTreeMap<String, String>,
    /// The queue its events go to.
    pub queue: String,
    /// How its events are retried.
    pub retry: RetryPolicy,
    /// In what order its events are delivered.
    pub ordering: EventOrdering,
    /// Push delivery, instead of consumers pulling from the queue.
    pub webhook: Option<WebhookSink>,
    /// Where dead-letter notifications go (POSTed like events).
    pub error_webhook: Option<WebhookSink>,
    /// Dead-letters of this rule with the same error within this long of
    /// the first are bundled into one notification with a count.
    pub error_window_ms: u64,
}

/// Default bundling window of dead-letter notifications.
pub const DEFAULT_ERROR_WINDOW_MS: u64 = 60_000;
/// Longest bundling window of dead-letter notifications.
pub const MAX_ERROR_WINDOW_MS: u64 = 3_600_000;

impl EventRule {
    /// A rule with defaults: enabled, no filters, the default retry policy.
    pub fn new(name: &str, mailbox: MailboxPath, queue: &str) -> Self {
        EventRule {
            name: name.to_string(),
            enabled: true,
            mailbox,
            subtree: false,
            include: Vec::new(),
            exclude: Vec::new(),
            min_size: None,
            max_size: None,
            attributes: BTreeMap::new(),
            queue: queue.to_string(),
            retry: RetryPolicy::default(),
            ordering: EventOrdering::None,
            webhook: None,
            error_webhook: None,
            error_window_ms: DEFAULT_ERROR_WINDOW_MS,
        }
    }

    /// Checks every field; the error names the field and the bad value.
    pub fn validate(&self) -> Result<(), TypesError> {
        validate_event_name("rule name", &self.name)?;
        validate_event_name("queue name", &self.queue)?;
        for g in self.include.iter().chain(&self.exclude) {
            NameGlob::parse(g)?;
        }
        if let (Some(lo), Some(hi)) = (self.min_size, self.max_size) {
            if lo > hi {
                return Err(TypesError::invalid(
                    "size range",
                    format!("minimum {lo} is above maximum {hi}"),
                ));
            }
        }
        if self.attributes.len() > 64 {
            return Err(TypesError::invalid(
                "attribute match",
                "64 attributes at most",
            ));
        }
        self.retry.validate()?;
        if let Some(w) = &self.webhook {
            w.validate(false)?;
            if w.timeout_ms.saturating_add(1_000) > self.retry.lease_ms {
                return Err(TypesError::invalid(
                    "webhook timeout",
                    format!(
                        "{} ms must be at least 1 s shorter than the lease ({} ms)",
                        w.timeout_ms, self.retry.lease_ms
                    ),
                ));
            }
        }
        if let Some(w) = &self.error_webhook {
            w.validate(true)?;
        }
        if self.error_window_ms > MAX_ERROR_WINDOW_MS {
            return Err(TypesError::invalid(
                "error window",
                format!("{} ms is longer than 1 h", self.error_window_ms),
            ));
        }
        Ok(())
    }

    /// Whether this rule selects `meta` (enabled or not).
    pub fn matches(&self, meta: &MessageMeta) -> bool {
        let in_mailbox = meta.mailbox == self.mailbox
            || (self.subtree
                && meta
                    .mailbox
                    .as_str()
                    .strip_prefix(self.mailbox.as_str())
                    .is_some_and(|rest| rest.starts_with('/')));
        if !in_mailbox {
            return false;
        }
        let glob = |g: &String| NameGlob::parse(g).is_ok_and(|g| g.matches(&meta.name));
        if !self.include.is_empty() && !self.include.iter().any(glob) {
            return false;
        }
        if self.exclude.iter().any(glob) {
            return false;
        }
        if self.min_size.is_some_and(|lo| meta.size < lo)
            || self.max_size.is_some_and(|hi| meta.size > hi)
        {
            return false;
        }
        self.attributes
            .iter()
            .all(|(k, v)| meta.attributes.get(k) == Some(v))
    }
}

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventStatus {
    /// The message is not yet held by every DC (shown for matching rules;
    /// no event exists yet).
    PendingReplication,
    /// Waiting to be delivered (now or after a backoff).
    Pending,
    /// Leased to a consumer.
    Processing,
    /// A consumer completed it.
    Complete,
    /// Dead-lettered: out of attempts, or failed permanently.
    Failed,
    /// Removed from the dead-letter queue by an admin (kept, with the reason).
    Discarded,
}

impl EventStatus {
    /// The name used by the CLI and the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventStatus::PendingReplication => "pending_replication",
            EventStatus::Pending => "pending",
            EventStatus::Processing => "processing",
            EventStatus::Complete => "complete",
            EventStatus::Failed => "failed",
            EventStatus::Discarded => "discarded",
        }
    }

    /// Whether nothing more happens to it unless an admin replays it.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            EventStatus::Complete | EventStatus::Failed | EventStatus::Discarded
        )
    }
}

impl FromStr for EventStatus {
    type Err = TypesError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending_replication" => EventStatus::PendingReplication,
            "pending" => EventStatus::Pending,
            "processing" => EventStatus::Processing,
            "complete" => EventStatus::Complete,
            "failed" | "dlq" => EventStatus::Failed,
            "discarded" => EventStatus::Discarded,
            other => {
                return Err(TypesError::invalid(
                    "event status",
                    format!("{other:?}: use pending_replication, pending, processing, complete, failed or discarded"),
                ))
            }
        })
    }
}

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    /// The consumer completed the event.
    Complete,
    /// The consumer asked for a retry (a transient failure).
    Retry,
    /// The consumer failed it permanently.
    Fail,
    /// The lease ran out without an answer.
    Expired,
    /// Handed back unprocessed because the sink was unreachable (a
    /// webhook receiver that is down): no failure is counted.
    Deferred,
}

impl AttemptOutcome {
    /// The name used by the CLI and the API.
    pub fn as_str(&self) -> &'static str {
        match self {
            AttemptOutcome::Complete => "complete",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::Fail => "fail",
            AttemptOutcome::Expired => "expired",
            AttemptOutcome::Deferred => "deferred",
        }
    }
}

/// One delivery of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Delivery number, from 1; what the consumer was told.
    pub number: u32,
    /// When it was leased.
    pub leased_ms: i64,
    /// Who leased it.
    pub consumer: String,
    /// How it ended (`None` while leased).
    pub outcome: Option<AttemptOutcome>,
    /// When it ended.
    pub ended_ms: i64,
    /// The consumer's reason, or why the lease ended.
    pub error: String,
}

/// What an event says about its message: enough to process it and to
/// understand a dead letter without looking anything up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMessage {
    /// The message.
    pub id: MessageId,
    /// Its mailbox.
    pub mailbox: MailboxPath,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// SHA-256 of its payload.
    pub sha256: Digest,
    /// When it was created.
    pub created_ms: i64,
    /// The DC that accepted it.
    pub origin_dc: String,
    /// Its attributes when the event was raised.
    pub attributes: BTreeMap<String, String>,
}

impl From<&MessageMeta> for EventMessage {
    fn from(m: &MessageMeta) -> Self {
        EventMessage {
            id: m.id,
            mailbox: m.mailbox.clone(),
            name: m.name.clone(),
            size: m.size,
            sha256: m.sha256,
            created_ms: m.created_ms,
            origin_dc: m.origin_dc.clone(),
            attributes: m.attributes.clone(),
        }
    }
}

/// The lease of an event to a consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The consumer.
    pub consumer: String,
    /// When it runs out.
    pub until_ms: i64,
}

/// Attempts an event keeps in its history at most (the oldest go first).
pub const MAX_ATTEMPT_HISTORY: usize = 200;

/// One rule's event for one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Stable id ([`EventId::for_message`]).
    pub id: EventId,
    /// The rule that raised it.
    pub rule: String,
    /// The queue it is delivered from.
    pub queue: String,
    /// The message.
    pub message: EventMessage,
    /// When every DC held the message (the latest of their times).
    pub complete_ms: i64,
    /// When it was raised (the proposer's clock).
    pub raised_ms: i64,
    /// DCs the message completed without (suspended from completion).
    pub without: Vec<String>,
    /// Where it is.
    pub status: EventStatus,
    /// Pending behind an earlier event of its mailbox (per-mailbox
    /// ordering): not deliverable until that one is finished.
    pub blocked: bool,
    /// Deliveries so far; the next delivery is number `deliveries + 1`.
    pub deliveries: u32,
    /// Real failures so far (`retry` answers, expired leases).
    pub failures: u32,
    /// `failures` when it was last replayed: the retry budget counts from
    /// there, while the delivery numbers go on.
    pub failures_at_replay: u32,
    /// When it may be delivered (pending) or when its lease runs out
    /// (processing).
    pub due_ms: i64,
    /// The current lease, while processing.
    pub lease: Option<Lease>,
    /// Deliveries, oldest first (the last [`MAX_ATTEMPT_HISTORY`]).
    pub attempts: Vec<Attempt>,
    /// The rule's retry policy when it was raised.
    pub retry: RetryPolicy,
    /// The rule's ordering when it was raised.
    pub ordering: EventOrdering,
    /// Position in its queue (raise order, from 1).
    pub seq: u64,
    /// Why an admin discarded it, or forced a replay.
    pub note: String,
    /// Last change (the proposer's clock).
    pub updated_ms: i64,
    /// Who made the last change, and when: the DC handling the event
    /// stamps each change, and every DC keeps the newest (last writer
    /// wins), so all converge on one state whatever order changes arrive.
    pub stamp: crate::Stamp,
    /// Times an admin replayed it: a replay starts a new generation of
    /// its state, which wins over anything of the ones before.
    pub replays: u32,
}

impl Event {
    /// The delivery number of the current (or last) lease.
    pub fn attempt(&self) -> u32 {
        self.deliveries
    }

    /// The event's lane: the DC that raised it (its message's origin).
    /// Unless its queue was taken over, that DC delivers it.
    pub fn lane(&self) -> &str {
        &self.message.origin_dc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Payload;

    fn meta(mailbox: &str, name: &str, size: u64) -> MessageMeta {
        MessageMeta {
            id: MessageId::new(),
            mailbox: MailboxPath::parse(mailbox).unwrap(),
            name: name.into(),
            size,
            sha256: Digest::of(b""),
            created_ms: 1,
            origin_dc: "east".into(),
            attributes: BTreeMap::from([("type".to_string(), "edi".to_string())]),
            payload: Payload::Inline,
        }
    }

    #[test]
    fn event_ids_are_stable_distinct_and_sort_with_their_message() {
        let a = MessageId::new();
        // A message created a millisecond later.
        let mut later = *a.as_bytes();
        later[5] = later[5].wrapping_add(1);
        if later[5] == 0 {
            later[4] = later[4].wrapping_add(1);
        }
        let b = MessageId::from_bytes(later);
        assert_eq!(
            EventId::for_message(&a, "r1"),
            EventId::for_message(&a, "r1")
        );
        assert_ne!(
            EventId::for_message(&a, "r1"),
            EventId::for_message(&a, "r2")
        );
        assert!(EventId::for_message(&a, "zz") < EventId::for_message(&b, "aa"));
        let id = EventId::for_message(&a, "r1");
        assert_eq!(id, id.to_string().parse().unwrap());
        assert_eq!(id.0.get_version_num(), 8);
    }

    #[test]
    fn rules_select_what_they_say() {
        let mut r = EventRule::new("r", MailboxPath::parse("/in").unwrap(), "q");
        assert!(r.matches(&meta("/in", "a.csv", 10)));
        assert!(!r.matches(&meta("/in/sub", "a.csv", 10)), "exact mailbox");
        assert!(!r.matches(&meta("/inbox", "a.csv", 10)));
        r.subtree = true;
        assert!(r.matches(&meta("/in/sub/deep", "a.csv", 10)));
        assert!(
            !r.matches(&meta("/inbox", "a.csv", 10)),
            "a prefix is not a parent"
        );
        r.include = vec!["*.csv".into(), "*.edi".into()];
        r.exclude = vec!["tmp*".into()];
        assert!(r.matches(&meta("/in", "x.edi", 10)));
        assert!(!r.matches(&meta("/in", "x.txt", 10)));
        assert!(!r.matches(&meta("/in", "tmp.csv", 10)));
        r.min_size = Some(5);
        r.max_size = Some(10);
        assert!(!r.matches(&meta("/in", "x.csv", 4)));
        assert!(r.matches(&meta("/in", "x.csv", 5)));
        assert!(!r.matches(&meta("/in", "x.csv", 11)));
        r.attributes.insert("type".into(), "edi".into());
        assert!(r.matches(&meta("/in", "x.csv", 10)));
        r.attributes.insert("type".into(), "xml".into());
        assert!(!r.matches(&meta("/in", "x.csv", 10)));
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        let ok = EventRule::new("r", MailboxPath::parse("/in").unwrap(), "q");
        assert!(ok.validate().is_ok());
        type Change = Box<dyn Fn(&mut EventRule)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|r| r.name = "a b".into()), "rule name"),
            (Box::new(|r| r.queue = String::new()), "queue name"),
            (Box::new(|r| r.include = vec!["[x".into()]), "never closed"),
            (Box::new(|r| r.exclude = vec!["a/b".into()]), "name pattern"),
            (
                Box::new(|r| {
                    r.min_size = Some(9);
                    r.max_size = Some(1)
                }),
                "size range",
            ),
            (Box::new(|r| r.retry.max_attempts = 0), "max attempts"),
            (Box::new(|r| r.retry.initial_backoff_ms = 0), "backoff"),
            (Box::new(|r| r.retry.lease_ms = 10), "lease"),
            (
                Box::new(|r| {
                    r.webhook = Some(WebhookSink {
                        url: "ftp://x".into(),
                        timeout_ms: 1000,
                        secrets: vec!["whsec_x".into()],
                    })
                }),
                "webhook url",
            ),
            (
                Box::new(|r| {
                    r.webhook = Some(WebhookSink {
                        url: "http://x".into(),
                        timeout_ms: 1000,
                        secrets: vec!["whsec_not base64!".into()],
                    })
                }),
                "not valid base64",
            ),
            (
                Box::new(|r| {
                    r.webhook = Some(WebhookSink {
                        url: "http://x".into(),
                        timeout_ms: 60_000,
                        secrets: vec!["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".into()],
                    })
                }),
                "shorter than the lease",
            ),
        ];
        for (change, want) in cases {
            let mut r = ok.clone();
            change(&mut r);
            let e = r.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut r = EventRule::new("r", MailboxPath::parse("/in").unwrap(), "q");
        r.webhook = Some(WebhookSink {
            url: "https://example.com/hook".into(),
            timeout_ms: 1000,
            secrets: vec!["whsec_c2VjcmV0LXZhbHVl".into()],
        });
        let shown = format!("{r:?}");
        assert!(shown.contains("https://example.com/hook"));
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
            lease_ms: 1_000,
        };
        assert_eq!(p.backoff_cap_ms(1), 100);
        assert_eq!(p.backoff_cap_ms(2), 200);
        assert_eq!(p.backoff_cap_ms(4), 800);
        assert_eq!(p.backoff_cap_ms(5), 1_000);
        assert_eq!(p.backoff_cap_ms(90), 1_000);
        for r in [0u64, 1, 99, 100, 12345, u64::MAX] {
            assert!(p.backoff_ms(1, r) <= 100);
        }
        assert_eq!(p.backoff_ms(1, 100), 100);
    }
}
