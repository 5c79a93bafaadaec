//! Between the API's messages and the domain types. Webhook secrets go in
//! only: a rule read back says how many it has, never what they are.

use mailbox_proto::v1 as pb;
use mailbox_types::{
    Event, EventOrdering, EventRule, MailboxPath, RetryPolicy, Stamp, WebhookSink,
};

use crate::EventsError;

/// A rule from the API, with defaults for what it leaves out, validated.
pub fn rule_from(r: pb::RuleInfo) -> Result<EventRule, EventsError> {
    let d = RetryPolicy::default();
    let or = |v: u64, dflt: u64| if v == 0 { dflt } else { v };
    let lease_ms = or(r.lease_ms, d.lease_ms);
    let rule = EventRule {
        name: r.name,
        enabled: r.enabled,
        mailbox: MailboxPath::parse(&r.mailbox)?,
        subtree: r.subtree,
        include: r.include,
        exclude: r.exclude,
        min_size: r.min_size,
        max_size: r.max_size,
        attributes: r.attributes.into_iter().collect(),
        queue: r.queue,
        retry: RetryPolicy {
            max_attempts: if r.max_attempts == 0 {
                d.max_attempts
            } else {
                r.max_attempts
            },
            initial_backoff_ms: or(r.initial_backoff_ms, d.initial_backoff_ms),
            max_backoff_ms: or(r.max_backoff_ms, d.max_backoff_ms.max(r.initial_backoff_ms)),
            lease_ms,
        },
        ordering: r.ordering.parse::<EventOrdering>()?,
        webhook: (!r.webhook_url.is_empty()).then(|| WebhookSink {
            url: r.webhook_url,
            // Default: 10 s, within the lease.
            timeout_ms: or(
                r.webhook_timeout_ms,
                10_000.min(lease_ms.saturating_sub(1_000)).max(100),
            ),
            secrets: r.webhook_secrets,
        }),
        error_webhook: (!r.error_webhook_url.is_empty()).then(|| WebhookSink {
            url: r.error_webhook_url,
            timeout_ms: or(r.error_webhook_timeout_ms, 10_000),
            secrets: r.error_webhook_secrets,
        }),
        error_window_ms: or(
            r.error_window_ms,
            mailbox_types::event::DEFAULT_ERROR_WINDOW_MS,
        ),
    };
    rule.validate()?;
    Ok(rule)
}

/// A rule for the API (secrets left out).
pub fn rule_info(r: &EventRule, stamp: Option<&Stamp>) -> pb::RuleInfo {
    pb::RuleInfo {
        name: r.name.clone(),
        enabled: r.enabled,
        mailbox: r.mailbox.to_string(),
        subtree: r.subtree,
        include: r.include.clone(),
        exclude: r.exclude.clone(),
        min_size: r.min_size,
        max_size: r.max_size,
        attributes: r.attributes.clone().into_iter().collect(),
        queue: r.queue.clone(),
        max_attempts: r.retry.max_attempts,
        initial_backoff_ms: r.retry.initial_backoff_ms,
        max_backoff_ms: r.retry.max_backoff_ms,
        lease_ms: r.retry.lease_ms,
        ordering: r.ordering.as_str().to_string(),
        webhook_url: r
            .webhook
            .as_ref()
            .map(|w| w.url.clone())
            .unwrap_or_default(),
        webhook_timeout_ms: r.webhook.as_ref().map_or(0, |w| w.timeout_ms),
        webhook_secrets: Vec::new(),
        webhook_secret_count: r.webhook.as_ref().map_or(0, |w| w.secrets.len() as u32),
        error_webhook_url: r
            .error_webhook
            .as_ref()
            .map(|w| w.url.clone())
            .unwrap_or_default(),
        error_webhook_timeout_ms: r.error_webhook.as_ref().map_or(0, |w| w.timeout_ms),
        error_webhook_secrets: Vec::new(),
        error_webhook_secret_count: r
            .error_webhook
            .as_ref()
            .map_or(0, |w| w.secrets.len() as u32),
        error_window_ms: r.error_window_ms,
        updated_dc: stamp.map(|s| s.dc.clone()).unwrap_or_default(),
        updated_ms: stamp.map_or(0, |s| s.hlc.wall_ms),
    }
}

/// An event for the API.
pub fn event_info(e: &Event) -> pb::EventInfo {
    let m = &e.message;
    pb::EventInfo {
        id: e.id.to_string(),
        rule: e.rule.clone(),
        queue: e.queue.clone(),
        status: e.status.as_str().to_string(),
        attempt: e.deliveries,
        failures: e.failures,
        max_attempts: e.retry.max_attempts,
        message: Some(pb::EventMessage {
            id: m.id.to_string(),
            mailbox: m.mailbox.to_string(),
            name: m.name.clone(),
            size: m.size,
            sha256: m.sha256.to_hex(),
            created_ms: m.created_ms,
            origin_dc: m.origin_dc.clone(),
            attributes: m.attributes.clone().into_iter().collect(),
        }),
        complete_ms: e.complete_ms,
        raised_ms: e.raised_ms,
        due_ms: e.due_ms,
        lease_consumer: e
            .lease
            .as_ref()
            .map(|l| l.consumer.clone())
            .unwrap_or_default(),
        blocked: e.blocked,
        attempts: e
            .attempts
            .iter()
            .map(|a| pb::AttemptInfo {
                number: a.number,
                leased_ms: a.leased_ms,
                consumer: a.consumer.clone(),
                outcome: a
                    .outcome
                    .map(|o| o.as_str().to_string())
                    .unwrap_or_default(),
                ended_ms: a.ended_ms,
                error: a.error.clone(),
            })
            .collect(),
        note: e.note.clone(),
        seq: e.seq,
        ordering: e.ordering.as_str().to_string(),
        without: e.without.clone(),
    }
}
