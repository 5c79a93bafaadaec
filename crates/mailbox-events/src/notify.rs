//! Dead-letter notifications: a rule's error webhook is told when its
//! events are dead-lettered, bursts bundled.
//!
//! - The state machine writes a notice (`N` outbox) in the same write that
//!   dead-letters an event in the DC handling it, when the rule has an
//!   error webhook; the notices are in the log, so a crash or a leader
//!   change loses none, and only one DC notifies per dead-letter.
//! - The DC leader reads the outbox about once a second, a page per rule
//!   (the outbox is keyed by rule, so a rule whose webhook is down for
//!   long holds back only its own notices), and groups each rule's notices
//!   by error text into windows: a bundle is the notices of one error from
//!   its first one to `error-window` later. Once that window has passed,
//!   the bundle is *sealed* (`SealNotices`, a proposal): its notices leave
//!   the outbox and the exact body is kept under its `webhook-id` (derived
//!   from the rule, the error and the first notice). Only then is it sent:
//!   one POST with the count, the first and last time, and up to
//!   [`MAX_LISTED`] event ids and messages, signed like events (Standard
//!   Webhooks). A retry, by this leader or the next, sends the same id
//!   with the same body; a notice that arrives late (a lease settled after
//!   the window) goes into a later notification. A 2xx forgets the sealed
//!   notification (`ClearSealed`); anything else is retried with a backoff
//!   per rule, up to 5 minutes apart, and logged.
//! - Notices of a rule deleted since, or whose error webhook was removed,
//!   and of events no longer dead-lettered (replayed, purged) are cleared;
//!   of an event dead-lettered again after a replay, only the last counts.
//! - Memory: a page of notice keys per rule, and per bundle the listed
//!   ids and messages only.

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

/// One notification: the dead-letters of one rule with one error within
/// one window.
struct Bundle {
    error: String,
    /// The first notice: the window starts at its time.
    first: (i64, EventId),
    last_ms: i64,
    notices: Vec<(i64, EventId)>,
    /// The first [`MAX_LISTED`] events.
    listed: Vec<serde_json::Value>,
}

/// The last attempt's error, or why the event ended.
fn error_of(e: &Event) -> String {
    e.attempts
        .last()
        .map(|a| a.error.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "dead-lettered".into())
}

/// How a bundle lists one of its events.
fn listed(e: &Event) -> serde_json::Value {
    serde_json::json!({
        "event_id": e.id.to_string(),
        "id": e.message.id.to_string(),
        "mailbox": e.message.mailbox.to_string(),
        "name": e.message.name,
        "attempts": e.deliveries,
    })
}

/// The JSON a bundle is POSTed as.
fn bundle_body(dc: &str, rule: &EventRule, b: &Bundle) -> Vec<u8> {
    serde_json::json!({
        "type": "events.dead_lettered",
        "dc": dc,
        "rule": rule.name,
        "queue": rule.queue,
        "error": b.error,
        "count": b.notices.len(),
        "first_ms": b.first.0,
        "last_ms": b.last_ms,
        "event_ids": b.listed.iter().map(|l| l["event_id"].clone()).collect::<Vec<_>>(),
        "messages": b.listed,
    })
    .to_string()
    .into_bytes()
}

/// A stable id for a bundle: its rule, error and first notice (which fix
/// its window, and so everything in it).
fn bundle_id(rule: &str, b: &Bundle) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [rule.as_bytes(), b.error.as_bytes()] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    ctx.update(&b.first.0.to_be_bytes());
    ctx.update(b.first.1.as_bytes());
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
        let rules = match ev::notice_rules(raft.view()) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("dead-letter notifications: {e}");
                continue;
            }
        };
        for rule in rules {
            if backoff
                .get(&rule)
                .is_some_and(|(at, _)| tokio::time::Instant::now() < *at)
            {
                continue;
            }
            if let Err(e) = pass(&raft, &http, &rule, &mut backoff).await {
                tracing::warn!(rule = %rule, "dead-letter notifications: {e}");
            }
        }
    }
}

/// One look at `rule`'s outbox: sends what is sealed, seals and sends the
/// bundles whose window has passed, clears what was sent and what is
/// stale.
async fn pass(
    raft: &RaftNode,
    http: &Http,
    rule_name: &str,
    backoff: &mut HashMap<String, (tokio::time::Instant, Duration)>,
) -> Result<(), String> {
    let rule = ev::get_rule(raft.view(), rule_name).map_err(|e| e.to_string())?;
    let sink = rule.as_ref().and_then(|r| r.error_webhook.clone());
    let sealed = ev::sealed_notifications(raft.view(), rule_name, 64).map_err(|e| e.to_string())?;
    let notices = ev::notices(raft.view(), rule_name, MAX_NOTICES).map_err(|e| e.to_string())?;
    let (Some(rule), Some(sink)) = (rule, sink) else {
        tracing::info!(rule = %rule_name, count = notices.len() + sealed.len(), "dead-letter notices dropped: the rule has no error webhook any more");
        for (id, _) in sealed {
            clear_sealed(raft, rule_name, &id).await?;
        }
        return clear(raft, rule_name, notices).await;
    };
    // What was sealed before (by this leader or an earlier one) first.
    for (id, n) in sealed {
        if !send(raft, http, &sink, rule_name, &id, n.body, n.count, backoff).await? {
            return Ok(());
        }
    }
    let window = rule.error_window_ms as i64;
    // An event dead-lettered, replayed and dead-lettered again has two
    // notices: only the last counts.
    let mut latest: HashMap<EventId, i64> = HashMap::new();
    for (ms, id) in &notices {
        let l = latest.entry(*id).or_insert(*ms);
        *l = (*l).max(*ms);
    }
    // Per error, the first window's bundle (later windows wait for a
    // later pass, once this one is sealed).
    let mut bundles: BTreeMap<String, Bundle> = BTreeMap::new();
    let mut stale = Vec::new();
    for (ms, id) in notices {
        if latest.get(&id).is_some_and(|l| *l != ms) {
            stale.push((ms, id));
            continue;
        }
        let event = ev::get_event(raft.view(), &id).map_err(|e| e.to_string())?;
        // Gone (purged), or replayed since: nothing to tell.
        let Some(event) = event.filter(|e| e.status == mailbox_types::EventStatus::Failed) else {
            stale.push((ms, id));
            continue;
        };
        let error = error_of(&event);
        let b = bundles.entry(error.clone()).or_insert_with(|| Bundle {
            error,
            first: (ms, id),
            last_ms: ms,
            notices: Vec::new(),
            listed: Vec::new(),
        });
        if ms >= b.first.0.saturating_add(window) {
            continue;
        }
        b.last_ms = b.last_ms.max(ms);
        b.notices.push((ms, id));
        if b.listed.len() < MAX_LISTED {
            b.listed.push(listed(&event));
        }
    }
    if !stale.is_empty() {
        clear(raft, rule_name, stale).await?;
    }
    let now = now_ms();
    for b in bundles.into_values() {
        if b.first.0.saturating_add(window) > now {
            continue; // The burst may grow still.
        }
        let body = bundle_body(raft.dc(), &rule, &b);
        let id = bundle_id(rule_name, &b);
        let count = b.notices.len() as u64;
        match raft
            .propose(Command::SealNotices {
                rule: rule_name.to_string(),
                id: id.clone(),
                body: body.clone(),
                notices: b.notices,
            })
            .await
        {
            Ok(Ok(CommandResult::Expired { count: 1, .. })) => {}
            // Sealed by another proposal meanwhile: sent from there.
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => return Err(format!("sealing a notification: {e}")),
            Err(e) => return Err(format!("sealing a notification: {e}")),
        }
        if !send(raft, http, &sink, rule_name, &id, body, count, backoff).await? {
            return Ok(());
        }
    }
    Ok(())
}

/// POSTs a sealed notification; forgets it on a 2xx. `false`: it failed
/// (backed off; the rule's other notifications wait too).
#[allow(clippy::too_many_arguments)]
async fn send(
    raft: &RaftNode,
    http: &Http,
    sink: &mailbox_types::WebhookSink,
    rule: &str,
    id: &str,
    body: Vec<u8>,
    count: u64,
    backoff: &mut HashMap<String, (tokio::time::Instant, Duration)>,
) -> Result<bool, String> {
    match post_body(http, sink, id, body).await {
        Ok((s, _, _)) if (200..300).contains(&s) => {
            tracing::info!(rule = %rule, count, id = %id, "dead-letter notification sent");
            backoff.remove(rule);
            clear_sealed(raft, rule, id).await?;
            Ok(true)
        }
        other => {
            let why = match other {
                Ok((s, _, text)) => format!("HTTP {s}: {text}"),
                Err(e) => e,
            };
            let wait = backoff
                .get(rule)
                .map_or(Duration::from_secs(1), |(_, w)| (*w * 2).min(MAX_BACKOFF));
            backoff.insert(rule.to_string(), (tokio::time::Instant::now() + wait, wait));
            tracing::warn!(rule = %rule, count, id = %id, retry_in = ?wait, "dead-letter notification failed: {why}");
            Ok(false)
        }
    }
}

async fn clear_sealed(raft: &RaftNode, rule: &str, id: &str) -> Result<(), String> {
    match raft
        .propose(Command::ClearSealed {
            rule: rule.to_string(),
            id: id.to_string(),
        })
        .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("forgetting a sent notification: {e}")),
        Err(e) => Err(format!("forgetting a sent notification: {e}")),
    }
}

async fn clear(raft: &RaftNode, rule: &str, notices: Vec<(i64, EventId)>) -> Result<(), String> {
    for chunk in notices.chunks(1000) {
        match raft
            .propose(Command::ClearNotices {
                rule: rule.to_string(),
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
