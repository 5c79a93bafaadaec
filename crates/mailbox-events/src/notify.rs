//! Dead-letter notifications: a rule's error webhook is told when its
//! events are dead-lettered, bursts bundled.
//!
//! - The state machine writes a notice (`N` outbox) in the same write that
//!   dead-letters an event in the DC handling it, when the rule has an
//!   error webhook; the notices are in the log, so a crash or a leader
//!   change loses none, and only one DC notifies per dead-letter.
//! - The DC leader reads the outbox about once a second and groups the
//!   notices by rule and error text. A group goes out once its first
//!   notice is the rule's `error-window` old: one POST with the count, the
//!   first and last time, and up to [`MAX_LISTED`] event ids and messages,
//!   signed like events (Standard Webhooks; `webhook-id` is derived from
//!   the bundled event ids, so a retried notification keeps its id). A 2xx
//!   clears the group's notices (a proposal); anything else is retried with
//!   a backoff per rule, up to 5 minutes apart, and logged.
//! - Notices of a rule deleted since, or whose error webhook was removed,
//!   are cleared with a log line.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use mailbox_raft::RaftNode;
use mailbox_state::events as ev;
use mailbox_state::{Command, CommandResult};
use mailbox_types::{now_ms, Event, EventId, EventRule};

use crate::webhook::{http_client, post_body, Http};

/// Event ids and messages listed in one notification at most (the count
/// covers every one).
pub const MAX_LISTED: usize = 100;
/// Notices read per pass at most.
const MAX_NOTICES: usize = 10_000;
/// Longest wait before retrying a failed notification.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One notification: the dead-letters of one rule with one error.
struct Bundle {
    rule: EventRule,
    error: String,
    notices: Vec<(i64, EventId)>,
    events: Vec<Event>,
}

/// The last attempt's error, or why the event ended.
fn error_of(e: &Event) -> String {
    e.attempts
        .last()
        .map(|a| a.error.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "dead-lettered".into())
}

/// The JSON a bundle is POSTed as.
pub fn bundle_body(
    dc: &str,
    rule: &EventRule,
    error: &str,
    events: &[Event],
    first_ms: i64,
    last_ms: i64,
) -> Vec<u8> {
    serde_json::json!({
        "type": "events.dead_lettered",
        "dc": dc,
        "rule": rule.name,
        "queue": rule.queue,
        "error": error,
        "count": events.len(),
        "first_ms": first_ms,
        "last_ms": last_ms,
        "event_ids": events.iter().take(MAX_LISTED).map(|e| e.id.to_string()).collect::<Vec<_>>(),
        "messages": events.iter().take(MAX_LISTED).map(|e| serde_json::json!({
            "id": e.message.id.to_string(),
            "mailbox": e.message.mailbox.to_string(),
            "name": e.message.name,
            "attempts": e.deliveries,
        })).collect::<Vec<_>>(),
    })
    .to_string()
    .into_bytes()
}

/// A stable id for a bundle: the same dead-letters, the same id.
fn bundle_id(notices: &[(i64, EventId)]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (_, id) in notices {
        ctx.update(id.as_bytes());
    }
    format!("dlq_{}", hex::encode(&ctx.finish().as_ref()[..16]))
}

/// Runs the dead-letter notifications of this node while it leads its DC;
/// ends when `shutdown` flips to true.
pub async fn run(raft: RaftNode, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let http = http_client();
    // Per rule: no attempt before this, and the wait after the next failure.
    let mut backoff: HashMap<String, (tokio::time::Instant, Duration)> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if !raft.is_leader() {
            backoff.clear();
            continue;
        }
        if let Err(e) = pass(&raft, &http, &mut backoff).await {
            tracing::warn!("dead-letter notifications: {e}");
        }
    }
}

/// One look at the outbox: sends what is due, clears what was sent.
async fn pass(
    raft: &RaftNode,
    http: &Http,
    backoff: &mut HashMap<String, (tokio::time::Instant, Duration)>,
) -> Result<(), String> {
    let notices = ev::notices(raft.view(), MAX_NOTICES).map_err(|e| e.to_string())?;
    if notices.is_empty() {
        return Ok(());
    }
    let mut bundles: BTreeMap<(String, String), Bundle> = BTreeMap::new();
    let mut stale = Vec::new();
    for (ms, id) in notices {
        let event = ev::get_event(raft.view(), &id).map_err(|e| e.to_string())?;
        // Gone (purged), or replayed since: nothing to tell.
        let Some(event) = event.filter(|e| e.status == mailbox_types::EventStatus::Failed) else {
            stale.push((ms, id));
            continue;
        };
        let rule = ev::get_rule(raft.view(), &event.rule).map_err(|e| e.to_string())?;
        let Some(rule) = rule.filter(|r| r.error_webhook.is_some()) else {
            tracing::info!(event = %id, rule = %event.rule, "dead-letter notice dropped: the rule has no error webhook any more");
            stale.push((ms, id));
            continue;
        };
        let error = error_of(&event);
        let b = bundles
            .entry((rule.name.clone(), error.clone()))
            .or_insert_with(|| Bundle {
                rule,
                error,
                notices: Vec::new(),
                events: Vec::new(),
            });
        b.notices.push((ms, id));
        b.events.push(event);
    }
    if !stale.is_empty() {
        clear(raft, stale).await?;
    }
    let now = now_ms();
    for b in bundles.into_values() {
        let first = b.notices.iter().map(|n| n.0).min().unwrap_or(now);
        let last = b.notices.iter().map(|n| n.0).max().unwrap_or(now);
        if first.saturating_add(b.rule.error_window_ms as i64) > now {
            continue; // The burst may grow still.
        }
        if backoff
            .get(&b.rule.name)
            .is_some_and(|(at, _)| tokio::time::Instant::now() < *at)
        {
            continue;
        }
        let Some(sink) = &b.rule.error_webhook else {
            continue;
        };
        let body = bundle_body(raft.dc(), &b.rule, &b.error, &b.events, first, last);
        let id = bundle_id(&b.notices);
        match post_body(http, sink, &id, body).await {
            Ok((s, _, _)) if (200..300).contains(&s) => {
                tracing::info!(rule = %b.rule.name, count = b.notices.len(), "dead-letter notification sent");
                backoff.remove(&b.rule.name);
                clear(raft, b.notices).await?;
            }
            other => {
                let why = match other {
                    Ok((s, _, text)) => format!("HTTP {s}: {text}"),
                    Err(e) => e,
                };
                let wait = backoff
                    .get(&b.rule.name)
                    .map_or(Duration::from_secs(1), |(_, w)| (*w * 2).min(MAX_BACKOFF));
                backoff.insert(
                    b.rule.name.clone(),
                    (tokio::time::Instant::now() + wait, wait),
                );
                tracing::warn!(rule = %b.rule.name, count = b.notices.len(), retry_in = ?wait, "dead-letter notification failed: {why}");
            }
        }
    }
    Ok(())
}

async fn clear(raft: &RaftNode, notices: Vec<(i64, EventId)>) -> Result<(), String> {
    for chunk in notices.chunks(1000) {
        match raft
            .propose(Command::ClearNotices {
                notices: chunk.to_vec(),
            })
            .await
        {
            Ok(Ok(CommandResult::None)) => {}
            Ok(Ok(other)) => return Err(format!("clearing notices: unexpected {other:?}")),
            Ok(Err(e)) => return Err(format!("clearing notices: {e}")),
            Err(e) => return Err(format!("clearing notices: {e}")),
        }
    }
    Ok(())
}
