//! `mailbox-bench`: load generator for a running DC (or, as a baseline in
//! the same run, an etcd cluster), and cross-DC replication benchmarks that
//! start their own two-DC cluster (`repl-latency`, `repl-lag`, `catch-up`).
//! Prints one JSON object per run.

mod events;
mod repl;

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use mailbox_client::{Client, PutOptions};
use mailbox_proto::etcd::kv_client::KvClient;
use mailbox_proto::etcd::PutRequest as EtcdPut;
use mailbox_testkit::PatternReader;
use mailbox_types::ByteSize;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "mailbox-bench",
    about = "Load generator for the mailbox cluster"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Target {
    Mailbox,
    Etcd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Many small uploads from concurrent clients for a fixed time.
    Small {
        /// Node addresses (host:port), comma-separated; requests go round-robin.
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        /// What to drive.
        #[arg(long, value_enum, default_value = "mailbox")]
        target: Target,
        /// Payload size.
        #[arg(long, default_value = "1KiB")]
        size: ByteSize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// gRPC connections shared by the clients.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Measurement time after a 2s warm-up.
        #[arg(long, default_value = "20s")]
        duration: mailbox_types::HumanDuration,
        /// Mailbox to upload into (created if missing).
        #[arg(long, default_value = "/bench")]
        mailbox: String,
        /// Keep each connection on the node it was given instead of the
        /// leader the client finds (measures followers forwarding writes).
        #[arg(long)]
        spread: bool,
        /// How the clients are routed, for the report (default: `leader`
        /// for ours unless `--spread`; `spread` for etcd over several
        /// endpoints); e.g. `leader` for etcd given only its leader.
        #[arg(long)]
        routing: Option<String>,
    },
    /// One large streamed upload.
    Large {
        /// Node address.
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        /// Payload size.
        #[arg(long, default_value = "1GiB")]
        size: ByteSize,
        /// Mailbox to upload into (created if missing).
        #[arg(long, default_value = "/bench")]
        mailbox: String,
    },
    /// Two DCs over an emulated RTT: ack latency, `delayed` vs `immediate`.
    ReplLatency(repl::LatencyArgs),
    /// Two DCs over an emulated RTT: replication lag (ack → complete in
    /// all DCs) at half the maximum upload throughput.
    ReplLag(repl::LagArgs),
    /// Two DCs over an emulated RTT: catching up the backlog of an outage
    /// under load, against one stream through the same link.
    CatchUp(repl::CatchUpArgs),
    /// Replication-complete events on a running DC: drain a backlog made
    /// by `rules evaluate` with gRPC consumers, then delivery latency
    /// under steady uploads.
    Events(events::EventsArgs),
}

/// `len` pseudo-random bytes from `seed` (xorshift64*).
fn random_payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

enum Conn {
    Mailbox(Client),
    Etcd(KvClient<tonic::transport::Channel>),
}

async fn connect(target: Target, ep: &str, spread: bool) -> anyhow::Result<Conn> {
    let eps = [ep.to_string()];
    Ok(match target {
        Target::Mailbox if spread => Conn::Mailbox(Client::connect_any(&eps).await?),
        Target::Mailbox => Conn::Mailbox(Client::connect(&eps).await?),
        Target::Etcd => Conn::Etcd(KvClient::connect(format!("http://{ep}")).await?),
    })
}

async fn one_put(conn: &Conn, mailbox: &str, key: String, payload: Vec<u8>) -> anyhow::Result<()> {
    match conn {
        Conn::Mailbox(c) => {
            c.put_bytes(
                PutOptions {
                    mailbox: mailbox.into(),
                    name: key,
                    ..Default::default()
                },
                payload,
            )
            .await?;
        }
        Conn::Etcd(c) => {
            c.clone()
                .put(EtcdPut {
                    key: key.into_bytes().into(),
                    value: payload.into(),
                    ..Default::default()
                })
                .await?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn small(
    endpoints: Vec<String>,
    target: Target,
    size: u64,
    concurrency: usize,
    connections: usize,
    duration: Duration,
    mailbox: String,
    spread: bool,
    routing: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(!endpoints.is_empty(), "--endpoints is required");
    let mut conns = Vec::new();
    for i in 0..connections.max(1) {
        conns.push(std::sync::Arc::new(
            connect(target, &endpoints[i % endpoints.len()], spread).await?,
        ));
    }
    if let Conn::Mailbox(c) = conns[0].as_ref() {
        c.mkdir(&mailbox, true)
            .await
            .context("create bench mailbox")?;
    }
    let warmup = Duration::from_secs(2);
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + duration;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let conn = conns[w % conns.len()].clone();
        let mailbox = mailbox.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut seq = 0u64;
            // Incompressible, as partners' files mostly are: a payload
            // of one repeated byte would flatter RocksDB's compression.
            let payload = random_payload(w as u64 + 1, size as usize);
            loop {
                let t0 = Instant::now();
                if t0 >= stop_at {
                    break;
                }
                seq += 1;
                let r = one_put(&conn, &mailbox, format!("k{w}-{seq}"), payload.clone()).await;
                if t0 >= measure_from {
                    match r {
                        Ok(()) => lat.push(t0.elapsed().as_micros() as u64),
                        Err(_) => errors += 1,
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    lat.sort_unstable();
    let secs = duration.as_secs_f64();
    let ops = lat.len() as f64;
    Ok(json!({
        "kind": "small",
        "target": if target == Target::Mailbox { "mailbox" } else { "etcd" },
        "routing": routing.unwrap_or_else(|| {
            let spread = spread || (target == Target::Etcd && endpoints.len() > 1);
            if spread { "spread" } else { "leader" }.to_string()
        }),
        "size_bytes": size,
        "concurrency": concurrency,
        "seconds": secs,
        "ops": lat.len(),
        "errors": errors,
        "ops_per_sec": ops / secs,
        "mb_per_sec": ops * size as f64 / secs / 1e6,
        "p50_ms": percentile(&lat, 0.50),
        "p99_ms": percentile(&lat, 0.99),
        "p999_ms": percentile(&lat, 0.999),
    }))
}

async fn large(
    endpoints: Vec<String>,
    size: u64,
    mailbox: String,
) -> anyhow::Result<serde_json::Value> {
    let c = Client::connect(&endpoints).await?;
    c.mkdir(&mailbox, true).await?;
    let t0 = Instant::now();
    let r = c
        .put(
            PutOptions {
                mailbox,
                name: format!("large-{}", mailbox_types::now_ms()),
                ..Default::default()
            },
            PatternReader::new(7, size),
            |_| {},
        )
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    let m = r.message.context("no message")?;
    Ok(json!({
        "kind": "large",
        "target": "mailbox",
        "id": m.id,
        "size_bytes": size,
        "seconds": secs,
        "mb_per_sec": size as f64 / secs / 1e6,
        "segments": m.segments.len(),
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let out = match Cli::parse().cmd {
        Cmd::Small {
            endpoints,
            target,
            size,
            concurrency,
            connections,
            duration,
            mailbox,
            spread,
            routing,
        } => {
            small(
                endpoints,
                target,
                size.0,
                concurrency,
                connections,
                duration.0,
                mailbox,
                spread,
                routing,
            )
            .await?
        }
        Cmd::Large {
            endpoints,
            size,
            mailbox,
        } => large(endpoints, size.0, mailbox).await?,
        Cmd::ReplLatency(a) => repl::latency(a).await?,
        Cmd::ReplLag(a) => repl::lag(a).await?,
        Cmd::CatchUp(a) => repl::catch_up(a).await?,
        Cmd::Events(a) => events::run(a).await?,
    };
    println!("{out}");
    Ok(())
}
