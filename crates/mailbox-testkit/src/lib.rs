//! Test kit: a data center of real `mailboxd` processes on loopback.
//!
//! Each node is a child process with its own config, data directory and log
//! file under a temporary directory; the DC shares one segment directory.
//! Nodes can be killed (SIGKILL, no chance to flush anything), stopped
//! (SIGTERM) and restarted with their data. Helpers wait on observable state
//! (cluster status, applied indexes, directory contents), never on fixed
//! sleeps. Every node also serves `/metrics` and `/healthz` on its own HTTP
//! port ([`TestDc::scrape`], [`TestDc::healthz`]).
//!
//! The `mailboxd` binary is found via `$MAILBOXD_BIN`, or in the directory
//! of the running executable or its parent (`target/<profile>/mailboxd`, next
//! to `mailbox-bench`, one level above a test in `deps/`), which is where
//! `cargo build --workspace` puts it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use mailbox_client::Client;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod cluster;
mod http;
pub use cluster::{LinkProxy, TestCluster};
pub use http::{http_get, http_request, http_request_as, HttpResponse, Sample, Scrape};

/// Knobs for a test DC.
#[derive(Debug, Clone)]
pub struct DcOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// Inline threshold, e.g. "64KiB".
    pub inline_threshold: String,
    /// Segment size, e.g. "1MiB".
    pub segment_size: String,
    /// Snapshot every N entries.
    pub snapshot_every: u64,
    /// Snapshot once the log grew this much, e.g. "256MiB".
    pub snapshot_log_size: String,
    /// Entries kept behind a snapshot.
    pub keep_logs: u64,
    /// Orphan grace period.
    pub orphan_grace: String,
    /// GC interval.
    pub gc_interval: String,
    /// Propose timeout.
    pub propose_timeout: String,
}

impl Default for DcOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            inline_threshold: "64KiB".into(),
            segment_size: "1MiB".into(),
            snapshot_every: 10_000,
            snapshot_log_size: "256MiB".into(),
            keep_logs: 1_000,
            orphan_grace: "1h".into(),
            gc_interval: "1m".into(),
            propose_timeout: "10s".into(),
        }
    }
}

/// One node process.
pub struct NodeProc {
    /// Node id (1-based).
    pub id: u64,
    /// `127.0.0.1:port`.
    pub addr: String,
    /// `127.0.0.1:port` of its HTTP endpoint (`/metrics`, `/healthz`).
    pub http_addr: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NodeProc {
    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

/// A running test DC.
pub struct TestDc {
    dir: tempfile::TempDir,
    /// The nodes, index = id - 1.
    pub nodes: Vec<NodeProc>,
    bin: PathBuf,
    /// DC name.
    pub name: String,
    /// Keep data and logs when dropped (see [`TestDc::keep_for_post_mortem`]).
    keep: bool,
}

fn mailboxd_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MAILBOXD_BIN") {
        return Ok(PathBuf::from(p));
    }
    sibling_bin("mailboxd")
}

/// The `mailbox` CLI built beside `mailboxd`, for tests that run it as a
/// user would.
pub fn mailbox_cli_bin() -> anyhow::Result<PathBuf> {
    sibling_bin("mailbox")
}

fn sibling_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // A binary (target/<profile>/mailbox-bench) sits next to mailboxd; a
    // test (target/<profile>/deps/<test>) one level below it.
    let dir = exe.parent().context("executable has no parent")?;
    let candidates = [Some(dir), dir.parent()];
    for c in candidates.into_iter().flatten() {
        let p = c.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found next to {}: run `make build` first (make test does), or set MAILBOXD_BIN",
        exe.display()
    )
}

/// `n` currently free loopback addresses.
pub fn free_addrs(n: usize) -> anyhow::Result<Vec<String>> {
    (0..n)
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect()
}

/// A port that is free now, chosen below the kernel's ephemeral range
/// (32768.. by default): a port handed out by binding port 0 is released
/// before the node binds it, and in between any outgoing connection may be
/// given it as its source port. Ports are not reused within a process.
fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Different test processes start at different places.
    let start = (std::process::id() % 97) * 120;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl TestDc {
    /// Starts a single-DC cluster and waits until it has a leader.
    pub async fn start(opts: DcOptions) -> anyhow::Result<Self> {
        let addrs = free_addrs(opts.nodes)?;
        let dc = Self::launch("test", &opts, addrs, "").await?;
        Ok(dc)
    }

    /// Starts DC `name` on `addrs` with an extra config tail (the
    /// `[cluster]` section) and waits until it has a leader.
    pub async fn launch(
        name: &str,
        opts: &DcOptions,
        addrs: Vec<String>,
        cluster_toml: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mailbox-{name}-"))
            .tempdir()?;
        let bin = mailboxd_bin()?;
        let mut nodes = Vec::new();
        let members: String = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("[[members]]\nid = {}\naddr = \"{a}\"\n", i + 1))
            .collect();
        let http_addrs = free_addrs(addrs.len())?;
        for (i, (addr, http)) in addrs.iter().zip(&http_addrs).enumerate() {
            let id = i as u64 + 1;
            let ndir = dir.path().join(format!("node{id}"));
            std::fs::create_dir_all(&ndir)?;
            let cfg = format!(
                "node-id = {id}\ndc = \"{name}\"\nlisten = \"{addr}\"\nhttp-listen = \"{http}\"\ndata-dir = \"{data}\"\nsegment-dir = \"{seg}\"\n\
                 inline-threshold = \"{it}\"\nsegment-size = \"{ss}\"\norphan-grace = \"{og}\"\ngc-interval = \"{gi}\"\n\n\
                 [raft]\nheartbeat = \"50ms\"\nelection-timeout-min = \"300ms\"\nelection-timeout-max = \"600ms\"\n\
                 snapshot-every = {se}\nsnapshot-log-size = \"{sls}\"\nkeep-logs = {kl}\npropose-timeout = \"{pt}\"\n\n{members}\n{cluster_toml}",
                data = ndir.join("data").display(),
                seg = dir.path().join("segments").display(),
                it = opts.inline_threshold,
                ss = opts.segment_size,
                og = opts.orphan_grace,
                gi = opts.gc_interval,
                se = opts.snapshot_every,
                sls = opts.snapshot_log_size,
                kl = opts.keep_logs,
                pt = opts.propose_timeout,
            );
            let config = ndir.join("node.toml");
            std::fs::write(&config, cfg)?;
            nodes.push(NodeProc {
                id,
                addr: addr.clone(),
                http_addr: http.clone(),
                config,
                log: ndir.join("mailboxd.log"),
                child: None,
            });
        }
        let mut dc = TestDc {
            keep: false,
            dir,
            nodes,
            bin,
            name: name.to_string(),
        };
        for id in 1..=addrs.len() as u64 {
            dc.spawn(id)?;
        }
        dc.wait_leader(Duration::from_secs(30)).await?;
        Ok(dc)
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let bin = self.bin.clone();
        let n = self.node_mut(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&n.config)
            .env(
                "RUST_LOG",
                std::env::var("MAILBOX_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("spawn mailboxd")?;
        n.child = Some(child);
        Ok(())
    }

    fn node_mut(&mut self, id: u64) -> &mut NodeProc {
        &mut self.nodes[id as usize - 1]
    }

    /// The temporary directory holding everything.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The DC's shared segment directory.
    pub fn segment_dir(&self) -> PathBuf {
        self.dir.path().join("segments")
    }

    /// Every node address.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// Addresses of the nodes that are running.
    pub fn live_endpoints(&mut self) -> Vec<String> {
        self.nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then(|| n.addr.clone()))
            .collect()
    }

    /// URL of node `id`'s Prometheus endpoint.
    pub fn metrics_url(&self, id: u64) -> String {
        format!("http://{}/metrics", self.nodes[id as usize - 1].http_addr)
    }

    /// Scrapes node `id`'s `/metrics` and parses it; fails unless it
    /// answers 200 with the Prometheus text content type.
    pub async fn scrape(&self, id: u64) -> anyhow::Result<Scrape> {
        let r = http_get(&self.nodes[id as usize - 1].http_addr, "/metrics").await?;
        if r.status != 200 {
            bail!("/metrics of node {id}: status {}: {}", r.status, r.body);
        }
        let ct = r.headers.get("content-type").cloned().unwrap_or_default();
        if !ct.starts_with("text/plain") || !ct.contains("version=0.0.4") {
            bail!("/metrics of node {id}: content type {ct:?}");
        }
        Scrape::parse(&r.body)
    }

    /// GET `/healthz` of node `id`.
    pub async fn healthz(&self, id: u64) -> anyhow::Result<HttpResponse> {
        http_get(&self.nodes[id as usize - 1].http_addr, "/healthz").await
    }

    /// A client of one node.
    pub async fn client_of(&self, id: u64) -> anyhow::Result<Client> {
        Ok(Client::connect_any(&[self.nodes[id as usize - 1].addr.clone()]).await?)
    }

    /// A client of any running node.
    pub async fn client(&mut self) -> anyhow::Result<Client> {
        let eps = self.live_endpoints();
        Ok(Client::connect(&eps).await?)
    }

    /// Waits until a running node reports a leader that is itself running;
    /// returns its id.
    pub async fn wait_leader(&mut self, timeout: Duration) -> anyhow::Result<u64> {
        let live: Vec<(u64, String)> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then(|| (n.id, n.addr.clone())))
            .collect();
        let live_ids: Vec<u64> = live.iter().map(|(id, _)| *id).collect();
        wait_for(timeout, "a live leader", || {
            let live = live.clone();
            let live_ids = live_ids.clone();
            async move {
                for (_, addr) in &live {
                    let Ok(c) = Client::connect_any(std::slice::from_ref(addr)).await else {
                        continue;
                    };
                    if let Ok(s) = c.cluster_status().await {
                        if s.has_leader && live_ids.contains(&s.leader_id) {
                            let leader_ok = s.nodes.iter().any(|n| {
                                n.node_id == s.leader_id && n.reachable && n.state == "Leader"
                            });
                            if leader_ok {
                                return Some(s.leader_id);
                            }
                        }
                    }
                }
                None
            }
        })
        .await
    }

    /// The leader node `id` names, asked with a one-second bound (a paused
    /// node answers nothing, and the client has no deadline of its own).
    pub async fn leader_seen_by(&self, id: u64) -> Option<u64> {
        let bound = Duration::from_secs(1);
        let c = tokio::time::timeout(bound, self.client_of(id))
            .await
            .ok()?
            .ok()?;
        let s = tokio::time::timeout(bound, c.cluster_status())
            .await
            .ok()?
            .ok()?;
        let l = s.nodes.iter().find(|n| n.node_id == s.leader_id)?;
        (s.has_leader && l.reachable && l.state == "Leader").then_some(s.leader_id)
    }

    /// Moves leadership to node `want`: freezes whoever else leads until
    /// another node takes over, then lets it run again, until `want` wins
    /// an election (20 rounds at most).
    pub async fn lead_again(&mut self, want: u64) -> anyhow::Result<()> {
        for round in 0.. {
            let this = &*self;
            let l = wait_for(Duration::from_secs(30), "a leader", || {
                this.leader_seen_by(want)
            })
            .await?;
            if l == want {
                return Ok(());
            }
            anyhow::ensure!(round < 20, "node {want} never became leader again");
            self.pause(l);
            let this = &*self;
            let other = wait_for(Duration::from_secs(30), "another leader", || async move {
                this.leader_seen_by(want).await.filter(|&x| x != l)
            })
            .await;
            self.resume(l);
            other?;
        }
        unreachable!("the loop returns or fails")
    }

    /// Waits until every running node has applied at least the leader's
    /// last log index at the time of the call.
    pub async fn wait_converged(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let eps = self.live_endpoints();
        let c = Client::connect(&eps).await?;
        let target = c
            .cluster_status()
            .await?
            .nodes
            .iter()
            .filter(|n| n.reachable)
            .map(|n| n.last_log_index)
            .max()
            .unwrap_or(0);
        wait_for(timeout, "all live nodes applied", || {
            let eps = eps.clone();
            async move {
                for ep in &eps {
                    let c = Client::connect_any(std::slice::from_ref(ep)).await.ok()?;
                    let s = c.cluster_status().await.ok()?;
                    let me = s.nodes.iter().find(|n| &n.addr == ep)?;
                    if me.applied_index < target {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await
    }

    /// Keeps this DC's data and logs when it is dropped (a failed run's
    /// evidence; otherwise they go, so a long soak does not fill the disk).
    pub fn keep_for_post_mortem(&mut self) {
        self.keep = true;
    }

    /// The process id of node `id`, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes[id as usize - 1].child.as_ref().map(|c| c.id())
    }

    /// SIGKILLs a node: no shutdown, no flush.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.node_mut(id).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes a node with SIGSTOP: it keeps its sockets and state but
    /// answers nothing, like a machine that hangs or a leader cut off from
    /// its peers (seen from the peers), until [`TestDc::resume`].
    pub fn pause(&mut self, id: u64) {
        self.signal(id, libc::SIGSTOP);
    }

    /// Lets a paused node run again (SIGCONT).
    pub fn resume(&mut self, id: u64) {
        self.signal(id, libc::SIGCONT);
    }

    fn signal(&mut self, id: u64, sig: libc::c_int) {
        if let Some(c) = self.node_mut(id).child.as_ref() {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }

    /// Bytes in a node's log so far (for [`TestDc::log_contains_since`]).
    pub fn log_len(&self, id: u64) -> usize {
        std::fs::metadata(&self.nodes[id as usize - 1].log).map_or(0, |m| m.len() as usize)
    }

    /// Whether a node's log contains `needle` past its first `offset` bytes.
    pub fn log_contains_since(&self, id: u64, offset: usize, needle: &str) -> bool {
        let log = std::fs::read(&self.nodes[id as usize - 1].log).unwrap_or_default();
        String::from_utf8_lossy(log.get(offset..).unwrap_or_default()).contains(needle)
    }

    /// Stops a node with SIGTERM and waits for it to exit.
    pub async fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        if let Some(mut c) = self.node_mut(id).child.take() {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            loop {
                if c.try_wait()?.is_some() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    bail!("node {id} did not stop within 15s of SIGTERM");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// How a node's process ended, if it has ended on its own (`None`
    /// while it runs, or once it was killed or stopped through here).
    pub fn exit_status(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        self.node_mut(id).child.as_mut()?.try_wait().ok().flatten()
    }

    /// A node's data directory (its RocksDB is `db` inside), to damage
    /// it while the node is stopped.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node{id}")).join("data")
    }

    /// Starts a stopped or killed node again with its data.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        if self.node_mut(id).is_running() {
            bail!("node {id} is running");
        }
        self.spawn(id)
    }

    /// Tail of a node's log, for failure messages.
    pub fn log_tail(&self, id: u64) -> String {
        let s = std::fs::read_to_string(&self.nodes[id as usize - 1].log).unwrap_or_default();
        s.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for TestDc {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // MAILBOX_TESTKIT_KEEP=1 keeps data and logs for a post-mortem.
        if self.keep || std::env::var_os("MAILBOX_TESTKIT_KEEP").is_some_and(|v| v == "1") {
            if let Ok(dir) = tempfile::Builder::new().tempdir() {
                let kept = std::mem::replace(&mut self.dir, dir).keep();
                eprintln!("# kept {}", kept.display());
            }
        }
    }
}

/// Polls `probe` every 50ms until it yields `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every DC in `dcs` has applied every other DC's whole feed
/// (its cursor at the other's own feed head) and holds every payload; with
/// `deletes_settled`, also until every delete has been acknowledged by
/// every DC (no tombstone left). Prints what is still missing every few
/// seconds, so a run that times out says why.
pub async fn wait_dcs_synced(
    dcs: &[&Client],
    deletes_settled: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let dcs: Vec<Client> = dcs.iter().map(|c| (*c).clone()).collect();
    let mut probes = 0u64;
    wait_for(timeout, "all DCs synced", || {
        let dcs = dcs.clone();
        probes += 1;
        let report = probes.is_multiple_of(60);
        async move {
            let mut st = Vec::new();
            for c in &dcs {
                st.push(c.replication_status().await.ok()?);
            }
            if report {
                for a in &st {
                    let rs: Vec<_> = a
                        .remotes
                        .iter()
                        .map(|r| format!("{}@{}/{} {}", r.dc, r.cursor, r.remote_head, r.state))
                        .collect();
                    eprintln!(
                        "  not synced yet: {}: head {} pending {} tombstones {} remotes {rs:?}",
                        a.dc, a.feed_head, a.pending_messages, a.tombstones
                    );
                }
            }
            for a in &st {
                if a.pending_messages != 0 || (deletes_settled && a.tombstones != 0) {
                    return None;
                }
                for b in st.iter().filter(|b| b.dc != a.dc) {
                    let r = a.remotes.iter().find(|r| r.dc == b.dc)?;
                    if r.cursor < b.feed_head {
                        return None;
                    }
                }
            }
            Some(())
        }
    })
    .await
}

/// A deterministic pseudo-random byte stream of a given length (xorshift),
/// generated on the fly so multi-GiB payloads never sit in memory.
pub struct PatternReader {
    state: u64,
    left: u64,
}

impl PatternReader {
    /// `len` bytes derived from `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            left: len,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let b = self.state.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
}

impl AsyncRead for PatternReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // Whole 8-byte words keep the stream independent of read sizes.
        let n = (buf.remaining() as u64).min(self.left) as usize;
        let n = if n >= 8 { n - n % 8 } else { n };
        let mut tmp = vec![0u8; n];
        self.fill(&mut tmp);
        self.left -= n as u64;
        buf.put_slice(&tmp);
        std::task::Poll::Ready(Ok(()))
    }
}

/// SHA-256 (hex) of what [`PatternReader::new(seed, len)`] yields.
pub fn pattern_sha256(seed: u64, len: u64) -> String {
    let mut r = PatternReader::new(seed, len);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    while r.left > 0 {
        let n = (buf.len() as u64).min(r.left) as usize;
        let n = if n >= 8 { n - n % 8 } else { n };
        r.fill(&mut buf[..n]);
        r.left -= n as u64;
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An `AsyncWrite` that only hashes and counts.
#[derive(Default)]
pub struct HashSink {
    hasher: Sha256,
    /// Bytes written.
    pub len: u64,
}

impl HashSink {
    /// Hex digest of everything written.
    pub fn hex(self) -> String {
        hex(&self.hasher.finalize())
    }
}

impl AsyncWrite for HashSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Files (recursively) under `dir`, for orphan checks.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
