//! Cross-DC replication benchmarks (issue #3). Each subcommand starts its
//! own cluster of two DCs (`east`, the origin of every upload, and `west`)
//! of real `mailboxd` processes with the test kit, whose inter-DC links run
//! through user-space proxies that add half the emulated RTT in each
//! direction. Clients talk to `east` directly (no emulated delay).
//!
//! - `repl-latency`: ack latency of uploads, `delayed` vs `immediate`.
//! - `repl-lag`: replication lag (ack → complete in all DCs) at half of the
//!   measured maximum upload throughput.
//! - `catch-up`: draining the backlog of an outage, against one stream
//!   through the same link, and how catch-up time scales.
//!
//! Every wait for replication watches state (stat, replication status);
//! the only timed sleeps are the load schedule and the outage itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use mailbox_client::{Client, PutOptions};
use mailbox_proto::v1::{MessageInfo, ReplicationStatusResponse};
use mailbox_testkit::{wait_for, DcOptions, PatternReader, TestCluster};
use mailbox_types::{ByteSize, HumanDuration};
use serde_json::{json, Value};
use tokio::task::JoinSet;

const ORIGIN: &str = "east";
const REMOTE: &str = "west";
const MAILBOX: &str = "/bench";

/// The cluster every replication benchmark starts.
#[derive(clap::Args, Clone)]
pub struct ClusterArgs {
    /// Emulated round-trip time between the DCs (half of it each way).
    #[arg(long, default_value = "20ms")]
    pub rtt: HumanDuration,
    /// Nodes per DC.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Inline threshold of both DCs.
    #[arg(long, default_value = "64KiB")]
    pub inline_threshold: ByteSize,
    /// Segment size of both DCs.
    #[arg(long, default_value = "8MiB")]
    pub segment_size: ByteSize,
}

/// Arguments of `repl-latency`.
#[derive(clap::Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Uploads of each mode (after 3 warm-up pairs).
    #[arg(long, default_value_t = 50)]
    pub count: usize,
    /// Payload size.
    #[arg(long, default_value = "1MiB")]
    pub size: ByteSize,
}

/// Arguments of `repl-lag`.
#[derive(clap::Args)]
pub struct LagArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Payload size.
    #[arg(long, default_value = "1MiB")]
    pub size: ByteSize,
    /// Concurrent uploaders while measuring the maximum throughput.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// How long to measure the maximum throughput (after a 2 s warm-up).
    #[arg(long, default_value = "10s")]
    pub max_duration: HumanDuration,
    /// How long to drive the steady load at half the maximum.
    #[arg(long, default_value = "30s")]
    pub duration: HumanDuration,
    /// Size of the single-stream transfer that gives the transfer time.
    #[arg(long, default_value = "256MiB")]
    pub baseline_size: ByteSize,
    /// Drive this many uploads/s instead of half the measured maximum
    /// (the maximum is still measured and reported).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Send every upload to the origin's leader, as `Client::connect`
    /// (the CLI, every SDK user) does; by default uploads are spread over
    /// the origin's nodes and followers forward them.
    #[arg(long)]
    pub leader_only: bool,
}

/// Arguments of `catch-up`.
#[derive(clap::Args)]
pub struct CatchUpArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Outage of rounds A and B (round C is twice as long).
    #[arg(long, default_value = "10m")]
    pub outage: HumanDuration,
    /// Uploads per second into the origin, during the outage and after.
    #[arg(long, default_value_t = 8.0)]
    pub rate: f64,
    /// Every n-th upload is large (segmented); the others are small (inline).
    #[arg(long, default_value_t = 4)]
    pub large_every: u64,
    /// Smallest large upload.
    #[arg(long, default_value = "1MiB")]
    pub large_min: ByteSize,
    /// Largest large upload.
    #[arg(long, default_value = "3MiB")]
    pub large_max: ByteSize,
    /// Size of small uploads.
    #[arg(long, default_value = "4KiB")]
    pub small_size: ByteSize,
    /// Before round B, replicate this many times what both DCs hold after
    /// round A (same mix), so that B catches up the same backlog on top of
    /// several times more data already held.
    #[arg(long, default_value_t = 3.0)]
    pub held_factor: f64,
    /// Size of the single-stream transfer (the baseline).
    #[arg(long, default_value = "512MiB")]
    pub baseline_size: ByteSize,
    /// Keep uploading at the same rate while the backlog drains.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub load_during_catchup: bool,
    /// Which rounds to run: `A` alone (one outage, e.g. a long one), or
    /// `A,B,C` (the comparison against data held and backlog size).
    #[arg(long, default_value = "A,B,C", value_delimiter = ',')]
    pub rounds: Vec<String>,
}

fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The `p` quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// p50/p99/mean/min/max of milliseconds.
fn summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    json!({
        "n": ms.len(),
        "p50_ms": round3(quantile(&ms, 0.50)),
        "p99_ms": round3(quantile(&ms, 0.99)),
        "mean_ms": round3(mean),
        "min_ms": round3(ms.first().copied().unwrap_or(0.0)),
        "max_ms": round3(ms.last().copied().unwrap_or(0.0)),
    })
}

fn p(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

async fn put(
    c: &Client,
    name: String,
    seed: u64,
    size: u64,
    ack: &str,
) -> anyhow::Result<MessageInfo> {
    let r = c
        .put(
            PutOptions {
                mailbox: MAILBOX.into(),
                name,
                ack: Some(ack.into()),
                ..Default::default()
            },
            PatternReader::new(seed, size),
            |_| {},
        )
        .await?;
    r.message.context("put without message")
}

/// A running two-DC cluster with clients.
struct Bench {
    cluster: TestCluster,
    /// One client per origin node, the leader first.
    origin: Vec<Client>,
    /// The remote DC's leader.
    remote: Client,
    rtt: Duration,
    /// Leader node ids at start, (origin, remote). The other DC's feed is
    /// served by the node behind the first proxy (node 1), which may be a
    /// follower.
    leaders: (u64, u64),
    /// The remote DC's data directory (its disk is where catch-up writes).
    remote_dir: std::path::PathBuf,
}

impl Bench {
    async fn start(args: &ClusterArgs) -> anyhow::Result<Self> {
        let opts = DcOptions {
            nodes: args.nodes,
            inline_threshold: args.inline_threshold.to_string(),
            segment_size: args.segment_size.to_string(),
            ..Default::default()
        };
        eprintln!(
            "# starting DCs {ORIGIN} and {REMOTE}, {} nodes each",
            args.nodes
        );
        let mut cluster = TestCluster::start(&[ORIGIN, REMOTE], opts, "").await?;
        let east = cluster.dc(ORIGIN);
        let leader = east.wait_leader(Duration::from_secs(30)).await?;
        let mut origin = vec![east.client_of(leader).await?];
        let ids: Vec<u64> = east.nodes.iter().map(|n| n.id).collect();
        for id in ids.into_iter().filter(|id| *id != leader) {
            origin.push(east.client_of(id).await?);
        }
        let west = cluster.dc(REMOTE);
        let wl = west.wait_leader(Duration::from_secs(30)).await?;
        let remote = west.client_of(wl).await?;
        let remote_dir = west.dir().to_path_buf();
        origin[0].mkdir(MAILBOX, true).await?;
        let rtt = args.rtt.0;
        cluster.set_delay(rtt / 2);
        let b = Self {
            cluster,
            origin,
            remote,
            rtt,
            leaders: (leader, wl),
            remote_dir,
        };
        b.wait_synced(Duration::from_secs(60)).await?;
        eprintln!("# cluster up, link RTT {rtt:?}");
        Ok(b)
    }

    fn leaders_json(&self) -> Value {
        json!({ ORIGIN: self.leaders.0, REMOTE: self.leaders.1 })
    }

    async fn statuses(&self) -> Option<(ReplicationStatusResponse, ReplicationStatusResponse)> {
        let e = self.origin[0].replication_status().await.ok()?;
        let w = self.remote.replication_status().await.ok()?;
        Some((e, w))
    }

    /// Both DCs applied each other's whole feed and hold every payload.
    async fn wait_synced(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        wait_for(timeout, "both DCs synced", move || async move {
            let (e, w) = self.statuses().await?;
            let cursor = |s: &ReplicationStatusResponse, dc: &str| {
                s.remotes.iter().find(|r| r.dc == dc).map(|r| r.cursor)
            };
            let ok = e.pending_messages == 0
                && w.pending_messages == 0
                && cursor(&e, REMOTE)? >= w.feed_head
                && cursor(&w, ORIGIN)? >= e.feed_head;
            ok.then_some(())
        })
        .await?;
        Ok(t0.elapsed())
    }

    /// Waits until the origin records `id` complete in all DCs; returns
    /// `complete_ms`.
    async fn wait_complete(&self, id: &str, timeout: Duration) -> anyhow::Result<i64> {
        wait_for(timeout, "message complete in all DCs", move || async move {
            let s = self.origin[0].stat_local(id).await.ok()?;
            (s.complete_ms != 0).then_some(s.complete_ms)
        })
        .await
    }

    /// One stream through the emulated link: a download of a `size`
    /// message stored in the origin, by a client connected to the origin
    /// through the remote DC's proxies, i.e. the path and RPC (`Get`) the
    /// remote's segment fetcher uses.
    async fn single_stream(&self, size: u64) -> anyhow::Result<Value> {
        let m = put(
            &self.origin[0],
            format!("baseline-{}", wall_us()),
            11,
            size,
            "delayed",
        )
        .await?;
        // Its own replication must not compete with the measurement.
        self.wait_synced(Duration::from_secs(600)).await?;
        // `connect_any`: the leader lookup of `connect` would hand back
        // the leader's direct address and bypass the emulated link.
        let via = Client::connect_any(&self.cluster.link_endpoints(REMOTE, ORIGIN)).await?;
        let t0 = Instant::now();
        let got = via
            .get_to(&m.id, 0, 0, &mut tokio::io::sink(), |_, _| {})
            .await?;
        let secs = t0.elapsed().as_secs_f64();
        anyhow::ensure!(got.bytes == size, "short baseline download");
        // The same stream landing durably on the remote's disk, as a
        // replica must: written to a file there and fsynced (what `scp`
        // or `curl -o` then `sync` of one file would achieve).
        let path = self.remote_dir.join("baseline-download");
        let mut file = tokio::fs::File::create(&path).await?;
        let t0 = Instant::now();
        let got = via.get_to(&m.id, 0, 0, &mut file, |_, _| {}).await?;
        file.sync_all().await?;
        let disk_secs = t0.elapsed().as_secs_f64();
        drop(file);
        tokio::fs::remove_file(&path).await?;
        anyhow::ensure!(got.bytes == size, "short baseline download");
        Ok(json!({
            "kind": "single-stream",
            "what": "Get of one message from the origin through the remote's link proxy; to memory, then to a file on the remote's disk with fsync",
            "size_bytes": size,
            "seconds": round3(secs),
            "mb_per_sec": round3(size as f64 / secs / 1e6),
            "to_disk_seconds": round3(disk_secs),
            "to_disk_mb_per_sec": round3(size as f64 / disk_secs / 1e6),
        }))
    }
}

/// Ack latency, `delayed` vs `immediate`: sequential uploads into the
/// origin's leader, alternating the mode (and which goes first) so noise
/// hits both alike; before each upload the previous one is complete in
/// both DCs, so each starts on an idle link.
pub async fn latency(args: LatencyArgs) -> anyhow::Result<Value> {
    let b = Bench::start(&args.cluster).await?;
    let size = args.size.0;
    const WARMUP: usize = 3;
    let mut lat: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    // Per mode, where the time goes (wall clock, ms): start of the upload
    // → the origin stamped it (all bytes in, segments written, about to
    // propose); → the remote held it (remote's holder time, = complete_ms);
    // and the ack relative to that.
    let mut phases: BTreeMap<&str, [Vec<f64>; 3]> = BTreeMap::new();
    let mut paired = Vec::new();
    let mut seed = 100;
    for i in 0..WARMUP + args.count {
        let order = if i % 2 == 0 {
            ["delayed", "immediate"]
        } else {
            ["immediate", "delayed"]
        };
        let mut pair = BTreeMap::new();
        for mode in order {
            seed += 1;
            let start_us = wall_us();
            let t0 = Instant::now();
            let m = put(&b.origin[0], format!("lat-{mode}-{i}"), seed, size, mode).await?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let ack_us = wall_us();
            let complete_ms = b.wait_complete(&m.id, Duration::from_secs(60)).await?;
            if i >= WARMUP {
                lat.entry(mode).or_default().push(ms);
                pair.insert(mode, ms);
                let ph = phases.entry(mode).or_default();
                ph[0].push((m.created_ms * 1000 - start_us) as f64 / 1e3);
                ph[1].push((complete_ms - m.created_ms) as f64);
                ph[2].push((ack_us - complete_ms * 1000) as f64 / 1e3);
            }
        }
        if i >= WARMUP {
            paired.push(pair["immediate"] - pair["delayed"]);
        }
    }
    let delayed = summary(lat.remove("delayed").unwrap_or_default());
    let immediate = summary(lat.remove("immediate").unwrap_or_default());
    let rtt_ms = b.rtt.as_secs_f64() * 1e3;
    let diff_p50 = p(&immediate, "p50_ms") - p(&delayed, "p50_ms");
    let target = rtt_ms + 10.0;
    let paired = summary(paired);
    let phases: BTreeMap<&str, Value> = phases
        .into_iter()
        .map(|(mode, [up, remote, ack])| {
            let p50 = |v: Vec<f64>| p(&summary(v), "p50_ms");
            let v = json!({
                "start_to_stamped_p50_ms": p50(up),
                "stamped_to_remote_held_p50_ms": p50(remote),
                "remote_held_to_ack_p50_ms": p50(ack),
            });
            (mode, v)
        })
        .collect();
    Ok(json!({
        "kind": "repl-latency",
        "rtt_ms": rtt_ms,
        "leaders": b.leaders_json(),
        "size_bytes": size,
        "delayed": delayed,
        "immediate": immediate,
        "diff_p50_ms": round3(diff_p50),
        "diff_p99_ms": round3(p(&immediate, "p99_ms") - p(&delayed, "p99_ms")),
        "paired_diff": paired,
        "phases": phases,
        "diff_in_rtts": round3(diff_p50 / rtt_ms),
        "target_diff_p50_ms": target,
        "target_met": diff_p50 <= target,
    }))
}

/// Closed-loop uploads of `size` from `concurrency` workers spread over the
/// origin's nodes: acknowledged uploads per second over `duration`, after
/// a 2 s warm-up.
async fn max_throughput(
    b: &Bench,
    clients: &[Client],
    size: u64,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let start = Instant::now();
    let from = start + Duration::from_secs(2);
    let until = from + duration;
    let mut tasks = JoinSet::new();
    for w in 0..concurrency {
        let c = clients[w % clients.len()].clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            for i in 0u64.. {
                let t0 = Instant::now();
                if t0 >= until {
                    break;
                }
                let seed = w as u64 * 1_000_000 + i;
                let r = put(&c, format!("max-{w}-{i}"), seed, size, "delayed").await;
                if t0 >= from && Instant::now() <= until {
                    match r {
                        Ok(_) => lat.push(t0.elapsed().as_secs_f64() * 1e3),
                        Err(e) => {
                            errors += 1;
                            eprintln!("# upload failed: {e}");
                        }
                    }
                }
            }
            (lat, errors)
        });
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    let ok = lat.len();
    let secs = duration.as_secs_f64();
    let drain = b.wait_synced(Duration::from_secs(600)).await?;
    Ok(json!({
        "ops_per_sec": round3(ok as f64 / secs),
        "mb_per_sec": round3(ok as f64 * size as f64 / secs / 1e6),
        "concurrency": concurrency,
        "seconds": secs,
        "errors": errors,
        "ack_latency": summary(lat),
        "replication_drained_after_s": round3(drain.as_secs_f64()),
    }))
}

/// Replication lag at half the maximum throughput: per message, the
/// origin's all-DCs-complete time (`complete_ms`, the remote's holder
/// time) minus the client's ack time (wall clock of the same machine).
pub async fn lag(args: LagArgs) -> anyhow::Result<Value> {
    let b = Bench::start(&args.cluster).await?;
    let size = args.size.0;
    eprintln!("# maximum throughput of {} delayed uploads", args.size);
    let clients = if args.leader_only {
        &b.origin[..1]
    } else {
        &b.origin[..]
    };
    let max = max_throughput(&b, clients, size, args.concurrency, args.max_duration.0).await?;
    let rate = args.rate.unwrap_or(p(&max, "ops_per_sec") / 2.0);
    anyhow::ensure!(
        rate > 0.0,
        "no upload succeeded while measuring the maximum"
    );
    eprintln!("# steady load at {rate:.1} uploads/s");
    let period = Duration::from_secs_f64(1.0 / rate);
    let n = (args.duration.0.as_secs_f64() * rate).ceil() as u64;
    let t0 = tokio::time::Instant::now();
    let late = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for k in 0..n {
        let due = t0 + period.mul_f64(k as f64);
        tokio::time::sleep_until(due).await;
        let c = clients[k as usize % clients.len()].clone();
        let late = late.clone();
        tasks.spawn(async move {
            if due.elapsed() > period {
                late.fetch_add(1, Ordering::Relaxed);
            }
            let m = put(&c, format!("lag-{k}"), 5_000_000 + k, size, "delayed").await;
            (m, wall_us())
        });
    }
    let mut acked = Vec::new();
    let mut errors = 0u64;
    while let Some(r) = tasks.join_next().await {
        match r? {
            (Ok(m), ack_us) => acked.push((m.id, ack_us)),
            (Err(e), _) => {
                errors += 1;
                eprintln!("# upload failed: {e}");
            }
        }
    }
    acked.sort_by_key(|(_, at)| *at);
    let mut lags = Vec::new();
    let mut last_complete_us = 0;
    for (id, ack_us) in &acked {
        let complete_ms = b.wait_complete(id, Duration::from_secs(600)).await?;
        lags.push((complete_ms * 1000 - ack_us) as f64 / 1e3);
        last_complete_us = last_complete_us.max(complete_ms * 1000);
    }
    // From the first ack to the last completion: the rate replication
    // achieved (its capacity when it could not keep up).
    let first_ack_us = acked.first().map(|(_, at)| *at).unwrap_or(0);
    let replicated_per_sec =
        acked.len() as f64 / ((last_complete_us - first_ack_us).max(1) as f64 / 1e6);
    let half = lags.len() / 2;
    let first_half = summary(lags[..half].to_vec());
    let second_half = summary(lags[half..].to_vec());
    let all = summary(lags);
    eprintln!("# single-stream transfer through the link");
    let single = b.single_stream(args.baseline_size.0).await?;
    let rtt_ms = b.rtt.as_secs_f64() * 1e3;
    let transfer_ms = size as f64 / (p(&single, "mb_per_sec") * 1e6) * 1e3;
    let target = 2.0 * rtt_ms + transfer_ms;
    Ok(json!({
        "kind": "repl-lag",
        "routing": if args.leader_only { "leader" } else { "spread" },
        "rtt_ms": rtt_ms,
        "leaders": b.leaders_json(),
        "size_bytes": size,
        "max": max,
        "rate_per_sec": round3(rate),
        "replicated_per_sec": round3(replicated_per_sec),
        "seconds": args.duration.0.as_secs_f64(),
        "uploads": acked.len(),
        "late_starts": late.load(Ordering::Relaxed),
        "errors": errors,
        "lag": all,
        "lag_first_half": first_half,
        "lag_second_half": second_half,
        "single_stream": single,
        "transfer_ms": round3(transfer_ms),
        "target_p99_ms": round3(target),
        "target_met": p(&all, "p99_ms") <= target,
    }))
}

/// One acknowledged upload of the catch-up load.
#[derive(Clone)]
struct Acked {
    id: String,
    size: u64,
    large: bool,
    ack_us: i64,
}

/// Open-loop uploads at a steady rate until stopped, a mix of small inline
/// and large segmented messages.
struct Load {
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    late: Arc<AtomicU64>,
    driver: tokio::task::JoinHandle<()>,
}

/// What the catch-up load uploads.
#[derive(Clone, Copy)]
struct Mix {
    rate: f64,
    large_every: u64,
    large_min: u64,
    large_max: u64,
    small: u64,
}

impl Mix {
    /// Size of upload `k`, and whether it is large.
    fn size(&self, k: u64) -> (u64, bool) {
        if self.large_every > 0 && k.is_multiple_of(self.large_every) {
            let span = self.large_max.saturating_sub(self.large_min) + 1;
            // A fixed scramble of k: sizes vary but every run is the same.
            let r = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17;
            (self.large_min + r % span, true)
        } else {
            (self.small, false)
        }
    }
}

impl Load {
    fn start(clients: Vec<Client>, mix: Mix, first: u64) -> Self {
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let late = Arc::new(AtomicU64::new(0));
        let (a, s, e, l) = (acked.clone(), stop.clone(), errors.clone(), late.clone());
        let driver = tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / mix.rate);
            let t0 = tokio::time::Instant::now();
            let mut tasks = JoinSet::new();
            for i in 0u64.. {
                let due = t0 + period.mul_f64(i as f64);
                tokio::time::sleep_until(due).await;
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if due.elapsed() > period {
                    l.fetch_add(1, Ordering::Relaxed);
                }
                let k = first + i;
                let (size, large) = mix.size(k);
                let c = clients[k as usize % clients.len()].clone();
                let (a, e) = (a.clone(), e.clone());
                tasks.spawn(async move {
                    match put(&c, format!("cu-{k}"), k, size, "delayed").await {
                        Ok(m) => a.lock().expect("lock").push(Acked {
                            id: m.id,
                            size,
                            large,
                            ack_us: wall_us(),
                        }),
                        Err(err) => {
                            e.fetch_add(1, Ordering::Relaxed);
                            eprintln!("# upload failed: {err}");
                        }
                    }
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        });
        Self {
            acked,
            stop,
            errors,
            late,
            driver,
        }
    }

    /// Uploads acknowledged so far.
    fn snapshot(&self) -> Vec<Acked> {
        self.acked.lock().expect("lock").clone()
    }

    /// Stops issuing uploads and waits for those in flight.
    async fn stop(self) -> anyhow::Result<(Vec<Acked>, u64, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.driver.await?;
        let acked = std::mem::take(&mut *self.acked.lock().expect("lock"));
        Ok((
            acked,
            self.errors.load(Ordering::Relaxed),
            self.late.load(Ordering::Relaxed),
        ))
    }
}

/// Totals of what both DCs already hold.
#[derive(Default, Clone, Copy)]
struct Held {
    messages: u64,
    bytes: u64,
}

impl Held {
    fn add(&mut self, acked: &[Acked]) {
        self.messages += acked.len() as u64;
        self.bytes += acked.iter().map(|a| a.size).sum::<u64>();
    }
}

/// State of the catch-up bench between rounds.
struct CatchUp {
    b: Bench,
    mix: Mix,
    next: u64,
    held: Held,
    load_during_catchup: bool,
}

impl CatchUp {
    fn remote_cursor(w: &ReplicationStatusResponse) -> Option<u64> {
        w.remotes.iter().find(|r| r.dc == ORIGIN).map(|r| r.cursor)
    }

    /// Closed-loop uploads of the same mix, as fast as 8 clients go, until
    /// `bytes` are stored; then waits until both DCs hold them.
    async fn prefill(&mut self, bytes: u64) -> anyhow::Result<Value> {
        let t0 = Instant::now();
        let mut tasks = JoinSet::new();
        let mut done = Vec::new();
        let mut total = 0u64;
        while total < bytes {
            let k = self.next;
            self.next += 1;
            let (size, large) = self.mix.size(k);
            total += size;
            let c = self.b.origin[k as usize % self.b.origin.len()].clone();
            tasks.spawn(async move {
                let m = put(&c, format!("held-{k}"), k, size, "delayed").await?;
                anyhow::Ok(Acked {
                    id: m.id,
                    size,
                    large,
                    ack_us: wall_us(),
                })
            });
            while tasks.len() >= 8 {
                if let Some(r) = tasks.join_next().await {
                    done.push(r??);
                }
            }
        }
        while let Some(r) = tasks.join_next().await {
            done.push(r??);
        }
        self.b.wait_synced(Duration::from_secs(3600)).await?;
        self.held.add(&done);
        Ok(json!({
            "messages": done.len(),
            "bytes": total,
            "seconds_incl_replication": round3(t0.elapsed().as_secs_f64()),
        }))
    }

    /// Cuts the link for `outage` under load, heals it and measures how the
    /// remote drains the backlog.
    async fn round(&mut self, name: &str, outage: Duration) -> anyhow::Result<Value> {
        self.b.wait_synced(Duration::from_secs(3600)).await?;
        let held_before = self.held;
        let (_, w) = self.b.statuses().await.context("status")?;
        let cursor0 = Self::remote_cursor(&w).context("no cursor")?;
        eprintln!("# round {name}: outage {outage:?} under load");
        self.b.cluster.cut(ORIGIN, REMOTE);
        let load = Load::start(self.b.origin.clone(), self.mix, self.next);
        tokio::time::sleep(outage).await;
        // Without load during catch-up, the load stops (and its uploads in
        // flight finish) before the heal; otherwise it keeps going and the
        // backlog is what was acknowledged before the heal.
        let (backlog, running, stopped) = if self.load_during_catchup {
            (load.snapshot(), Some(load), None)
        } else {
            let stopped = load.stop().await?;
            (stopped.0.clone(), None, Some(stopped))
        };
        let (e, _) = self.b.statuses().await.context("status")?;
        let head = e.feed_head;
        let heal_us = wall_us();
        self.b.cluster.heal(ORIGIN, REMOTE);
        eprintln!(
            "# round {name}: healed, backlog {} messages, {} feed records",
            backlog.len(),
            head - cursor0
        );
        let mut first_progress_us = None;
        let mut feed_done_us = None;
        // The last poll that saw the remote's pull not (yet) connected
        // after the heal: the drain is timed from there, so the transfer
        // of the first batch counts (conservatively: up to one poll
        // interval early).
        let mut not_connected_us = heal_us;
        let mut connected = false;
        let mut held_us_max = 0i64;
        let mut held_us_min = i64::MAX;
        let mut frontier = 0;
        let deadline = Instant::now() + Duration::from_secs(3600).max(outage * 8);
        loop {
            anyhow::ensure!(Instant::now() < deadline, "catch-up did not finish");
            // Status reads every pending message's metadata on the node,
            // so it is polled only until the feed has caught up.
            let status = match feed_done_us {
                None => self.b.remote.replication_status().await.ok(),
                Some(_) => None,
            };
            if let Some(w) = status {
                let now = wall_us();
                let c = Self::remote_cursor(&w).unwrap_or(0);
                let state = w
                    .remotes
                    .iter()
                    .find(|r| r.dc == ORIGIN)
                    .map(|r| r.state.as_str());
                connected = connected || state == Some("connected") || c > cursor0;
                if !connected {
                    not_connected_us = now;
                }
                if first_progress_us.is_none() && c > cursor0 {
                    first_progress_us = Some(now);
                }
                if feed_done_us.is_none() && c >= head {
                    feed_done_us = Some(now);
                }
            }
            // Payloads: walk the backlog in order; a message counts once
            // the remote holds it whole, at the remote's own holder time.
            while let Some(a) = backlog.get(frontier) {
                // Local: asking every DC per message would make this walk,
                // not the replication, the slow part (and starve the
                // status poll above).
                let Ok(s) = self.b.remote.stat_local(&a.id).await else {
                    break;
                };
                if s.payload_pending {
                    break;
                }
                let at = s
                    .replicas
                    .iter()
                    .find(|r| r.dc == REMOTE)
                    .map(|r| r.held_since_ms)
                    .context("held without a replica entry")?;
                held_us_max = held_us_max.max(at * 1000);
                held_us_min = held_us_min.min(at * 1000);
                frontier += 1;
            }
            if feed_done_us.is_some() && frontier == backlog.len() {
                break;
            }
            // Finer until the link is back, where the drain starts.
            let poll = if first_progress_us.is_some() { 100 } else { 20 };
            tokio::time::sleep(Duration::from_millis(poll)).await;
        }
        let feed_done_us = feed_done_us.unwrap_or(heal_us);
        let first_progress_us = first_progress_us.unwrap_or(feed_done_us);
        // Caught up when the last backlog message is held (the remote's
        // own stamp). The polled "feed caught up" moment is only as good
        // as the polling, which the walk above delays with thousands of
        // messages (a 10-minute outage showed it 15 s late).
        let end_us = if held_us_max > 0 {
            held_us_max
        } else {
            feed_done_us
        };
        let (all, errors, late) = match (running, stopped) {
            (Some(l), _) => l.stop().await?,
            (None, Some(s)) => s,
            (None, None) => unreachable!("the load either runs or was stopped"),
        };
        self.next += all.len() as u64 + errors;
        let during_catchup = all.iter().filter(|a| a.ack_us > heal_us).count();
        let settle = self.b.wait_synced(Duration::from_secs(3600)).await?;
        let bytes: u64 = backlog.iter().map(|a| a.size).sum();
        let large = backlog.iter().filter(|a| a.large).count();
        // The drain: from the pull's reconnection (last poll before it)
        // to the last backlog message held, on the remote's own stamp.
        // Timed from the first message held instead, the first batch's
        // transfer (up to 32 MiB) would not count.
        let drain_s = (held_us_max - not_connected_us).max(1000) as f64 / 1e6;
        let drain_from_first_held_s =
            (held_us_max - held_us_min.min(held_us_max)).max(1000) as f64 / 1e6;
        let drain_polled_s = (end_us - first_progress_us) as f64 / 1e6;
        self.held.add(&all);
        Ok(json!({
            "round": name,
            "outage_s": outage.as_secs_f64(),
            "held_before": {"messages": held_before.messages, "bytes": held_before.bytes},
            "backlog": {
                "messages": backlog.len(),
                "large": large,
                "small": backlog.len() - large,
                "bytes": bytes,
                "feed_records": head - cursor0,
            },
            "reconnect_s": round3((first_progress_us - heal_us) as f64 / 1e6),
            "feed_caught_up_polled_s": round3((feed_done_us - heal_us) as f64 / 1e6),
            "catch_up_since_heal_s": round3((end_us - heal_us) as f64 / 1e6),
            "drain_s": round3(drain_s),
            "drain_polled_s": round3(drain_polled_s),
            "drain_from_first_held_s": round3(drain_from_first_held_s),
            "drain_mb_per_sec": round3(bytes as f64 / drain_s / 1e6),
            "drain_records_per_sec": round3(backlog.len() as f64 / drain_s),
            "uploads_during_catchup": during_catchup,
            "upload_errors": errors,
            "late_starts": late,
            "settled_after_s": round3(settle.as_secs_f64()),
        }))
    }
}

/// Catch-up after outages: round A (outage D), round B (outage D, after
/// replicating `held_factor` times everything held after A on top), round
/// C (outage 2D); single-stream baseline through the same link before and
/// after.
pub async fn catch_up(args: CatchUpArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(
        args.large_min.0 > args.cluster.inline_threshold.0,
        "--large-min must exceed the inline threshold"
    );
    let b = Bench::start(&args.cluster).await?;
    eprintln!("# single-stream baseline");
    let before = b.single_stream(args.baseline_size.0).await?;
    let mut cu = CatchUp {
        b,
        mix: Mix {
            rate: args.rate,
            large_every: args.large_every,
            large_min: args.large_min.0,
            large_max: args.large_max.0,
            small: args.small_size.0,
        },
        next: 0,
        // The baseline message is held in both DCs too.
        held: Held {
            messages: 1,
            bytes: args.baseline_size.0,
        },
        load_during_catchup: args.load_during_catchup,
    };
    let d = args.outage.0;
    let wanted: Vec<String> = args
        .rounds
        .iter()
        .map(|r| r.trim().to_uppercase())
        .collect();
    anyhow::ensure!(
        wanted == ["A"] || wanted == ["A", "B", "C"],
        "--rounds is A or A,B,C"
    );
    let a = cu.round("A", d).await?;
    let mut rounds = vec![a];
    let mut prefill = Value::Null;
    if wanted.len() == 3 {
        let prefill_bytes = (cu.held.bytes as f64 * args.held_factor) as u64;
        eprintln!("# replicating {prefill_bytes} more bytes before round B");
        prefill = cu.prefill(prefill_bytes).await?;
        rounds.push(cu.round("B", d).await?);
        rounds.push(cu.round("C", d * 2).await?);
    }
    eprintln!("# single-stream baseline again");
    let after = cu.b.single_stream(args.baseline_size.0).await?;
    let single = (p(&before, "mb_per_sec") + p(&after, "mb_per_sec")) / 2.0;
    let single_disk = (p(&before, "to_disk_mb_per_sec") + p(&after, "to_disk_mb_per_sec")) / 2.0;
    let ratio = |r: &Value| round3(p(r, "drain_mb_per_sec") / single);
    let ratio_disk = |r: &Value| round3(p(r, "drain_mb_per_sec") / single_disk);
    let worst = rounds.iter().map(ratio).fold(f64::INFINITY, f64::min);
    let worst_disk = rounds.iter().map(ratio_disk).fold(f64::INFINITY, f64::min);
    let mut summary = json!({
        "drain_mb_per_sec_vs_single_stream": rounds.iter().map(ratio).collect::<Vec<_>>(),
        "drain_mb_per_sec_vs_single_stream_to_disk": rounds.iter().map(ratio_disk).collect::<Vec<_>>(),
        "target_ratio": 0.8,
        "target_met": worst >= 0.8,
        "target_met_vs_to_disk": worst_disk >= 0.8,
    });
    if let [a, bb, c] = &rounds[..] {
        let t = |r: &Value| p(r, "catch_up_since_heal_s");
        let dr = |r: &Value| p(r, "drain_s");
        let held_ratio = p(&bb["held_before"], "bytes") / p(&a["held_before"], "bytes").max(1.0);
        summary["held_before_b_over_a"] = json!(round3(held_ratio));
        summary["catch_up_b_over_a"] = json!(round3(t(bb) / t(a)));
        summary["catch_up_c_over_a"] = json!(round3(t(c) / t(a)));
        summary["drain_b_over_a"] = json!(round3(dr(bb) / dr(a)));
        summary["drain_c_over_a"] = json!(round3(dr(c) / dr(a)));
    }
    Ok(json!({
        "kind": "catch-up",
        "leaders": cu.b.leaders_json(),
        "rtt_ms": cu.b.rtt.as_secs_f64() * 1e3,
        "outage_s": d.as_secs_f64(),
        "rate_per_sec": args.rate,
        "load_during_catchup": args.load_during_catchup,
        "single_stream_before": before,
        "single_stream_after": after,
        "single_stream_mb_per_sec": round3(single),
        "single_stream_to_disk_mb_per_sec": round3(single_disk),
        "rounds": rounds,
        "prefill_before_b": prefill,
        "summary": summary,
    }))
}
