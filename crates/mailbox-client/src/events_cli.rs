//! `mailbox rules|events|dlq`: event rules, queues, consumers and the
//! dead-letter queue, over the `Events` API.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use mailbox_client::{Client, ClientError};
use mailbox_proto::v1 as pb;
use mailbox_types::{ByteSize, HumanDuration};
use serde_json::json;
use tokio_stream::StreamExt;

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum RulesCmd {
    /// Add or replace a rule: messages it selects raise an event into its
    /// queue once every DC holds them.
    Add {
        /// Rule name (letters, digits, . _ -).
        name: String,
        /// Mailbox whose messages it selects.
        #[arg(long)]
        mailbox: String,
        /// Also the mailboxes below it.
        #[arg(long)]
        subtree: bool,
        /// Name glob a message must match (repeatable; `*`, `?`, `[a-z]`).
        #[arg(long)]
        include: Vec<String>,
        /// Name glob a message must not match (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// Smallest size selected (e.g. 1KiB).
        #[arg(long)]
        min_size: Option<ByteSize>,
        /// Largest size selected.
        #[arg(long)]
        max_size: Option<ByteSize>,
        /// Attribute KEY=VALUE the message must have (repeatable).
        #[arg(long = "attr", value_parser = crate::parse_attr)]
        attrs: Vec<(String, String)>,
        /// Queue its events go to.
        #[arg(long)]
        queue: String,
        /// Failed deliveries before an event is dead-lettered.
        #[arg(long, default_value_t = 5)]
        max_attempts: u32,
        /// Backoff range INITIAL..MAX (exponential, full jitter).
        #[arg(long, default_value = "1s..5m")]
        backoff: String,
        /// How long a consumer holds an event before it is offered again.
        #[arg(long, default_value = "30s")]
        lease: HumanDuration,
        /// `none`, or `per-mailbox` (a mailbox's next event waits for the previous).
        #[arg(long, default_value = "none")]
        ordering: String,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
        /// Push each event to this URL (Standard Webhooks: signed POST, JSON).
        #[arg(long)]
        webhook: Option<String>,
        /// File holding the webhook's `whsec_` secret; two lines during a rotation.
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
        /// Per-request timeout of the webhook.
        #[arg(long, default_value = "10s")]
        webhook_timeout: HumanDuration,
        /// POST a notification here when events of this rule are
        /// dead-lettered (Standard Webhooks, signed like events).
        #[arg(long)]
        error_webhook: Option<String>,
        /// File holding the error webhook's `whsec_` secret(s).
        #[arg(long)]
        error_secret_file: Option<std::path::PathBuf>,
        /// Dead-letters with the same error within this long of the first
        /// go out as one notification with a count.
        #[arg(long, default_value = "1m")]
        error_window: HumanDuration,
    },
    /// The rules in force.
    Ls,
    /// Delete a rule (its events stay).
    Rm {
        /// Rule name.
        name: String,
    },
    /// Enable a rule.
    Enable {
        /// Rule name.
        name: String,
    },
    /// Disable a rule (it raises nothing; its events are still delivered).
    Disable {
        /// Rule name.
        name: String,
    },
    /// Raise the rule's event for messages already complete that have none.
    Evaluate {
        /// Rule name.
        name: String,
        /// Messages per log entry.
        #[arg(long, default_value_t = 1000)]
        page: u32,
    },
}

#[derive(Subcommand)]
pub enum EventsCmd {
    /// List events.
    Ls {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// pending | processing | complete | failed | discarded.
        #[arg(long)]
        status: Option<String>,
        /// Only this message's events.
        #[arg(long)]
        message: Option<String>,
        /// Only this rule's.
        #[arg(long)]
        rule: Option<String>,
        /// At most this many (0 = all).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One event with every attempt.
    Show {
        /// Event id.
        id: String,
    },
    /// Lease events of a queue and print them (answer with `events ack`).
    Next {
        /// Queue.
        queue: String,
        /// Lease length (default: the rule's).
        #[arg(long)]
        lease: Option<HumanDuration>,
        /// How many at most.
        #[arg(long, default_value_t = 1)]
        max: u32,
        /// Wait this long for one when none is due.
        #[arg(long, default_value = "0s")]
        wait: HumanDuration,
        /// Consumer name shown in the event's attempts.
        #[arg(long, default_value = "cli")]
        consumer: String,
    },
    /// Answer a delivery.
    Ack {
        /// Event id.
        id: String,
        /// complete | retry | fail | progress.
        outcome: String,
        /// The delivery answered (default: the current one).
        #[arg(long)]
        attempt: Option<u32>,
        /// Why (retry, fail).
        #[arg(long)]
        reason: Option<String>,
        /// retry: wait this long instead of the backoff; progress: extend by this.
        #[arg(long)]
        delay: Option<HumanDuration>,
        /// Consumer name.
        #[arg(long, default_value = "cli")]
        consumer: String,
    },
    /// Print a queue's events as they become due; `--ack` completes each.
    Tail {
        /// Queue.
        queue: String,
        /// Complete each event once printed.
        #[arg(long)]
        ack: bool,
        /// Unanswered events at most.
        #[arg(long, default_value_t = 16)]
        max_in_flight: u32,
        /// Consumer name.
        #[arg(long, default_value = "tail")]
        consumer: String,
    },
    /// Per queue: events by status, and which DC handles them.
    Stats,
    /// Hand every event of a queue to one DC, when the DC handling them is
    /// down: it leases them from now on (what completed elsewhere and
    /// reached it is not delivered again; a lease that was running is
    /// delivered again once, same id).
    Takeover {
        /// Queue.
        queue: String,
        /// The DC that takes it over.
        #[arg(long, required_unless_present = "release", conflicts_with = "release")]
        dc: Option<String>,
        /// Why (kept and shown).
        #[arg(long, default_value = "")]
        reason: String,
        /// Hand it back: each event to the DC that raised it.
        #[arg(long)]
        release: bool,
        /// Even from a DC heard from in the last 30 s (refused otherwise:
        /// it may be up and delivering, and both would deliver).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum DlqCmd {
    /// Dead-lettered events.
    Ls {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only this rule's.
        #[arg(long)]
        rule: Option<String>,
        /// Only this mailbox's messages.
        #[arg(long)]
        mailbox: Option<String>,
        /// Dead-lettered within this long ago (e.g. 1h).
        #[arg(long)]
        since: Option<HumanDuration>,
        /// Dead-lettered at least this long ago (with --since: a window).
        #[arg(long)]
        until: Option<HumanDuration>,
        /// Only events with an attempt whose error contains this text.
        #[arg(long)]
        error: Option<String>,
        /// At most this many (0 = all).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One dead-lettered event with every attempt.
    Show {
        /// Event id.
        id: String,
    },
    /// Deliver events again (same id; delivery numbers go on).
    Replay {
        /// Event ids.
        ids: Vec<String>,
        /// Every dead-lettered event of this queue (with the filters below).
        #[arg(long)]
        queue: Option<String>,
        /// With --queue: only this rule's.
        #[arg(long)]
        rule: Option<String>,
        /// With --queue: only events whose error contains this text.
        #[arg(long)]
        error: Option<String>,
        /// Events per second at most.
        #[arg(long, default_value_t = 500)]
        rate: u32,
        /// Also replay events that are complete (they are delivered again).
        #[arg(long)]
        force: bool,
    },
    /// Discard dead-lettered events (kept as discarded, with the reason).
    Discard {
        /// Event ids.
        ids: Vec<String>,
        /// Why (required; kept with each event).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum DcCmd {
    /// The cluster's DCs and which are suspended from completion.
    Ls,
    /// Suspend a DC that is down for long from completion: messages every
    /// other DC holds complete without it, and their events fire (marked
    /// so). It keeps replicating and catching up; nothing fires twice.
    Suspend {
        /// The DC.
        dc: String,
        /// Why (kept and shown).
        #[arg(long)]
        reason: String,
    },
    /// Let messages wait for the DC again (those completed without it stay complete).
    Resume {
        /// The DC.
        dc: String,
    },
}

fn st(s: tonic::Status) -> anyhow::Error {
    ClientError::from(s).into()
}

fn ms(d: &HumanDuration) -> u64 {
    d.get().as_millis() as u64
}

fn rule_json(r: &pb::RuleInfo) -> serde_json::Value {
    json!({
        "name": r.name, "enabled": r.enabled, "mailbox": r.mailbox, "subtree": r.subtree,
        "include": r.include, "exclude": r.exclude, "min_size": r.min_size, "max_size": r.max_size,
        "attributes": r.attributes, "queue": r.queue, "max_attempts": r.max_attempts,
        "initial_backoff_ms": r.initial_backoff_ms, "max_backoff_ms": r.max_backoff_ms,
        "lease_ms": r.lease_ms, "ordering": r.ordering,
        "webhook_url": (!r.webhook_url.is_empty()).then_some(&r.webhook_url),
        "webhook_secrets": r.webhook_secret_count,
        "error_webhook_url": (!r.error_webhook_url.is_empty()).then_some(&r.error_webhook_url),
        "error_webhook_secrets": r.error_webhook_secret_count,
        "error_window_ms": r.error_window_ms,
        "updated_dc": r.updated_dc, "updated_ms": r.updated_ms,
    })
}

/// An event as JSON: what a script needs to process and deduplicate it.
pub fn event_json(e: &pb::EventInfo) -> serde_json::Value {
    let m = e.message.clone().unwrap_or_default();
    json!({
        "id": e.id, "rule": e.rule, "queue": e.queue, "status": e.status,
        "attempt": e.attempt, "failures": e.failures, "max_attempts": e.max_attempts,
        "message": {
            "id": m.id, "mailbox": m.mailbox, "name": m.name, "size": m.size,
            "sha256": m.sha256, "created_ms": m.created_ms, "origin_dc": m.origin_dc,
            "attributes": m.attributes,
        },
        "complete_ms": e.complete_ms, "raised_ms": e.raised_ms, "due_ms": e.due_ms,
        "without": e.without,
        "lease_consumer": (!e.lease_consumer.is_empty()).then_some(&e.lease_consumer),
        "blocked": e.blocked, "ordering": e.ordering, "seq": e.seq,
        "note": (!e.note.is_empty()).then_some(&e.note),
        "attempts": e.attempts.iter().map(|a| json!({
            "number": a.number, "leased_ms": a.leased_ms, "consumer": a.consumer,
            "outcome": (!a.outcome.is_empty()).then_some(&a.outcome),
            "ended_ms": a.ended_ms, "error": a.error,
        })).collect::<Vec<_>>(),
    })
}

fn event_line(e: &pb::EventInfo) -> String {
    let m = e.message.clone().unwrap_or_default();
    let extra = if e.blocked {
        " (waits for an earlier event of its mailbox)".to_string()
    } else if e.status == "pending" && e.failures > 0 {
        format!(" (retry after {} failure(s))", e.failures)
    } else {
        String::new()
    };
    format!(
        "{}  {:<10} {:<12} {:<12} attempt {:<3} {}/{}  {}{extra}",
        e.id, e.status, e.queue, e.rule, e.attempt, m.mailbox, m.name, m.id
    )
}

fn print_event(e: &pb::EventInfo) {
    let m = e.message.clone().unwrap_or_default();
    println!("id:        {}", e.id);
    println!("status:    {}", e.status);
    println!(
        "rule:      {}  queue: {}  ordering: {}",
        e.rule, e.queue, e.ordering
    );
    println!(
        "message:   {}  {}/{}  {}  sha256:{}",
        m.id,
        m.mailbox,
        m.name,
        ByteSize(m.size),
        m.sha256
    );
    for (k, v) in &m.attributes {
        println!("attr:      {k}={v}");
    }
    if e.without.is_empty() {
        println!(
            "complete:  in all DCs since {}",
            crate::human_time(e.complete_ms)
        );
    } else {
        println!(
            "complete:  since {}, without {} (suspended from completion)",
            crate::human_time(e.complete_ms),
            e.without.join(", ")
        );
    }
    println!(
        "deliveries: {}  failures: {} of {}",
        e.attempt, e.failures, e.max_attempts
    );
    if !e.note.is_empty() {
        println!("note:      {}", e.note);
    }
    for a in &e.attempts {
        println!(
            "  #{:<3} {}  {:<12} {:<9} {}",
            a.number,
            crate::human_time(a.leased_ms),
            a.consumer,
            if a.outcome.is_empty() {
                "leased"
            } else {
                a.outcome.as_str()
            },
            a.error
        );
    }
}

fn print_events(json: bool, events: &[pb::EventInfo]) {
    if json {
        println!(
            "{}",
            serde_json::Value::Array(events.iter().map(event_json).collect())
        );
    } else {
        for e in events {
            println!("{}", event_line(e));
        }
    }
}

async fn list_all(
    client: &Client,
    mut req: pb::ListEventsRequest,
    limit: u32,
) -> anyhow::Result<Vec<pb::EventInfo>> {
    let mut out = Vec::new();
    loop {
        req.limit = if limit == 0 {
            1000
        } else {
            (limit - out.len() as u32).min(1000)
        };
        let r = client
            .events()
            .list_events(req.clone())
            .await
            .map_err(st)?
            .into_inner();
        out.extend(r.events);
        if r.next_after.is_empty() || (limit != 0 && out.len() as u32 >= limit) {
            return Ok(out);
        }
        req.after = r.next_after;
    }
}

/// `mailbox rules ...`.
pub async fn rules(client: &Client, json: bool, cmd: &RulesCmd) -> anyhow::Result<()> {
    let mut api = client.events();
    match cmd {
        RulesCmd::Add {
            name,
            mailbox,
            subtree,
            include,
            exclude,
            min_size,
            max_size,
            attrs,
            queue,
            max_attempts,
            backoff,
            lease,
            ordering,
            disabled,
            webhook,
            secret_file,
            webhook_timeout,
            error_webhook,
            error_secret_file,
            error_window,
        } => {
            let read_secrets = |f: &std::path::Path| -> anyhow::Result<Vec<String>> {
                Ok(std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect())
            };
            let secrets = match (webhook, secret_file) {
                (Some(_), Some(f)) => read_secrets(f)?,
                (Some(_), None) => bail!("--webhook needs --secret-file (a whsec_ secret)"),
                (None, Some(_)) => bail!("--secret-file goes with --webhook"),
                (None, None) => Vec::new(),
            };
            let error_secrets = match (error_webhook, error_secret_file) {
                (Some(_), Some(f)) => read_secrets(f)?,
                (Some(_), None) => {
                    bail!("--error-webhook needs --error-secret-file (a whsec_ secret)")
                }
                (None, Some(_)) => bail!("--error-secret-file goes with --error-webhook"),
                (None, None) => Vec::new(),
            };
            let (lo, hi) = backoff.split_once("..").with_context(|| {
                format!("--backoff {backoff:?}: expected INITIAL..MAX, e.g. 1s..5m")
            })?;
            let lo: HumanDuration = lo.parse()?;
            let hi: HumanDuration = hi.parse()?;
            let rule = pb::RuleInfo {
                name: name.clone(),
                enabled: !disabled,
                mailbox: mailbox.clone(),
                subtree: *subtree,
                include: include.clone(),
                exclude: exclude.clone(),
                min_size: min_size.map(|s| s.bytes()),
                max_size: max_size.map(|s| s.bytes()),
                attributes: attrs.iter().cloned().collect(),
                queue: queue.clone(),
                max_attempts: *max_attempts,
                initial_backoff_ms: ms(&lo),
                max_backoff_ms: ms(&hi),
                lease_ms: ms(lease),
                ordering: ordering.clone(),
                webhook_url: webhook.clone().unwrap_or_default(),
                webhook_timeout_ms: ms(webhook_timeout),
                webhook_secrets: secrets,
                error_webhook_url: error_webhook.clone().unwrap_or_default(),
                error_webhook_secrets: error_secrets,
                error_window_ms: ms(error_window).max(1),
                ..Default::default()
            };
            let r = api
                .put_rule(pb::PutRuleRequest { rule: Some(rule) })
                .await
                .map_err(st)?
                .into_inner();
            let r = r.rule.context("the server returned no rule")?;
            if json {
                println!("{}", rule_json(&r));
            } else {
                println!("rule {} -> queue {}", r.name, r.queue);
            }
        }
        RulesCmd::Ls => {
            let rules = api
                .list_rules(pb::ListRulesRequest {})
                .await
                .map_err(st)?
                .into_inner()
                .rules;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(rules.iter().map(rule_json).collect())
                );
            } else {
                println!(
                    "{:<16} {:<8} {:<24} {:<16} {:<12} RETRY",
                    "NAME", "ENABLED", "MAILBOX", "QUEUE", "ORDERING"
                );
                for r in &rules {
                    let mut sel = r.mailbox.clone();
                    if r.subtree {
                        sel.push_str("/**");
                    }
                    println!(
                        "{:<16} {:<8} {:<24} {:<16} {:<12} {}x {}..{} lease {}",
                        r.name,
                        r.enabled,
                        sel,
                        r.queue,
                        r.ordering,
                        r.max_attempts,
                        HumanDuration(Duration::from_millis(r.initial_backoff_ms)),
                        HumanDuration(Duration::from_millis(r.max_backoff_ms)),
                        HumanDuration(Duration::from_millis(r.lease_ms)),
                    );
                    if !r.include.is_empty() || !r.exclude.is_empty() {
                        println!("{:<16} include {:?} exclude {:?}", "", r.include, r.exclude);
                    }
                }
            }
        }
        RulesCmd::Rm { name } => {
            api.delete_rule(pb::DeleteRuleRequest { name: name.clone() })
                .await
                .map_err(st)?;
            if json {
                println!("{}", json!({"deleted": name}));
            } else {
                println!("rule {name} deleted (its events stay)");
            }
        }
        RulesCmd::Enable { name } | RulesCmd::Disable { name } => {
            let enable = matches!(cmd, RulesCmd::Enable { .. });
            let rules = api
                .list_rules(pb::ListRulesRequest {})
                .await
                .map_err(st)?
                .into_inner()
                .rules;
            let Some(mut r) = rules.into_iter().find(|r| &r.name == name) else {
                bail!("rule {name} does not exist");
            };
            r.enabled = enable;
            let r = api
                .put_rule(pb::PutRuleRequest { rule: Some(r) })
                .await
                .map_err(st)?
                .into_inner()
                .rule
                .context("the server returned no rule")?;
            if json {
                println!("{}", rule_json(&r));
            } else {
                println!(
                    "rule {name} {}",
                    if enable { "enabled" } else { "disabled" }
                );
            }
        }
        RulesCmd::Evaluate { name, page } => {
            let mut s = api
                .evaluate_rule(pb::EvaluateRuleRequest {
                    name: name.clone(),
                    page: *page,
                })
                .await
                .map_err(st)?
                .into_inner();
            let pb_ = if json {
                ProgressBar::hidden()
            } else {
                let p = ProgressBar::new_spinner();
                p.set_style(
                    ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
                        .expect("static template"),
                );
                p
            };
            let mut last = pb::EvaluateRuleProgress::default();
            while let Some(p) = s.next().await {
                last = p.map_err(st)?;
                pb_.set_message(format!(
                    "{} messages looked at, {} events raised",
                    last.scanned, last.added
                ));
                pb_.tick();
            }
            pb_.finish_and_clear();
            if json {
                println!(
                    "{}",
                    json!({"rule": name, "scanned": last.scanned, "added": last.added, "done": last.done})
                );
            } else {
                println!(
                    "rule {name}: {} completed messages looked at, {} events raised",
                    last.scanned, last.added
                );
            }
        }
    }
    Ok(())
}

/// `mailbox events ...`.
pub async fn events(client: &Client, json: bool, cmd: &EventsCmd) -> anyhow::Result<()> {
    let mut api = client.events();
    match cmd {
        EventsCmd::Ls {
            queue,
            status,
            message,
            rule,
            limit,
        } => {
            let req = pb::ListEventsRequest {
                queue: queue.clone().unwrap_or_default(),
                status: status.clone().unwrap_or_default(),
                message_id: message.clone().unwrap_or_default(),
                rule: rule.clone().unwrap_or_default(),
                ..Default::default()
            };
            let events = list_all(client, req, *limit).await?;
            if !json && events.is_empty() {
                eprintln!("no events");
            }
            print_events(json, &events);
        }
        EventsCmd::Show { id } => {
            let e = api
                .get_event(pb::GetEventRequest { id: id.clone() })
                .await
                .map_err(st)?
                .into_inner();
            if json {
                println!("{}", event_json(&e));
            } else {
                print_event(&e);
            }
        }
        EventsCmd::Next {
            queue,
            lease,
            max,
            wait,
            consumer,
        } => {
            let r = api
                .lease(pb::LeaseRequest {
                    queue: queue.clone(),
                    consumer: consumer.clone(),
                    max: *max,
                    lease_ms: lease.as_ref().map_or(0, ms),
                    wait_ms: ms(wait),
                })
                .await
                .map_err(st)?
                .into_inner();
            if !json && r.events.is_empty() {
                eprintln!("nothing due in queue {queue}");
            }
            print_events(json, &r.events);
        }
        EventsCmd::Ack {
            id,
            outcome,
            attempt,
            reason,
            delay,
            consumer,
        } => {
            let attempt = match attempt {
                Some(a) => *a,
                None => {
                    api.get_event(pb::GetEventRequest { id: id.clone() })
                        .await
                        .map_err(st)?
                        .into_inner()
                        .attempt
                }
            };
            let e = api
                .ack(pb::AckRequest {
                    id: id.clone(),
                    attempt,
                    consumer: consumer.clone(),
                    outcome: outcome.clone(),
                    reason: reason.clone().unwrap_or_default(),
                    delay_ms: delay.as_ref().map(ms),
                })
                .await
                .map_err(st)?
                .into_inner();
            if json {
                println!("{}", event_json(&e));
            } else {
                println!("{}", event_line(&e));
            }
        }
        EventsCmd::Tail {
            queue,
            ack,
            max_in_flight,
            consumer,
        } => {
            let mut s = api
                .subscribe(pb::SubscribeRequest {
                    queue: queue.clone(),
                    consumer: consumer.clone(),
                    max_in_flight: *max_in_flight,
                    lease_ms: 0,
                })
                .await
                .map_err(st)?
                .into_inner();
            let mut acker = client.events();
            while let Some(e) = s.next().await {
                let e = e.map_err(st)?;
                if json {
                    println!("{}", event_json(&e));
                } else {
                    println!("{}", event_line(&e));
                }
                if *ack {
                    acker
                        .ack(pb::AckRequest {
                            id: e.id.clone(),
                            attempt: e.attempt,
                            consumer: consumer.clone(),
                            outcome: "complete".into(),
                            ..Default::default()
                        })
                        .await
                        .map_err(st)?;
                }
            }
        }
        EventsCmd::Stats | EventsCmd::Takeover { .. } => {
            let q = if let EventsCmd::Takeover {
                queue,
                dc,
                reason,
                release,
                force,
            } = cmd
            {
                let r = api
                    .takeover_queue(pb::TakeoverQueueRequest {
                        queue: queue.clone(),
                        dc: dc.clone().unwrap_or_default(),
                        reason: reason.clone(),
                        release: *release,
                        force: *force,
                    })
                    .await
                    .map_err(st)?
                    .into_inner()
                    .queues;
                match dc {
                    Some(dc) => eprintln!("queue {queue} is handled by DC {dc} from now on"),
                    None => eprintln!(
                        "queue {queue}: each event is handled by the DC that raised it again"
                    ),
                }
                r
            } else {
                api.queue_stats(pb::QueueStatsRequest {})
                    .await
                    .map_err(st)?
                    .into_inner()
                    .queues
            };
            if json {
                let v: Vec<_> = q
                    .iter()
                    .map(|q| {
                        json!({"queue": q.queue, "raised": q.raised, "pending": q.pending,
                               "processing": q.processing, "complete": q.complete,
                               "failed": q.failed, "discarded": q.discarded,
                               "handled_by": (!q.handled_by.is_empty()).then_some(&q.handled_by)})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<16} {:>9} {:>9} {:>10} {:>9} {:>7} {:>9}  HANDLED BY",
                    "QUEUE", "RAISED", "PENDING", "PROCESSING", "COMPLETE", "FAILED", "DISCARDED"
                );
                for q in &q {
                    println!(
                        "{:<16} {:>9} {:>9} {:>10} {:>9} {:>7} {:>9}  {}",
                        q.queue,
                        q.raised,
                        q.pending,
                        q.processing,
                        q.complete,
                        q.failed,
                        q.discarded,
                        if q.handled_by.is_empty() {
                            "origin DCs"
                        } else {
                            &q.handled_by
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

/// `mailbox dlq ...`.
pub async fn dlq(client: &Client, json: bool, cmd: &DlqCmd) -> anyhow::Result<()> {
    let mut api = client.events();
    match cmd {
        DlqCmd::Ls {
            queue,
            rule,
            mailbox,
            since,
            until,
            error,
            limit,
        } => {
            let req = pb::ListEventsRequest {
                queue: queue.clone().unwrap_or_default(),
                status: "failed".into(),
                rule: rule.clone().unwrap_or_default(),
                mailbox: mailbox.clone().unwrap_or_default(),
                since_ms: since
                    .as_ref()
                    .map_or(0, |d| mailbox_types::now_ms() - ms(d) as i64),
                until_ms: until
                    .as_ref()
                    .map_or(0, |d| mailbox_types::now_ms() - ms(d) as i64),
                error_contains: error.clone().unwrap_or_default(),
                ..Default::default()
            };
            let events = list_all(client, req, *limit).await?;
            if json {
                print_events(true, &events);
            } else {
                if events.is_empty() {
                    eprintln!("no dead-lettered events");
                }
                for e in &events {
                    let last = e.attempts.last().map(|a| a.error.as_str()).unwrap_or("");
                    println!("{}  last error: {last}", event_line(e));
                }
            }
        }
        DlqCmd::Show { id } => {
            let e = api
                .get_event(pb::GetEventRequest { id: id.clone() })
                .await
                .map_err(st)?
                .into_inner();
            if json {
                println!("{}", event_json(&e));
            } else {
                print_event(&e);
            }
        }
        DlqCmd::Replay {
            ids,
            queue,
            rule,
            error,
            rate,
            force,
        } => {
            let mut all = ids.clone();
            if let Some(q) = queue {
                let req = pb::ListEventsRequest {
                    queue: q.clone(),
                    status: "failed".into(),
                    rule: rule.clone().unwrap_or_default(),
                    error_contains: error.clone().unwrap_or_default(),
                    ..Default::default()
                };
                all.extend(list_all(client, req, 0).await?.into_iter().map(|e| e.id));
            } else if rule.is_some() || error.is_some() {
                bail!("--rule and --error select from a queue: give --queue too");
            }
            if all.is_empty() {
                bail!(
                    "nothing to replay: give event ids, or --queue for the whole dead-letter queue"
                );
            }
            let rate = (*rate).max(1) as usize;
            let pb_ = if json {
                ProgressBar::hidden()
            } else {
                let p = ProgressBar::new(all.len() as u64);
                p.set_style(
                    ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} replayed {per_sec} eta {eta}",
                    )
                    .expect("static template"),
                );
                p
            };
            let (mut changed, mut refused) = (Vec::new(), Vec::new());
            // Chunks of at most a tenth of the rate, one tenth of a second each.
            let chunk = (rate / 10).max(1);
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(chunk as f64 / rate as f64));
            for ids in all.chunks(chunk) {
                tick.tick().await;
                let r = api
                    .replay(pb::ReplayRequest {
                        ids: ids.to_vec(),
                        force: *force,
                    })
                    .await
                    .map_err(st)?
                    .into_inner();
                pb_.inc(ids.len() as u64);
                changed.extend(r.changed);
                refused.extend(r.refused);
            }
            pb_.finish_and_clear();
            report_change(json, "replayed", &changed, &refused)?;
        }
        DlqCmd::Discard { ids, reason } => {
            if ids.is_empty() {
                bail!("give the ids of the events to discard");
            }
            let r = api
                .discard(pb::DiscardRequest {
                    ids: ids.clone(),
                    reason: reason.clone(),
                })
                .await
                .map_err(st)?
                .into_inner();
            report_change(json, "discarded", &r.changed, &r.refused)?;
        }
    }
    Ok(())
}

fn report_change(
    json: bool,
    verb: &str,
    changed: &[String],
    refused: &[pb::RefusedEvent],
) -> anyhow::Result<()> {
    if json {
        let refused: BTreeMap<_, _> = refused.iter().map(|r| (&r.id, &r.reason)).collect();
        println!("{}", json!({ verb: changed, "refused": refused }));
    } else {
        println!("{} event(s) {verb}", changed.len());
        for r in refused {
            eprintln!("{}: {}", r.id, r.reason);
        }
    }
    if !refused.is_empty() {
        bail!("{} event(s) refused", refused.len());
    }
    Ok(())
}

/// `mailbox dc ...`.
pub async fn dc(client: &Client, json: bool, cmd: &DcCmd) -> anyhow::Result<()> {
    let mut api = client.events();
    let r = match cmd {
        DcCmd::Ls => api.list_dcs(pb::ListDcsRequest {}).await,
        DcCmd::Suspend { dc, reason } => {
            api.set_dc_suspension(pb::SetDcSuspensionRequest {
                dc: dc.clone(),
                suspended: true,
                reason: reason.clone(),
            })
            .await
        }
        DcCmd::Resume { dc } => {
            api.set_dc_suspension(pb::SetDcSuspensionRequest {
                dc: dc.clone(),
                suspended: false,
                reason: String::new(),
            })
            .await
        }
    }
    .map_err(st)?
    .into_inner();
    if json {
        let v: Vec<_> = r
            .dcs
            .iter()
            .map(|d| {
                json!({"dc": d.dc, "suspended": d.suspended,
                       "reason": (!d.reason.is_empty()).then_some(&d.reason),
                       "since_ms": (d.since_ms != 0).then_some(d.since_ms),
                       "set_in_dc": (!d.set_in_dc.is_empty()).then_some(&d.set_in_dc)})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        for d in &r.dcs {
            if d.suspended {
                println!(
                    "{:<12} SUSPENDED from completion since {} (in {}): {}",
                    d.dc,
                    crate::human_time(d.since_ms),
                    d.set_in_dc,
                    d.reason
                );
            } else {
                println!("{:<12} active", d.dc);
            }
        }
    }
    Ok(())
}
