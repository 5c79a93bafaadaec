//! `mailboxd dev`: a local multi-DC cluster of real `mailboxd` processes on
//! loopback, for `make run`.
//!
//! For each DC (default `east` and `west`, 3 nodes each) it writes one config
//! per node under `--dir`, starts the nodes as child processes (logs in each
//! node's directory), waits for every DC to elect a leader, creates `/inbox`,
//! writes a client config (`.mailbox/client.toml`) naming every DC so the
//! `mailbox` CLI reaches any of them with `--dc`, prints endpoints (gRPC,
//! each node's pid and `/metrics` URL) and examples, and on Ctrl-C or
//! SIGTERM stops every node with SIGTERM.
//!
//! While it runs it supervises the nodes: killing one (`kill -9`) is the way
//! to watch failover, so the others keep running, and the dead node is
//! started again after `--restart-delay` (same config, log appended) unless
//! `--no-restart` is given. A node that dies right after each start backs off
//! instead of restarting in a hot loop.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use mailbox_proto::v1::mailbox_client::MailboxClient;
use mailbox_proto::v1::{ClusterStatusRequest, CreateMailboxRequest};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

/// A node that dies within this long of its start is crash-looping: its
/// next restart waits twice as long as the last one.
const CRASH_WINDOW: Duration = Duration::from_secs(10);
/// Longest wait between restarts of a crash-looping node (unless
/// `--restart-delay` itself is longer).
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long stopping waits for SIGTERM to work before killing the rest.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Options of `mailboxd dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Directory for node data, segments and logs.
    #[arg(long, default_value = ".run")]
    dir: PathBuf,
    /// Data center names, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "east,west")]
    dcs: Vec<String>,
    /// Nodes per DC (1, 3 or 5).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// DC k (from 1) uses gRPC ports base-port + 100*(k-1) + 1, + 2, ...
    /// and HTTP (metrics) ports base-port + 100*(k-1) + 51, + 52, ...
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// Acknowledgement policy of every DC: delayed or immediate.
    #[arg(long, default_value = "delayed")]
    ack: String,
    /// Where to write the client config the CLI finds by default.
    #[arg(long, default_value = ".mailbox/client.toml")]
    client_config: PathBuf,
    /// Seconds to wait before restarting a node whose process exited
    /// (doubled, up to 60, while it keeps dying within 10 s of its start).
    #[arg(long, value_name = "SECS", default_value = "3", value_parser = parse_secs)]
    restart_delay: Duration,
    /// Leave a node whose process exited down instead of restarting it.
    #[arg(long)]
    no_restart: bool,
}

/// Parses `--restart-delay`: seconds, fractions allowed, `s` suffix optional.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .strip_suffix('s')
        .unwrap_or(s)
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 3 or 0.5)"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

impl DevArgs {
    fn addrs(&self, dc_index: usize) -> Vec<String> {
        (1..=self.nodes)
            .map(|i| {
                format!(
                    "127.0.0.1:{}",
                    self.base_port as u64 + 100 * dc_index as u64 + i
                )
            })
            .collect()
    }

    /// HTTP (`/metrics`, `/healthz`) addresses: 50 above the gRPC ports,
    /// inside the DC's block of 100 (a DC has at most 5 nodes).
    fn http_addrs(&self, dc_index: usize) -> Vec<String> {
        (1..=self.nodes)
            .map(|i| {
                format!(
                    "127.0.0.1:{}",
                    self.base_port as u64 + 100 * dc_index as u64 + 50 + i
                )
            })
            .collect()
    }
}

fn quoted(v: &[String]) -> String {
    v.iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn node_toml(args: &DevArgs, k: usize, dir: &Path, id: u64) -> String {
    let addrs = args.addrs(k);
    let members: String = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("[[members]]\nid = {}\naddr = \"{a}\"\n", i + 1))
        .collect();
    let remotes: String = args
        .dcs
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != k)
        .map(|(j, name)| {
            format!(
                "[[cluster.remotes]]\nname = \"{name}\"\nendpoints = [{}]\n",
                quoted(&args.addrs(j))
            )
        })
        .collect();
    format!(
        "# Generated by `mailboxd dev`.\nnode-id = {id}\ndc = \"{dc}\"\nlisten = \"{listen}\"\nhttp-listen = \"{http}\"\n\
         data-dir = \"{data}\"\nsegment-dir = \"{seg}\"\ninline-threshold = \"8KiB\"\nsegment-size = \"8MiB\"\n\n\
         {members}\n[cluster]\nack = \"{ack}\"\n{remotes}",
        dc = args.dcs[k],
        listen = addrs[id as usize - 1],
        http = args.http_addrs(k)[id as usize - 1],
        data = dir.join(format!("node{id}")).display(),
        seg = dir.join("segments").display(),
        ack = args.ack,
    )
}

async fn wait_for_leader(addr: &str) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = MailboxClient::connect(format!("http://{addr}")).await {
            if let Ok(s) = c.cluster_status(ClusterStatusRequest::default()).await {
                let s = s.into_inner();
                if s.has_leader {
                    return Ok(s.leader_id);
                }
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no leader elected at {addr} within 60s; see the node logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ctrl-C and SIGTERM, installed once up front: a signal that arrives while
/// nothing awaits it is kept for the next `recv`, and SIGTERM (kill, timeout,
/// a service manager) must stop the nodes as Ctrl-C does, or they outlive
/// this process.
struct Shutdown {
    int: Signal,
    term: Signal,
}

impl Shutdown {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// One node process under supervision.
struct Node {
    dc: String,
    id: u64,
    config: PathBuf,
    log: PathBuf,
    /// `None` while the node is down: waiting for its restart, or left down.
    child: Option<Child>,
    /// Pid of the current (or last) process; kept because [`Child::id`]
    /// forgets it once the exit has been collected.
    pid: u32,
    /// Start of the current (or last) process: how long it ran decides
    /// whether its death counts as a crash loop.
    started: Instant,
    /// What was waited before the current process was started (`None` for
    /// the first start); the next backoff doubles it.
    restart_delay: Option<Duration>,
    /// When a dead node is due to start again.
    restart_at: Option<Instant>,
}

impl Node {
    fn name(&self) -> String {
        format!("{} node {}", self.dc, self.id)
    }

    /// Starts the node's process. The first start truncates the log, like a
    /// fresh `make run`; restarts append, so the log still shows why the
    /// previous process died.
    fn spawn(&mut self, exe: &Path, restart: bool) -> anyhow::Result<()> {
        let log = if restart {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .with_context(|| format!("open {}", self.log.display()))?;
            // A marker, so the log reader sees where one process ends and
            // the next begins; losing it is harmless.
            let _ = std::io::Write::write_all(&mut f, b"\n--- restarted by `mailboxd dev` ---\n\n");
            f
        } else {
            std::fs::File::create(&self.log)
                .with_context(|| format!("create {}", self.log.display()))?
        };
        let child = Command::new(exe)
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            // Backstop for early returns: whatever path leaves `run`, no
            // node outlives it.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", self.name()))?;
        self.pid = child.id().unwrap_or(0);
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }
}

/// The delay before restarting a node that ran for `ran`, when `prev` was
/// waited before its last start: back to `base` after a healthy run, doubled
/// (at least 1 s, at most [`MAX_BACKOFF`] or `base`) while it keeps dying
/// within [`CRASH_WINDOW`] of its start.
fn next_delay(prev: Option<Duration>, ran: Duration, base: Duration) -> Duration {
    match prev {
        Some(prev) if ran < CRASH_WINDOW => (prev * 2)
            .max(Duration::from_secs(1))
            .min(MAX_BACKOFF.max(base)),
        _ => base,
    }
}

/// "exit status: 1", "signal: 9 (SIGKILL)", "signal: 6 (SIGABRT) (core
/// dumped)": std's wording, which names the signal.
fn describe(res: &std::io::Result<ExitStatus>) -> String {
    match res {
        Ok(status) if status.signal().is_some() => format!("was killed ({status})"),
        Ok(status) => format!("exited ({status})"),
        Err(e) => format!("could not be waited for ({e})"),
    }
}

/// What the supervisor loop woke up for.
enum Event {
    Shutdown,
    Exited(usize, std::io::Result<ExitStatus>),
    RestartDue,
}

/// Every node of every DC, restarted when it dies unless `--no-restart`.
struct Supervisor {
    exe: PathBuf,
    nodes: Vec<Node>,
    base_delay: Duration,
    restart: bool,
}

/// Resolves when one of the running nodes exits, with its index. Pending
/// while none runs (`select_all` needs at least one future). `Child::wait` is
/// cancel safe, so the loop rebuilds this every round without losing exits.
async fn next_exit(nodes: &mut [Node]) -> (usize, std::io::Result<ExitStatus>) {
    let waits: Vec<_> = nodes
        .iter_mut()
        .enumerate()
        .filter_map(|(i, n)| {
            let child = n.child.as_mut()?;
            Some(Box::pin(async move { (i, child.wait().await) }))
        })
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    futures::future::select_all(waits).await.0
}

/// Sleeps until `at`, or forever when nothing is due.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    /// Supervises until Ctrl-C or SIGTERM; the caller then stops the nodes.
    async fn run(&mut self, shutdown: &mut Shutdown) {
        loop {
            let due = self.nodes.iter().filter_map(|n| n.restart_at).min();
            let event = tokio::select! {
                // A Ctrl-C in the terminal reaches the nodes too; checking
                // it first keeps their exits from being taken for crashes.
                biased;
                _ = shutdown.recv() => Event::Shutdown,
                (i, res) = next_exit(&mut self.nodes) => Event::Exited(i, res),
                _ = sleep_until(due) => Event::RestartDue,
            };
            match event {
                Event::Shutdown => return,
                Event::Exited(i, res) => self.exited(i, res),
                Event::RestartDue => self.restart_due(),
            }
        }
    }

    fn exited(&mut self, i: usize, res: std::io::Result<ExitStatus>) {
        let node = &mut self.nodes[i];
        // After a failed wait the process state is unknown; dropping the
        // child kills it (kill_on_drop) so a restart cannot find it running.
        node.child = None;
        let ran = node.started.elapsed();
        let what = format!(
            "{} (pid {}) {} after running {:.1}s",
            node.name(),
            node.pid,
            describe(&res),
            ran.as_secs_f64()
        );
        if !self.restart {
            println!("{what}; it stays down (--no-restart), the other nodes keep running");
            return;
        }
        let delay = self.schedule(i, ran);
        let backoff = if delay > self.base_delay {
            " (it keeps dying right after its start, so backing off)"
        } else {
            ""
        };
        println!("{what}; restarting it in {delay:?}{backoff}, the other nodes keep running");
    }

    /// Schedules node `i`'s restart after a process that ran for `ran`.
    fn schedule(&mut self, i: usize, ran: Duration) -> Duration {
        let node = &mut self.nodes[i];
        let delay = next_delay(node.restart_delay, ran, self.base_delay);
        node.restart_delay = Some(delay);
        node.restart_at = Some(Instant::now() + delay);
        delay
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            if !matches!(node.restart_at, Some(at) if at <= now) {
                continue;
            }
            node.restart_at = None;
            match node.spawn(&self.exe, true) {
                Ok(()) => println!(
                    "{} restarted (pid {}); log: {}",
                    node.name(),
                    node.pid,
                    node.log.display()
                ),
                Err(e) => {
                    let name = node.name();
                    // Counts as a death right at start, so a restart that
                    // keeps failing backs off too.
                    let delay = self.schedule(i, Duration::ZERO);
                    eprintln!("could not restart {name}: {e:#}; trying again in {delay:?}");
                }
            }
        }
    }

    /// SIGTERM to every running node, up to [`STOP_GRACE`] for all of them to
    /// exit, then SIGKILL to the rest. Pending restarts are dropped.
    async fn stop_all(&mut self) {
        println!("Stopping nodes...");
        for node in &mut self.nodes {
            node.restart_at = None;
            if let Some(pid) = node.child.as_ref().and_then(Child::id) {
                // SAFETY: sending a signal to a child we spawned and have
                // not reaped yet (`id` is `None` once it is), so the pid is
                // still ours.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        for node in &mut self.nodes {
            let Some(mut child) = node.child.take() else {
                continue;
            };
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
                println!(
                    "  {} (pid {}) killed after {STOP_GRACE:?}",
                    node.name(),
                    node.pid
                );
            }
        }
        println!("All nodes stopped.");
    }
}

/// Writes every node's config and starts the nodes, waits for every DC to
/// elect a leader, creates `/inbox` and writes the client config. Returns
/// each DC's leader.
async fn start(args: &DevArgs, root: &Path, sup: &mut Supervisor) -> anyhow::Result<Vec<u64>> {
    for (k, dc) in args.dcs.iter().enumerate() {
        let dir = root.join(dc);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        for (i, addr) in (1..=args.nodes).zip(args.addrs(k)) {
            let http = &args.http_addrs(k)[i as usize - 1];
            for a in [&addr, http] {
                if std::net::TcpListener::bind(a).is_err() {
                    bail!(
                        "port {a} is in use (another `make run`?); pass --base-port to use others"
                    );
                }
            }
            let node_dir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir)?;
            let cfg = node_dir.join("node.toml");
            std::fs::write(&cfg, node_toml(args, k, &dir, i))?;
            let mut node = Node {
                dc: dc.clone(),
                id: i,
                config: cfg,
                log: node_dir.join("mailboxd.log"),
                child: None,
                pid: 0,
                started: Instant::now(),
                restart_delay: None,
                restart_at: None,
            };
            node.spawn(&sup.exe, false)?;
            sup.nodes.push(node);
        }
    }
    println!(
        "Starting {} data center(s) {:?} with {} nodes each; data under {}",
        args.dcs.len(),
        args.dcs,
        args.nodes,
        root.display()
    );
    let mut leaders = Vec::new();
    for k in 0..args.dcs.len() {
        let first = args.addrs(k)[0].clone();
        leaders.push(wait_for_leader(&first).await?);
        let mut client = MailboxClient::connect(format!("http://{first}")).await?;
        client
            .create_mailbox(CreateMailboxRequest {
                path: "/inbox".into(),
                parents: true,
            })
            .await
            .with_context(|| format!("create /inbox in {}", args.dcs[k]))?;
    }
    // A demo partner (password `demo`) on /inbox, made in the first DC and
    // replicated to the others like every account.
    let mut accounts = mailbox_proto::v1::accounts_client::AccountsClient::connect(format!(
        "http://{}",
        args.addrs(0)[0]
    ))
    .await?;
    accounts
        .put_user(mailbox_proto::v1::PutUserRequest {
            name: "demo".into(),
            role: "partner".into(),
            password: "demo".into(),
            ..Default::default()
        })
        .await
        .context("create the demo user")?;
    accounts
        .grant(mailbox_proto::v1::GrantRequest {
            name: "demo".into(),
            mailbox: "/inbox".into(),
            perms: "list,upload,download,delete,create".into(),
            no_subtree: false,
        })
        .await
        .context("grant /inbox to the demo user")?;

    if let Some(parent) = args.client_config.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut client_cfg = format!(
        "# Written by `mailboxd dev` (make run).\ndefault-dc = \"{}\"\n",
        args.dcs[0]
    );
    for (k, dc) in args.dcs.iter().enumerate() {
        client_cfg.push_str(&format!(
            "\n[dcs.{dc}]\nendpoints = [{}]\n",
            quoted(&args.addrs(k))
        ));
    }
    std::fs::write(&args.client_config, client_cfg)?;
    Ok(leaders)
}

/// Runs the local cluster until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if !matches!(args.nodes, 1 | 3 | 5) {
        bail!("--nodes must be 1, 3 or 5");
    }
    if args.dcs.is_empty() {
        bail!("--dcs needs at least one name");
    }
    let root = std::path::absolute(&args.dir)?;
    let mut shutdown = Shutdown::new()?;
    let mut sup = Supervisor {
        exe: std::env::current_exe()?,
        nodes: Vec::new(),
        base_delay: args.restart_delay,
        restart: !args.no_restart,
    };
    // Startup can take up to a minute per DC; a signal meanwhile, or a
    // failure, still stops the nodes already started.
    let started = tokio::select! {
        r = start(&args, &root, &mut sup) => Some(r),
        _ = shutdown.recv() => None,
    };
    let leaders = match started {
        Some(Ok(leaders)) => leaders,
        Some(Err(e)) => {
            sup.stop_all().await;
            return Err(e);
        }
        None => {
            sup.stop_all().await;
            return Ok(());
        }
    };

    println!();
    for (k, dc) in args.dcs.iter().enumerate() {
        println!("Data center '{dc}' is up; leader is node {}.", leaders[k]);
        let nodes = sup.nodes.iter().filter(|n| &n.dc == dc);
        for (node, (a, h)) in nodes.zip(args.addrs(k).iter().zip(args.http_addrs(k))) {
            println!(
                "  node {}  pid {:<7} grpc://{a}   metrics: http://{h}/metrics   log: {}",
                node.id,
                node.pid,
                node.log.display()
            );
        }
    }
    println!(
        "Client config: {} (the `mailbox` CLI finds it from this directory)",
        args.client_config.display()
    );
    println!();
    println!("Try, in another terminal from this directory:");
    println!(
        "  mailbox put README.md /inbox                    # into {} (the default DC)",
        args.dcs[0]
    );
    if let Some(other) = args.dcs.get(1) {
        println!("  mailbox --dc {other} put Makefile /inbox          # into {other}");
        println!("  mailbox --dc {other} ls /inbox                    # both files, replicated");
        println!(
            "  mailbox stat <ID>                               # which DCs hold it, since when"
        );
        println!("  mailbox replication status                      # cursor, lag, pending per remote DC");
        println!(
            "  mailbox put --ack immediate README.md /inbox    # wait until {other} holds it too"
        );
    }
    println!("  mailbox get <ID> -o /tmp/copy");
    println!("  mailbox cluster status");
    println!(
        "  curl -s http://{}/metrics | grep ^mailbox_   # Prometheus metrics of a node",
        args.http_addrs(0)[0]
    );
    println!(
        "  mailbox user ls                                 # partner `demo` (password `demo`), granted /inbox in every DC"
    );
    println!(
        "  mailbox rules add arrivals --mailbox /inbox --queue arrivals && \\\n    curl -su demo:demo 'http://{}/api/v1/events/arrivals/next?wait=30s'   # events for scripts",
        args.http_addrs(0)[0]
    );
    println!();
    if args.no_restart {
        println!(
            "kill -9 a node's pid to watch failover with `mailbox cluster status`; \
             it stays down (--no-restart)."
        );
    } else {
        println!(
            "kill -9 a node's pid to watch failover with `mailbox cluster status`; \
             it is restarted after {:?} (--no-restart to leave it down).",
            args.restart_delay
        );
    }
    println!("Press Ctrl-C to stop all nodes.");

    sup.run(&mut shutdown).await;
    sup.stop_all().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        dev: DevArgs,
    }

    #[test]
    fn http_ports_never_collide_with_grpc_ports() {
        let args = Cli::parse_from(["dev", "--nodes", "5", "--dcs", "a,b,c"]).dev;
        let mut all = std::collections::HashSet::new();
        for k in 0..3 {
            for a in args.addrs(k).into_iter().chain(args.http_addrs(k)) {
                assert!(all.insert(a.clone()), "{a} used twice");
            }
        }
        assert_eq!(args.http_addrs(1)[0], "127.0.0.1:7251");
        let toml = node_toml(&args, 1, Path::new("/tmp/x"), 2);
        let cfg: mailbox_server::NodeConfig = toml::from_str(&toml).unwrap();
        assert_eq!(cfg.http_listen.as_deref(), Some("127.0.0.1:7252"));
        assert_eq!(cfg.listen, "127.0.0.1:7202");
    }

    #[test]
    fn restart_options_parse() {
        let args = Cli::parse_from(["dev"]).dev;
        assert_eq!(args.restart_delay, Duration::from_secs(3));
        assert!(!args.no_restart);
        let args = Cli::parse_from(["dev", "--restart-delay", "0.5s", "--no-restart"]).dev;
        assert_eq!(args.restart_delay, Duration::from_millis(500));
        assert!(args.no_restart);
        assert!(Cli::try_parse_from(["dev", "--restart-delay", "soon"]).is_err());
        assert!(Cli::try_parse_from(["dev", "--restart-delay", "-1"]).is_err());
    }

    #[test]
    fn a_crash_looping_node_backs_off_and_a_healthy_run_resets() {
        let base = Duration::from_secs(3);
        let quick = Duration::from_secs(2);
        let long = Duration::from_secs(30);
        // The first death waits the base delay, however quick.
        assert_eq!(next_delay(None, quick, base), base);
        let mut d = base;
        let mut seen = vec![];
        for _ in 0..7 {
            d = next_delay(Some(d), quick, base);
            seen.push(d.as_secs());
        }
        assert_eq!(seen, [6, 12, 24, 48, 60, 60, 60]);
        assert_eq!(next_delay(Some(d), long, base), base);
        // --restart-delay 0 still backs off from a crash loop.
        let zero = Duration::ZERO;
        assert_eq!(next_delay(Some(zero), quick, zero), Duration::from_secs(1));
        // A base above the cap is not shortened.
        let big = Duration::from_secs(90);
        assert_eq!(next_delay(Some(big), quick, big), big);
    }
}
