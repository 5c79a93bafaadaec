//! Push delivery: events of a rule with a webhook are POSTed to it in the
//! Standard Webhooks format, through the same leases, retries and
//! dead-letter queue as pull consumers.
//!
//! - The DC leader runs one delivery loop per queue that a webhook rule
//!   feeds; it leases due events as consumer `webhook`, sends each (a
//!   bounded number at once), and answers the lease from the response:
//!   2xx `complete`; 429, 5xx, a timeout or a connection error `retry`
//!   (after `Retry-After` when the receiver sends one, else the rule's
//!   backoff); any other status `fail` (dead-lettered at once).
//! - Store and forward: a circuit breaker per queue. After
//!   `BREAKER_THRESHOLD` transient failures in a row the receiver counts as
//!   down: the loop sends one probe at a time (every 100 ms, doubling to
//!   30 s), and a probe that fails is handed back *deferred*, which costs
//!   the event no attempt. So a receiver down for an hour makes each event
//!   lose an attempt at most once, not its whole budget, and when it is
//!   back everything goes, in order per mailbox when the rule asks for it
//!   (the state machine releases a mailbox's next event only after the
//!   previous one is finished).
//! - A leader that loses its role stops its loops; leases it held run out
//!   and the new leader's loops deliver those events again (same id). A
//!   receiver must therefore deduplicate on `webhook-id`, as the standard
//!   says.
//! - Secrets sign; they are never logged (`WebhookSink`'s `Debug` hides
//!   them) and never returned by the API.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use mailbox_raft::RaftNode;
use mailbox_state::events::{self as ev, EventAck};
use mailbox_state::{Command, CommandResult};
use mailbox_types::{now_ms, Event, WebhookSink};
use tokio::task::JoinSet;

/// Deliveries in flight per queue at most.
pub const WEBHOOK_CONCURRENCY: usize = 8;
/// The consumer name webhook deliveries lease under.
pub const WEBHOOK_CONSUMER: &str = "webhook";
/// Response body bytes kept in an attempt's error text.
const ERROR_BODY: usize = 300;
/// Response body bytes read at most (the rest is not read).
const MAX_RESPONSE_BODY: usize = 64 << 10;
/// Transient failures in a row after which a receiver counts as down.
pub const BREAKER_THRESHOLD: u32 = 3;
/// First and longest wait between probes of a receiver that is down.
const PROBE_FIRST: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(30);

/// Whether a queue's receiver is up, as its deliveries tell.
#[derive(Debug)]
struct Breaker {
    failures: u32,
    probe_every: Duration,
    next_probe: tokio::time::Instant,
}

impl Breaker {
    fn new() -> Self {
        Breaker {
            failures: 0,
            probe_every: PROBE_FIRST,
            next_probe: tokio::time::Instant::now(),
        }
    }

    fn open(&self) -> bool {
        self.failures >= BREAKER_THRESHOLD
    }

    /// Records an outcome; turns a transient failure while the receiver
    /// is down into a deferral (no attempt lost).
    fn record(&mut self, ack: EventAck) -> EventAck {
        match ack {
            EventAck::Retry { delay_ms, reason } => {
                self.failures = self.failures.saturating_add(1);
                if !self.open() {
                    return EventAck::Retry { delay_ms, reason };
                }
                let wait = self
                    .probe_every
                    .max(Duration::from_millis(delay_ms.unwrap_or(0)));
                self.next_probe = tokio::time::Instant::now() + wait;
                self.probe_every = (self.probe_every * 2).min(PROBE_MAX);
                EventAck::Defer {
                    delay_ms: wait.as_millis() as u64,
                    reason: format!("{reason} (receiver down: deferred, no attempt counted)"),
                }
            }
            other => {
                self.failures = 0;
                self.probe_every = PROBE_FIRST;
                other
            }
        }
    }
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
pub(crate) type Http = HttpClient<Https, Full<Bytes>>;

pub(crate) fn http_client() -> Http {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    HttpClient::builder(TokioExecutor::new()).build(https)
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>` per secret,
/// space-separated (two during a rotation); the key is the base64 after
/// `whsec_`.
pub fn signature(
    secrets: &[String],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    for s in secrets {
        let raw = s.strip_prefix("whsec_").unwrap_or(s);
        let key = b64
            .decode(raw)
            .map_err(|e| format!("a webhook secret is not whsec_<base64>: {e}"))?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(id.as_bytes());
        ctx.update(b".");
        ctx.update(timestamp.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body);
        out.push(format!("v1,{}", b64.encode(ctx.sign().as_ref())));
    }
    Ok(out.join(" "))
}

/// The JSON an event is POSTed as.
pub fn body(e: &Event) -> Vec<u8> {
    let m = &e.message;
    serde_json::json!({
        "type": "message.replicated",
        "event_id": e.id.to_string(),
        "attempt": e.deliveries,
        "rule": e.rule,
        "queue": e.queue,
        "complete_ms": e.complete_ms,
        "without": e.without,
        "message": {
            "id": m.id.to_string(),
            "mailbox": m.mailbox.to_string(),
            "name": m.name,
            "size": m.size,
            "sha256": m.sha256.to_hex(),
            "created_ms": m.created_ms,
            "origin_dc": m.origin_dc,
            "attributes": m.attributes,
        },
    })
    .to_string()
    .into_bytes()
}

/// What a delivery's outcome means for the event.
fn answer_for(result: Result<(u16, Option<u64>, String), String>) -> EventAck {
    match result {
        Ok((s, _, _)) if (200..300).contains(&s) => EventAck::Complete,
        Ok((s, retry_after, text)) if s == 429 || s >= 500 => EventAck::Retry {
            delay_ms: retry_after,
            reason: format!("HTTP {s}: {text}"),
        },
        Ok((s, _, text)) => EventAck::Fail {
            reason: format!("HTTP {s} (permanent): {text}"),
        },
        Err(e) => EventAck::Retry {
            delay_ms: None,
            reason: e,
        },
    }
}

/// POSTs `e` to `sink`: the status, `Retry-After` (seconds) and the start
/// of the body; or why no response came.
async fn post(
    http: &Http,
    sink: &WebhookSink,
    e: &Event,
) -> Result<(u16, Option<u64>, String), String> {
    post_body(http, sink, &e.id.to_string(), body(e)).await
}

/// POSTs `body` as message `id` to `sink`, signed (see [`post`]).
pub(crate) async fn post_body(
    http: &Http,
    sink: &WebhookSink,
    id: &str,
    body: Vec<u8>,
) -> Result<(u16, Option<u64>, String), String> {
    let ts = now_ms() / 1000;
    let sig = signature(&sink.secrets, id, ts, &body)?;
    let req = hyper::Request::post(&sink.url)
        .header("content-type", "application/json")
        .header("user-agent", "mailbox-webhook/1")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("bad webhook request: {e}"))?;
    let timeout = Duration::from_millis(sink.timeout_ms.max(100));
    let resp = tokio::time::timeout(timeout, async {
        let resp = http.request(req).await.map_err(|e| format!("{e}"))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| s.saturating_mul(1000));
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(ERROR_BODY)]).into_owned();
        Ok::<_, String>((status, retry_after, text))
    })
    .await
    .map_err(|_| format!("no response within {timeout:?}"))??;
    Ok(resp)
}

/// Runs the webhook deliveries of this node while it leads its DC; ends
/// when `shutdown` flips to true.
pub async fn run(raft: RaftNode, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let http = http_client();
    let mut loops: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if *shutdown.borrow() {
            break;
        }
        loops.retain(|_, h| !h.is_finished());
        if !raft.is_leader() {
            continue;
        }
        let queues: Vec<String> = match ev::list_rules(raft.view()) {
            Ok(rules) => rules
                .into_iter()
                .filter(|(r, _)| r.webhook.is_some())
                .map(|(r, _)| r.queue)
                .collect(),
            Err(e) => {
                tracing::warn!("reading rules for webhooks: {e}");
                continue;
            }
        };
        for q in queues {
            loops.entry(q.clone()).or_insert_with(|| {
                tokio::spawn(queue_loop(raft.clone(), http.clone(), q, shutdown.clone()))
            });
        }
    }
    for (_, h) in loops {
        h.abort();
    }
}

/// Delivers one queue's events while this node leads and some rule of
/// the queue has a webhook. Leaving (not the leader, no webhook, shutdown)
/// stops leasing and lets deliveries under way finish and be answered:
/// an answer is a proposal, which reaches whichever node leads.
async fn queue_loop(
    raft: RaftNode,
    http: Http,
    queue: String,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied = raft.applied_watch();
    let mut running: JoinSet<()> = JoinSet::new();
    let mut request: u64 = rand::random();
    let breaker = std::sync::Arc::new(std::sync::Mutex::new(Breaker::new()));
    loop {
        let sinks = if *shutdown.borrow() || !raft.is_leader() {
            HashMap::new()
        } else {
            match ev::list_rules(raft.view()) {
                Ok(r) => r
                    .into_iter()
                    .filter(|(r, _)| r.queue == queue)
                    .filter_map(|(r, _)| r.webhook.map(|w| (r.name, w)))
                    .collect::<HashMap<_, _>>(),
                // A read error: try again shortly, nothing is given up.
                Err(e) => {
                    tracing::warn!(%queue, "reading rules: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        };
        if sinks.is_empty() {
            while running.join_next().await.is_some() {}
            return;
        }
        while running.try_join_next().is_some() {}
        let (open, next_probe) = {
            let b = breaker.lock().expect("breaker");
            (b.open(), b.next_probe)
        };
        // While the receiver is down: one probe at a time, when it is due.
        let room = if open {
            usize::from(running.is_empty() && tokio::time::Instant::now() >= next_probe)
        } else {
            WEBHOOK_CONCURRENCY.saturating_sub(running.len())
        };
        let due = ev::next_due(
            raft.view(),
            raft.dc(),
            &queue,
            now_ms().saturating_add(1_000),
        )
        .ok()
        .flatten();
        if room == 0 || due.is_none_or(|d| d > now_ms()) {
            let mut nap = match due {
                Some(d) => Duration::from_millis((d - now_ms()).clamp(1, 500) as u64),
                None => Duration::from_millis(500),
            };
            if open {
                nap = nap.min(
                    next_probe
                        .saturating_duration_since(tokio::time::Instant::now())
                        .max(Duration::from_millis(1)),
                );
            }
            if room == 0 && !running.is_empty() {
                // Full: only a finished delivery (or the clock) makes room.
                tokio::select! {
                    _ = running.join_next() => {}
                    _ = tokio::time::sleep(nap) => {}
                }
            } else {
                tokio::select! {
                    _ = applied.changed() => {}
                    _ = tokio::time::sleep(nap) => {}
                }
            }
            continue;
        }
        // Held after an outage: wait without proposing (see `lease` in
        // the service).
        if matches!(
            mailbox_state::events::catching_up(raft.view(), raft.dc(), now_ms()),
            Ok(Some(_))
        ) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let leased = raft
            .propose(Command::LeaseEvents {
                queue: queue.clone(),
                consumer: WEBHOOK_CONSUMER.into(),
                max: room as u32,
                lease_ms: None,
                now_ms: now_ms(),
                seed: rand::random(),
                request,
            })
            .await;
        let events = match leased {
            Ok(Ok(CommandResult::Leased { events })) => {
                request = rand::random();
                events
            }
            other => {
                tracing::debug!(%queue, "webhook lease: {other:?}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for e in events {
            let sink = sinks.get(&e.rule).cloned();
            let (raft, http, breaker) = (raft.clone(), http.clone(), breaker.clone());
            running.spawn(async move {
                let ack = match &sink {
                    Some(s) => {
                        let a = answer_for(post(&http, s, &e).await);
                        breaker.lock().expect("breaker").record(a)
                    }
                    // Its rule lost its webhook (or another rule's event
                    // shares the queue): nobody here can take it.
                    None => EventAck::Retry {
                        delay_ms: Some(60_000),
                        reason: format!("rule {} has no webhook for queue {}", e.rule, e.queue),
                    },
                };
                match &ack {
                    EventAck::Fail { reason } | EventAck::Retry { reason, .. } => {
                        tracing::info!(event = %e.id, attempt = e.deliveries, rule = %e.rule, "webhook delivery failed: {reason}");
                    }
                    EventAck::Defer { reason, .. } => {
                        tracing::debug!(event = %e.id, rule = %e.rule, "webhook delivery deferred: {reason}");
                    }
                    _ => {}
                }
                answer(&raft, &e, ack).await;
            });
        }
    }
}

/// Answers delivery `e.deliveries` of `e`, retrying while the outcome is
/// unknown (the same answer applied twice is the same success).
async fn answer(raft: &RaftNode, e: &Event, ack: EventAck) {
    for _ in 0..5 {
        match raft
            .propose(Command::AckEvent {
                id: e.id,
                attempt: e.deliveries,
                consumer: WEBHOOK_CONSUMER.into(),
                ack: ack.clone(),
                now_ms: now_ms(),
                seed: rand::random(),
            })
            .await
        {
            Ok(Ok(CommandResult::EventUpdated { event })) => {
                if event.status == mailbox_types::EventStatus::Failed {
                    tracing::warn!(event = %e.id, rule = %e.rule, queue = %e.queue, message = %e.message.id, "webhook event dead-lettered");
                }
                return;
            }
            Ok(Ok(_)) => return,
            Ok(Err(err)) => {
                tracing::info!(event = %e.id, "webhook answer refused: {err}");
                return;
            }
            Err(err) => {
                tracing::debug!(event = %e.id, "webhook answer: {err}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        let sig = signature(
            &["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD".to_string()],
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn two_secrets_sign_twice_during_a_rotation() {
        let s = signature(
            &["whsec_AAAA".to_string(), "whsec_BBBB".to_string()],
            "id",
            1,
            b"{}",
        )
        .unwrap();
        assert_eq!(s.split(' ').count(), 2);
        assert!(s.split(' ').all(|p| p.starts_with("v1,")));
    }

    #[test]
    fn a_receiver_that_stays_down_costs_each_event_no_more_attempts() {
        let mut b = Breaker::new();
        let fail = || EventAck::Retry {
            delay_ms: None,
            reason: "HTTP 503".into(),
        };
        for _ in 0..BREAKER_THRESHOLD - 1 {
            assert!(matches!(b.record(fail()), EventAck::Retry { .. }));
        }
        let mut waits = Vec::new();
        for _ in 0..12 {
            match b.record(fail()) {
                EventAck::Defer { delay_ms, .. } => waits.push(delay_ms),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(waits[0], 100);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), 30_000);
        // Back up: closed again, the next failure counts again.
        assert!(matches!(b.record(EventAck::Complete), EventAck::Complete));
        assert!(!b.open());
        assert!(matches!(b.record(fail()), EventAck::Retry { .. }));
    }

    #[test]
    fn responses_map_to_answers() {
        assert!(matches!(
            answer_for(Ok((204, None, String::new()))),
            EventAck::Complete
        ));
        assert!(matches!(
            answer_for(Ok((503, Some(2000), String::new()))),
            EventAck::Retry {
                delay_ms: Some(2000),
                ..
            }
        ));
        assert!(matches!(
            answer_for(Ok((429, None, String::new()))),
            EventAck::Retry { .. }
        ));
        assert!(matches!(
            answer_for(Ok((400, None, "bad".into()))),
            EventAck::Fail { .. }
        ));
        assert!(matches!(
            answer_for(Ok((301, None, String::new()))),
            EventAck::Fail { .. }
        ));
        assert!(matches!(
            answer_for(Err("refused".into())),
            EventAck::Retry { delay_ms: None, .. }
        ));
    }
}
