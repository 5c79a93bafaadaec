//! `jetstream-bench`: the baseline of the events backlog drain,
//! on NATS JetStream configured like our side.
//!
//! Our side (`mailbox-bench events`): a 3-node DC (Raft, every write
//! fsynced before it is answered), a backlog of one event per file, drained
//! by `--consumers` gRPC subscriptions with `--max-in-flight` unanswered
//! events each, every event answered `complete` and the answer awaited
//! (committed in the DC log).
//!
//! This side: a stream with `--replicas` replicas on file storage on the
//! given server(s), `--messages` messages of about the size of one of our
//! events as JSON, published first (each publish acknowledged by the
//! stream); then one durable pull consumer with explicit acks,
//! `max-ack-pending` = consumers × in-flight, drained by `--consumers`
//! tasks that each fetch batches of `--max-in-flight` and acknowledge every
//! message with a double ack (the server confirms the ack, as our answer
//! is confirmed). Reports messages drained per second.
//!
//! Durability: nats-server 2.9 (Debian 12's) does not fsync each write; a
//! stream's file store is synced every 2 minutes, where our DC fsyncs every
//! log entry before it answers. The like-for-like run is a 2.10+ server
//! configured with `sync_interval: always` (see `benches/run.sh`);
//! `--label` names which one the figures come from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;

/// Arguments of `jetstream-bench`.
#[derive(Parser)]
struct JetStreamArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Messages in the backlog.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Consumer tasks.
    #[arg(long, default_value_t = 8)]
    consumers: usize,
    /// Messages fetched per batch (unanswered per consumer at most).
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Stream replicas (3 on a 3-server cluster, like our 3-node DC).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// The server's version and sync setting, printed with the figures.
    #[arg(long, default_value = "nats-server")]
    label: String,
}

/// A message body the size of one of our events as JSON.
fn body(i: usize) -> Vec<u8> {
    json!({
        "event_id": format!("{i:032x}"),
        "rule": "bench",
        "queue": "bench",
        "attempt": 1,
        "message": {
            "id": format!("{i:032x}"),
            "mailbox": "/bench",
            "name": format!("e{i}"),
            "size": 1024,
            "sha256": "0".repeat(64),
            "origin_dc": "bench",
        },
    })
    .to_string()
    .into_bytes()
}

/// Runs the baseline; returns its figures as JSON.
async fn run(a: JetStreamArgs) -> anyhow::Result<serde_json::Value> {
    // The servers were just started: they may not listen yet.
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        match async_nats::connect(a.url.as_str()).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("jetstream: {} not up yet ({e}), retrying", a.url);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", a.url)),
        }
    };
    let js = jetstream::new(client);
    // A cluster just started elects its JetStream leader first.
    let s = loop {
        let _ = js.delete_stream("BENCH").await;
        match js
            .create_stream(stream::Config {
                name: "BENCH".into(),
                subjects: vec!["bench.>".into()],
                storage: stream::StorageType::File,
                num_replicas: a.replicas,
                ..Default::default()
            })
            .await
        {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("jetstream: not ready ({e}), retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("creating the stream: {e}")),
        }
    };

    // The backlog: every publish acknowledged by the stream, 64 at once.
    let t0 = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (js, next, n) = (js.clone(), next.clone(), a.messages as u64);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                js.publish(format!("bench.{}", i % 64), body(i as usize).into())
                    .await?
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let publish_rate = a.messages as f64 / t0.elapsed().as_secs_f64();
    eprintln!(
        "jetstream: {} messages published ({publish_rate:.0}/s)",
        a.messages
    );

    let c: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("drain".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: (a.consumers * a.max_in_flight) as i64,
            ..Default::default()
        })
        .await
        .context("creating the consumer")?;
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.consumers {
        let (c, done, n, batch) = (c.clone(), done.clone(), a.messages as u64, a.max_in_flight);
        tasks.push(tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < n {
                let mut msgs = c
                    .fetch()
                    .max_messages(batch)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await
                    .map_err(|e| anyhow::anyhow!("fetch: {e}"))?;
                let mut acks = Vec::new();
                while let Some(m) = msgs.next().await {
                    let m = m.map_err(|e| anyhow::anyhow!("message: {e}"))?;
                    let done = done.clone();
                    acks.push(async move {
                        m.double_ack()
                            .await
                            .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
                        done.fetch_add(1, Ordering::Relaxed);
                        anyhow::Ok(())
                    });
                }
                for r in futures::future::join_all(acks).await {
                    r?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let drained = done.load(Ordering::Relaxed);
    let _ = js.delete_stream("BENCH").await;
    Ok(json!({
        "bench": "jetstream",
        "settings": format!(
            "{}, stream R{} file storage, durable pull consumer, explicit acks (double ack), {} consumers fetching {} at a time",
            a.label, a.replicas, a.consumers, a.max_in_flight
        ),
        "messages": a.messages,
        "published_per_sec": publish_rate.round(),
        "drained": drained,
        "drain_secs": (secs * 10.0).round() / 10.0,
        "drained_per_sec": (drained as f64 / secs).round(),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let out = run(JetStreamArgs::parse()).await?;
    println!("{out}");
    Ok(())
}
