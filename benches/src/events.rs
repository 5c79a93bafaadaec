//! `mailbox-bench events`: replication-complete events end to end on a
//! running DC.
//!
//! 1. **Backlog drain.** Uploads `--messages` small files, then adds a rule
//!    and raises its events over them with `rules evaluate` (a backlog of
//!    one event per file), then drains the queue with `--consumers` gRPC
//!    subscriptions that complete every event (answers pipelined up to
//!    each subscription's in-flight cap). Reports events raised per second
//!    and events completed per second (leased, delivered, answered).
//! 2. **Latency under load.** With the rule in force and the consumers
//!    subscribed, uploads at `--rate` per second for `--duration`; for each
//!    event, the time from "every DC holds the file" (the event's
//!    `complete_ms`) to its arrival at a consumer. Reports p50/p99.
//!    Clocks: client and nodes run on the same machine.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use mailbox_client::{Client, PutOptions};
use mailbox_proto::v1 as pb;
use serde_json::json;
use tokio_stream::StreamExt;

/// Arguments of `mailbox-bench events`.
#[derive(Args)]
pub struct EventsArgs {
    /// Node addresses (host:port), comma-separated.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Files in the backlog.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Consumer subscriptions.
    #[arg(long, default_value_t = 8)]
    consumers: usize,
    /// Unanswered events per subscription at most.
    #[arg(long, default_value_t = 64)]
    max_in_flight: u32,
    /// Upload rate during the latency phase (files per second).
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Length of the latency phase.
    #[arg(long, default_value = "15s")]
    duration: mailbox_types::HumanDuration,
}

async fn upload_many(eps: &[String], mailbox: &str, n: usize) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..64usize {
        let c = Client::connect(&[eps[w % eps.len()].clone()]).await?;
        let next = next.clone();
        let mailbox = mailbox.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n as u64 {
                    return Ok::<_, anyhow::Error>(());
                }
                c.put_bytes(
                    PutOptions {
                        mailbox: mailbox.clone(),
                        name: format!("e{i}"),
                        ..Default::default()
                    },
                    vec![b'x'; 1024],
                )
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Subscribes `consumers` times to `queue`; every event is completed (the
/// answers pipelined) and its arrival time minus `complete_ms` recorded.
fn consume(
    client: &Client,
    queue: &str,
    consumers: usize,
    max_in_flight: u32,
    done: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<i64>>>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    (0..consumers)
        .map(|i| {
            let mut api = client.events();
            let (queue, done, latencies) = (queue.to_string(), done.clone(), latencies.clone());
            tokio::spawn(async move {
                let mut s = api
                    .subscribe(pb::SubscribeRequest {
                        queue: queue.clone(),
                        consumer: format!("bench-{i}"),
                        max_in_flight,
                        lease_ms: 0,
                    })
                    .await?
                    .into_inner();
                let window = Arc::new(tokio::sync::Semaphore::new(max_in_flight as usize));
                while let Some(e) = s.next().await {
                    let e = e?;
                    let now = mailbox_types::now_ms();
                    latencies.lock().unwrap().push(now - e.complete_ms);
                    let permit = window.clone().acquire_owned().await?;
                    let mut acker = api.clone();
                    let done = done.clone();
                    tokio::spawn(async move {
                        let r = acker
                            .ack(pb::AckRequest {
                                id: e.id,
                                attempt: e.attempt,
                                consumer: "bench".into(),
                                outcome: "complete".into(),
                                ..Default::default()
                            })
                            .await;
                        if r.is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(permit);
                    });
                }
                Ok(())
            })
        })
        .collect()
}

fn pct(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Runs both phases; one JSON object.
pub async fn run(a: EventsArgs) -> anyhow::Result<serde_json::Value> {
    let client = Client::connect(&a.endpoints).await?;
    let tag = mailbox_types::now_ms();
    let mailbox = format!("/evbench-{tag}");
    client.mkdir(&mailbox, true).await?;
    eprintln!("uploading {} files into {mailbox}", a.messages);
    let upload_rate = upload_many(&a.endpoints, &mailbox, a.messages).await?;

    // The rule comes after the files: its events are raised by evaluate.
    let queue = format!("evq-{tag}");
    let rule = format!("evr-{tag}");
    client
        .events()
        .put_rule(pb::PutRuleRequest {
            rule: Some(pb::RuleInfo {
                name: rule.clone(),
                enabled: true,
                mailbox: mailbox.clone(),
                queue: queue.clone(),
                lease_ms: 60_000,
                ..Default::default()
            }),
        })
        .await?;
    let t0 = Instant::now();
    let mut ev = client
        .events()
        .evaluate_rule(pb::EvaluateRuleRequest {
            name: rule.clone(),
            page: 5000,
        })
        .await?
        .into_inner();
    let mut raised = 0;
    while let Some(p) = ev.next().await {
        raised = p?.added;
    }
    let raise_secs = t0.elapsed().as_secs_f64();
    anyhow::ensure!(raised as usize == a.messages, "raised {raised}");
    eprintln!(
        "raised {raised} events in {raise_secs:.1}s; draining with {} consumers",
        a.consumers
    );

    let done = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let t1 = Instant::now();
    let subs = consume(
        &client,
        &queue,
        a.consumers,
        a.max_in_flight,
        done.clone(),
        latencies.clone(),
    );
    while (done.load(Ordering::Relaxed) as usize) < a.messages {
        anyhow::ensure!(
            t1.elapsed() < Duration::from_secs(600),
            "drain stalled at {}",
            done.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_secs = t1.elapsed().as_secs_f64();
    eprintln!(
        "drained {} events in {drain_secs:.1}s",
        done.load(Ordering::Relaxed)
    );

    // Latency under steady uploads, the consumers still subscribed.
    latencies.lock().unwrap().clear();
    let before = done.load(Ordering::Relaxed);
    let uploader = Client::connect(&a.endpoints).await?;
    let period = Duration::from_secs_f64(1.0 / a.rate.max(1) as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let t2 = Instant::now();
    let mut sent = 0u64;
    let mut puts = tokio::task::JoinSet::new();
    while t2.elapsed() < a.duration.get() {
        tick.tick().await;
        let (c, mb) = (uploader.clone(), mailbox.clone());
        sent += 1;
        let i = sent;
        puts.spawn(async move {
            c.put_bytes(
                PutOptions {
                    mailbox: mb,
                    name: format!("l{i}"),
                    ..Default::default()
                },
                vec![b'y'; 1024],
            )
            .await
        });
        while let Some(r) = puts.try_join_next() {
            r.context("upload task")??;
        }
    }
    while let Some(r) = puts.join_next().await {
        r.context("upload task")??;
    }
    let want = before + sent;
    let t3 = Instant::now();
    while done.load(Ordering::Relaxed) < want && t3.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in subs {
        s.abort();
    }
    let mut l = latencies.lock().unwrap().clone();
    l.sort_unstable();
    Ok(json!({
        "kind": "events",
        "target": "mailbox",
        "messages": a.messages,
        "consumers": a.consumers,
        "max_in_flight": a.max_in_flight,
        "upload_per_sec": upload_rate,
        "raise_per_sec": raised as f64 / raise_secs,
        "drain_events_per_sec": a.messages as f64 / drain_secs,
        "latency_rate_per_sec": a.rate,
        "latency_events": l.len(),
        "latency_p50_ms": pct(&l, 0.50),
        "latency_p99_ms": pct(&l, 0.99),
        "latency_max_ms": l.last().copied().unwrap_or(0),
    }))
}
