//! A running member of a DC log, and proposing from any member.
//!
//! [`RaftNode::propose`] is what the services call: on the leader it writes
//! directly; on a follower it forwards the command to the leader over the
//! internal service, then waits until the local state machine has applied
//! the same index, so a client that wrote through this node reads its own
//! write from it. While no leader is known (an election is under way) it
//! retries until `propose_timeout`, then fails with a retryable
//! [`RaftError::Unavailable`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailbox_proto::raft::raft_internal_client::RaftInternalClient;
use mailbox_proto::raft::RaftBytes;
use mailbox_state::{ApplyCtx, Command, CommandResponse, CommandResult};
use mailbox_storage::Store;
use openraft::error::{ClientWriteError, RaftError as OrError};
use openraft::{Config, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::network::{channel, internal_client, Network};
use crate::sm_store::snapshot_dir;
use crate::{
    decode, encode, BasicNode, LogStore, NodeId, Raft, RaftError, StateMachineStore, StateView,
};

/// Deadline of one snapshot chunk RPC, the follower's install included
/// (about 10 s per GiB of state on a laptop disk; generous).
pub const SNAPSHOT_RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// Raft timing and log-compaction knobs.
#[derive(Debug, Clone)]
pub struct RaftTuning {
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Lower bound of the randomized election timeout.
    pub election_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_max: Duration,
    /// Build a snapshot after this many applied entries.
    pub snapshot_every: u64,
    /// Build a snapshot, too, once this many bytes were appended to the
    /// log since the last one.
    pub snapshot_log_bytes: u64,
    /// Entries kept in the log behind a snapshot (for slow followers).
    pub keep_logs: u64,
    /// How long a proposal may wait for a leader before failing.
    pub propose_timeout: Duration,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1000),
            // A snapshot reads and writes the whole state, so its cost grows
            // with the data held: every 10,000 entries it took ~6% of each
            // node's CPU under 1 KiB uploads with only a few hundred MB
            // of state. etcd's default (--snapshot-count) is 100,000 too;
            // the byte bound below keeps the log's size on disk bounded
            // when entries are large.
            snapshot_every: 100_000,
            snapshot_log_bytes: 256 << 20,
            keep_logs: 1_000,
            propose_timeout: Duration::from_secs(10),
        }
    }
}

/// What the leader answers to a forwarded proposal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    /// Committed and applied at `index`.
    Applied {
        /// Log index of the entry.
        index: u64,
        /// State machine result.
        response: CommandResponse,
    },
    /// The receiver is not the leader.
    NotLeader {
        /// Leader it knows of.
        leader: Option<NodeId>,
        /// That leader's address.
        addr: Option<String>,
    },
    /// The receiver's Raft stopped.
    Fatal(String),
    /// One reply per command of a forwarded `Command::Batch`, in order
    /// (each was proposed on its own: some may be applied, some not).
    Many(Vec<ForwardReply>),
    /// Not answered within the propose timeout: the entry may still
    /// commit, or never (a snapshot or a new leader replaced it). The
    /// caller retries as for a forward that timed out. (Last, so the
    /// other variants keep their bincode tags.)
    Unknown(String),
}

/// One node's view of itself, for cluster status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeReport {
    /// Node id.
    pub id: NodeId,
    /// Leader, Follower, Candidate, Learner or Shutdown.
    pub state: String,
    /// Current term.
    pub term: u64,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index of the last applied entry.
    pub applied_index: Option<u64>,
    /// Leader this node knows of.
    pub leader: Option<NodeId>,
    /// Voters and their addresses, from the membership config.
    pub members: Vec<(NodeId, String)>,
    /// Last log index included in the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Last purged log index.
    pub purged_index: Option<u64>,
    /// On the leader: per follower, the last log index known to be
    /// replicated there (a follower that falls behind shows here).
    pub matched: Vec<(NodeId, Option<u64>)>,
}

/// Commands merged into one log entry at most (group commit).
const MAX_BATCH: usize = 128;
/// Inline payload bytes merged into one log entry at most.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Log entries being committed at once; while they are, new proposals queue
/// up and go out together in the next entry. 2 rather than 4: bigger
/// batches, fewer per-entry costs (benches/ab.sh, 3 alternating rounds,
/// spread over 3 nodes: +5%, +10%, +9% uploads/s and p999 94-205 ms
/// against 180-615; leader-routed -7%, +4%, +3%).
const BATCHES_IN_FLIGHT: usize = 2;
/// Proposals waiting for a batch at most (then callers wait: backpressure).
const PROPOSAL_QUEUE: usize = 4096;

type Proposal = (Command, tokio::sync::oneshot::Sender<ForwardReply>);

/// Forwarded proposals waiting for a forward RPC at most.
const FORWARD_QUEUE: usize = 4096;
/// Forward RPCs in flight at once; while they are, new forwards queue up
/// and go out together in the next one (2: as `BATCHES_IN_FLIGHT`).
const FORWARDS_IN_FLIGHT: usize = 2;

/// A proposal for the leader at `addr`, with its caller's deadline.
type Forwarded = (
    String,
    Command,
    Instant,
    tokio::sync::oneshot::Sender<Result<ForwardReply, RaftError>>,
);

type Peers = Arc<Mutex<HashMap<String, RaftInternalClient<Channel>>>>;

/// How well proposals are being batched, counted since the node started:
/// the commands per log entry and per forward RPC are the ratios that
/// decide small-write throughput (`/metrics` publishes both pairs).
#[derive(Debug, Default)]
pub struct BatchCounters {
    entries: AtomicU64,
    commands: AtomicU64,
    forward_rpcs: AtomicU64,
    forwarded: AtomicU64,
}

/// A reading of [`BatchCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Log entries this node proposed as leader and saw applied
    /// (group-commit batches; background commands included).
    pub entries: u64,
    /// Commands in those entries.
    pub commands: u64,
    /// Forward RPCs this node sent to a leader that answered them.
    pub forward_rpcs: u64,
    /// Commands in those RPCs.
    pub forwarded: u64,
}

impl BatchCounters {
    fn commands_in(cmd: &Command) -> u64 {
        match cmd {
            Command::Batch(c) => c.len() as u64,
            _ => 1,
        }
    }

    fn entry(&self, commands: u64) {
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.commands.fetch_add(commands, Ordering::Relaxed);
    }

    fn forward(&self, commands: u64) {
        self.forward_rpcs.fetch_add(1, Ordering::Relaxed);
        self.forwarded.fetch_add(commands, Ordering::Relaxed);
    }

    fn read(&self) -> BatchStats {
        BatchStats {
            entries: self.entries.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            forward_rpcs: self.forward_rpcs.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
        }
    }
}

struct Inner {
    id: NodeId,
    dc: String,
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    applied: tokio::sync::watch::Receiver<u64>,
    raft: Raft,
    view: StateView,
    peers: Peers,
    forwards: tokio::sync::mpsc::Sender<Forwarded>,
    propose_timeout: Duration,
    snapshot_dir: std::path::PathBuf,
    batching: Arc<BatchCounters>,
}

/// A running DC log member. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    inner: Arc<Inner>,
}

impl RaftNode {
    /// Starts Raft for node `id` over `store`, snapshots under `data_dir`.
    pub async fn start(
        id: NodeId,
        dc: &str,
        store: Store,
        data_dir: &Path,
        tuning: &RaftTuning,
    ) -> Result<Self, RaftError> {
        let config = Config {
            cluster_name: "mailbox-dc".into(),
            heartbeat_interval: tuning.heartbeat.as_millis() as u64,
            election_timeout_min: tuning.election_min.as_millis() as u64,
            election_timeout_max: tuning.election_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(tuning.snapshot_every),
            max_in_snapshot_log_to_keep: tuning.keep_logs,
            snapshot_max_chunk_size: 4 << 20,
            // The deadline of every snapshot chunk RPC, and the last one
            // carries the whole install on the follower (streaming the
            // file into RocksDB): openraft's 200 ms would fail every
            // install of a large state and start it over.
            install_snapshot_timeout: SNAPSHOT_RPC_TIMEOUT.as_millis() as u64,
            // Entries the leader reads from its log per AppendEntries: a
            // group-commit entry holds up to 4 MiB, and only 2 MiB cross
            // per RPC (`APPEND_MAX_BYTES`); openraft's 300 would load
            // hundreds of MiB to catch up a follower.
            max_payload_entries: 16,
            ..Default::default()
        }
        .validate()
        .map_err(|e| RaftError::Fatal {
            reason: format!("invalid raft config: {e}"),
        })?;
        let sm = StateMachineStore::new(store.clone(), snapshot_dir(data_dir), ApplyCtx::new(dc))
            .map_err(|e| RaftError::Fatal {
            reason: format!("snapshot dir: {e}"),
        })?;
        let view = sm.view();
        let applied = sm.applied_watch();
        let log = LogStore::new(store).with_state(sm.durability());
        let appended = log.appended_bytes();
        let raft = Raft::new(id, Arc::new(config), Network, log, sm)
            .await
            .map_err(|e| RaftError::Fatal {
                reason: e.to_string(),
            })?;
        tokio::spawn(snapshot_by_size(
            raft.clone(),
            appended,
            tuning.snapshot_log_bytes,
        ));
        let batching = Arc::new(BatchCounters::default());
        let (proposals, queue) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE);
        tokio::spawn(group_commit(
            {
                let raft = raft.clone();
                let batching = batching.clone();
                move |cmd: Command| {
                    let (raft, batching) = (raft.clone(), batching.clone());
                    async move {
                        let commands = BatchCounters::commands_in(&cmd);
                        let reply = client_write(raft, cmd).await;
                        // Only entries that made it into the log count.
                        if matches!(reply, ForwardReply::Applied { .. }) {
                            batching.entry(commands);
                        }
                        reply
                    }
                }
            },
            queue,
            tuning.propose_timeout,
        ));
        let peers = Peers::default();
        let (forwards, fqueue) = tokio::sync::mpsc::channel(FORWARD_QUEUE);
        tokio::spawn(forward_batches(
            {
                let peers = peers.clone();
                let batching = batching.clone();
                move |addr: String, cmd: Command, timeout: Duration| {
                    let (peers, batching) = (peers.clone(), batching.clone());
                    async move {
                        let reply = forward_rpc(&peers, &addr, &cmd, timeout).await;
                        // Only RPCs the leader answered count.
                        if reply.is_ok() {
                            batching.forward(BatchCounters::commands_in(&cmd));
                        }
                        reply
                    }
                }
            },
            fqueue,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                id,
                dc: dc.to_string(),
                proposals,
                applied,
                raft,
                view,
                peers,
                forwards,
                propose_timeout: tuning.propose_timeout,
                snapshot_dir: snapshot_dir(data_dir),
                batching,
            }),
        })
    }

    /// How this node's proposals and forwards were batched so far.
    pub fn batch_stats(&self) -> BatchStats {
        self.inner.batching.read()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The DC whose log this node keeps.
    pub fn dc(&self) -> &str {
        &self.inner.dc
    }

    /// The openraft handle.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Wakes after every apply batch with the last applied index.
    pub fn applied_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.applied.clone()
    }

    /// Read view of the applied state.
    pub fn view(&self) -> &StateView {
        &self.inner.view
    }

    /// Forms the DC from `members` if this node's log is still empty. Safe to
    /// call on every start: an initialized node ignores it.
    pub async fn initialize(&self, members: BTreeMap<NodeId, BasicNode>) -> Result<(), RaftError> {
        if self.inner.raft.is_initialized().await.map_err(fatal)? {
            return Ok(());
        }
        match self.inner.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(OrError::APIError(e)) => {
                tracing::info!("initialize skipped: {e}");
                Ok(())
            }
            Err(OrError::Fatal(f)) => Err(fatal(f)),
        }
    }

    /// Builds a snapshot of this node's state now and waits until it is
    /// written; returns the last log index it covers and the size of the
    /// current snapshot file. On the leader this also lets the log be
    /// purged behind it (keeping `keep-logs`).
    pub async fn snapshot_now(&self, timeout: Duration) -> Result<(u64, u64), RaftError> {
        let applied = self
            .inner
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0);
        self.inner.raft.trigger().snapshot().await.map_err(fatal)?;
        let m = self
            .inner
            .raft
            .wait(Some(timeout))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot built",
            )
            .await
            .map_err(|e| RaftError::Unavailable {
                reason: format!("snapshot not built within {timeout:?}: {e}"),
            })?;
        let bytes = std::fs::metadata(self.inner.snapshot_dir.join("current.snap"))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok((m.snapshot.map(|s| s.index).unwrap_or(0), bytes))
    }

    /// Proposes on this node's Raft only; a follower answers `NotLeader`.
    pub async fn propose_local(&self, cmd: Command) -> ForwardReply {
        let rx = self.enqueue_local(cmd).await;
        rx.await
            .unwrap_or_else(|_| ForwardReply::Fatal("raft stopped".into()))
    }

    /// Queues `cmd` for this node's group commit; the receiver gets the
    /// reply. Queuing several before awaiting any puts them in one entry.
    pub async fn enqueue_local(
        &self,
        cmd: Command,
    ) -> tokio::sync::oneshot::Receiver<ForwardReply> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Err(e) = self.inner.proposals.send((cmd, tx)).await {
            let _ = e.0 .1.send(ForwardReply::Fatal("raft stopped".into()));
        }
        rx
    }

    /// The leader and its address, when this node knows one that is not
    /// itself (a follower then forwards at once instead of first asking
    /// its own Raft, which would only answer "not the leader").
    fn known_leader(&self) -> Option<(NodeId, String)> {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        let l = m.current_leader.filter(|l| *l != self.inner.id)?;
        let addr = m.membership_config.membership().get_node(&l)?.addr.clone();
        Some((l, addr))
    }
}

fn peer_client(peers: &Peers, addr: &str) -> Result<RaftInternalClient<Channel>, RaftError> {
    let mut peers = peers.lock().expect("peer map lock");
    if let Some(c) = peers.get(addr) {
        return Ok(c.clone());
    }
    let ch = channel(addr, None).map_err(|e| RaftError::Unavailable {
        reason: format!("bad leader address {addr}: {e}"),
    })?;
    let c = internal_client(ch);
    peers.insert(addr.to_string(), c.clone());
    Ok(c)
}

async fn forward_rpc(
    peers: &Peers,
    addr: &str,
    cmd: &Command,
    timeout: Duration,
) -> Result<ForwardReply, RaftError> {
    let mut client = peer_client(peers, addr)?;
    let mut req = tonic::Request::new(RaftBytes {
        data: encode(cmd).into(),
    });
    req.set_timeout(timeout);
    // Bounded here too: `set_timeout` only asks the server to give up
    // (grpc-timeout); a leader that stopped answering altogether (frozen,
    // or behind a link that drops packets) would hold the forward, and one
    // of the few forward slots, until HTTP/2 keep-alive noticed.
    let reply = tokio::time::timeout(timeout, client.forward(req))
        .await
        .map_err(|_| RaftError::Unavailable {
            reason: format!("forward to leader at {addr}: no answer within {timeout:?}"),
        })?
        .map_err(|s| RaftError::Unavailable {
            reason: format!("forward to leader at {addr}: {}", s.message()),
        })?;
    decode(&reply.into_inner().data)
}

/// Whether a queued forward's caller has given up (its deadline passed or
/// it stopped waiting); such a forward is dropped unsent.
fn abandoned(f: &Forwarded) -> bool {
    f.3.is_closed() || f.2 <= Instant::now()
}

/// Triggers a snapshot once `limit` bytes were appended to the log since the
/// last one: openraft's policy counts entries only, and a group-commit entry
/// holds from a few hundred bytes to 4 MiB, so a count alone bounds the
/// log's size on disk only at 4 MiB times the count. Ends with the node.
async fn snapshot_by_size(raft: Raft, appended: Arc<AtomicU64>, limit: u64) {
    let metrics = raft.metrics();
    let snapshot_index = |m: &openraft::RaftMetrics<NodeId, BasicNode>| m.snapshot.map(|l| l.index);
    let mut seen = snapshot_index(&metrics.borrow());
    // Bytes appended when the latest snapshot (or trigger) was seen.
    let mut mark = appended.load(Ordering::Relaxed);
    loop {
        // A tick, not every metrics change (thousands a second under load).
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The metrics sender is gone once this node's Raft has shut down.
        if metrics.has_changed().is_err() {
            return;
        }
        let now = appended.load(Ordering::Relaxed);
        let snap = snapshot_index(&metrics.borrow());
        if snap != seen {
            seen = snap;
            mark = now;
        } else if now.saturating_sub(mark) >= limit {
            tracing::info!(
                bytes = now - mark,
                "log grew past raft.snapshot-log-size since the last snapshot: building one"
            );
            // Marked at once: a build that fails, or finds nothing new to
            // cover, is asked for again only after another `limit` bytes.
            mark = now;
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

/// Batched forwarding, the follower's half of group commit: proposals for
/// the leader that queue up while earlier forward RPCs are out go together
/// in one RPC (a `Command::Batch`, which the leader proposes command by
/// command into its own group commit, answering `ForwardReply::Many`).
/// Without it every upload through a follower was an RPC of its own.
///
/// Each leader address has a lane of its own (queue and slots): forwards
/// stuck on a leader that stopped answering hold only that lane's slots
/// until their deadlines, and forwards to the leader elected after it go
/// out at once. A lane whose queue is full answers `Unavailable` at once
/// (the caller retries against whatever leader it knows then).
async fn forward_batches<R, F>(rpc: R, mut queue: tokio::sync::mpsc::Receiver<Forwarded>)
where
    R: Fn(String, Command, Duration) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<ForwardReply, RaftError>> + Send + 'static,
{
    let mut lanes: HashMap<String, tokio::sync::mpsc::Sender<Forwarded>> = HashMap::new();
    while let Some(f) = queue.recv().await {
        if abandoned(&f) {
            continue;
        }
        let lane = lanes.entry(f.0.clone()).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(FORWARD_QUEUE);
            tokio::spawn(forward_lane(rpc.clone(), f.0.clone(), rx));
            tx
        });
        if let Err(e) = lane.try_send(f) {
            let (tokio::sync::mpsc::error::TrySendError::Full(f)
            | tokio::sync::mpsc::error::TrySendError::Closed(f)) = e;
            let _ = f.3.send(Err(RaftError::Unavailable {
                reason: format!(
                    "{FORWARD_QUEUE} forwards already queued for the leader at {}",
                    f.0
                ),
            }));
        }
    }
}

/// One leader address's forwards, batched into RPCs with
/// `FORWARDS_IN_FLIGHT` of them out at once.
async fn forward_lane<R, F>(rpc: R, addr: String, mut queue: tokio::sync::mpsc::Receiver<Forwarded>)
where
    R: Fn(String, Command, Duration) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<ForwardReply, RaftError>> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(FORWARDS_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        // A proposal whose caller gave up while it queued is not sent: its
        // caller already answered "outcome unknown", and sending it now
        // would only stretch that window.
        if abandoned(&first) {
            continue;
        }
        let mut deadline = first.2;
        let mut bytes = approx_bytes(&first.1);
        let mut group = vec![first];
        while group.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(f) if abandoned(&f) => {}
                Ok(f) => {
                    bytes += approx_bytes(&f.1);
                    // The RPC waits as long as its most patient caller.
                    deadline = deadline.max(f.2);
                    group.push(f);
                }
                Err(_) => break,
            }
        }
        let rpc = rpc.clone();
        let addr = addr.clone();
        let timeout = deadline.saturating_duration_since(Instant::now());
        tokio::spawn(async move {
            if group.len() == 1 {
                let (_, cmd, _, tx) = group.pop().expect("one forward");
                let _ = tx.send(rpc(addr, cmd, timeout).await);
            } else {
                let (cmds, txs): (Vec<_>, Vec<_>) =
                    group.into_iter().map(|(_, c, _, tx)| (c, tx)).unzip();
                let n = cmds.len();
                match rpc(addr, Command::Batch(cmds), timeout).await {
                    Ok(ForwardReply::Many(replies)) if replies.len() == n => {
                        for (tx, r) in txs.into_iter().zip(replies) {
                            let _ = tx.send(Ok(r));
                        }
                    }
                    Ok(ForwardReply::Many(replies)) => {
                        let reason =
                            format!("{} replies to {n} forwarded proposals", replies.len());
                        for tx in txs {
                            let _ = tx.send(Ok(ForwardReply::Fatal(reason.clone())));
                        }
                    }
                    Ok(other) => {
                        for tx in txs {
                            let _ = tx.send(Ok(other.clone()));
                        }
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        for tx in txs {
                            let _ = tx.send(Err(RaftError::Unavailable {
                                reason: reason.clone(),
                            }));
                        }
                    }
                }
            }
            drop(slot);
        });
    }
}

/// Group commit: proposals that queue up while earlier log entries are being
/// committed go out together as one `Command::Batch` entry, so one WAL fsync
/// and one replication round serve them all. A lone proposal is sent as is.
///
/// Each entry is awaited for `timeout` at most: openraft answers a
/// proposal only once its entry is applied or overwritten, and never for
/// one a snapshot covered before it was applied here (a former leader
/// catching up past its own proposals). Awaited for good, such entries
/// would keep their slots and every later proposal would wait behind them.
/// (`write` is openraft's `client_write`; a parameter so the slot
/// accounting can be tested against a write that never returns.)
async fn group_commit<W, F>(
    write: W,
    mut queue: tokio::sync::mpsc::Receiver<Proposal>,
    timeout: Duration,
) where
    W: Fn(Command) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = ForwardReply> + Send,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        // A proposal whose caller stopped waiting (it timed out and
        // answered "outcome unknown") is not written: it would only commit
        // later than anyone expects.
        if first.1.is_closed() {
            continue;
        }
        let mut bytes = inline_bytes(&first.0);
        let mut group = vec![first];
        while group.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(p) if p.1.is_closed() => {}
                Ok(p) => {
                    bytes += inline_bytes(&p.0);
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        let write = write.clone();
        tokio::spawn(async move {
            if group.len() == 1 {
                let (cmd, tx) = group.pop().expect("one proposal");
                let _ = tx.send(bounded(write(cmd), timeout).await);
            } else {
                let (cmds, txs): (Vec<_>, Vec<_>) = group.into_iter().unzip();
                let n = cmds.len();
                match bounded(write(Command::Batch(cmds)), timeout).await {
                    ForwardReply::Applied {
                        index,
                        response: Ok(CommandResult::Batch(results)),
                    } if results.len() == n => {
                        for (tx, response) in txs.into_iter().zip(results) {
                            let _ = tx.send(ForwardReply::Applied { index, response });
                        }
                    }
                    ForwardReply::Applied { response, .. } => {
                        let reason =
                            format!("batch applied with an unexpected result: {response:?}");
                        for tx in txs {
                            let _ = tx.send(ForwardReply::Fatal(reason.clone()));
                        }
                    }
                    other => {
                        for tx in txs {
                            let _ = tx.send(other.clone());
                        }
                    }
                }
            }
            drop(slot);
        });
    }
}

/// `write`'s reply, or `Unknown` once `timeout` has passed.
async fn bounded(
    write: impl std::future::Future<Output = ForwardReply>,
    timeout: Duration,
) -> ForwardReply {
    tokio::time::timeout(timeout, write)
        .await
        .unwrap_or_else(|_| {
            ForwardReply::Unknown(format!(
                "not committed within {timeout:?} (the leader may have lost its quorum); \
             the outcome is unknown"
            ))
        })
}

fn inline_bytes(cmd: &Command) -> usize {
    approx_bytes(cmd)
}

/// Roughly what a command weighs in a log entry: its inline payloads
/// (batches and remote feed records included), plus a fixed overhead.
pub(crate) fn approx_bytes(cmd: &Command) -> usize {
    match cmd {
        Command::PutMessage {
            inline: Some(b), ..
        } => b.len() + 256,
        Command::Batch(cmds) => cmds.iter().map(approx_bytes).sum(),
        Command::ApplyRemote { records, .. } => records.iter().map(|(_, r)| record_bytes(r)).sum(),
        Command::ApplyResync { records, .. } => records.iter().map(record_bytes).sum(),
        _ => 256,
    }
}

fn record_bytes(r: &mailbox_state::FeedRecord) -> usize {
    match r {
        mailbox_state::FeedRecord::Message {
            inline: Some(b), ..
        } => b.len() + 256,
        _ => 256,
    }
}

async fn client_write(raft: Raft, cmd: Command) -> ForwardReply {
    {
        match raft.client_write(cmd).await {
            Ok(r) => ForwardReply::Applied {
                index: r.log_id.index,
                response: r.data,
            },
            Err(OrError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                ForwardReply::NotLeader {
                    leader: f.leader_id,
                    addr: f.leader_node.map(|n| n.addr),
                }
            }
            Err(OrError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                ForwardReply::Fatal(e.to_string())
            }
            Err(OrError::Fatal(f)) => ForwardReply::Fatal(f.to_string()),
        }
    }
}

impl RaftNode {
    /// Sends `cmd` to the leader at `addr` in the next batched forward.
    async fn forward(
        &self,
        addr: &str,
        cmd: &Command,
        timeout: Duration,
    ) -> Result<ForwardReply, RaftError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let deadline = Instant::now() + timeout;
        self.inner
            .forwards
            .send((addr.to_string(), cmd.clone(), deadline, tx))
            .await
            .map_err(|_| fatal("raft stopped"))?;
        // Waiting for a forward slot counts against the deadline too (and
        // a forward still queued at it is dropped unsent).
        tokio::time::timeout_at(deadline, rx)
            .await
            .map_err(|_| RaftError::Unavailable {
                reason: format!("forward to leader at {addr}: no answer within {timeout:?}"),
            })?
            // Dropped unanswered: still queued when its deadline passed
            // (so never sent), or the forwarding task ended with the node.
            .map_err(|_| RaftError::Unavailable {
                reason: format!("forward to leader at {addr}: not sent before its deadline"),
            })?
    }

    /// Commits `cmd` to the DC log from any member and returns the state
    /// machine's answer. Retries while there is no leader, up to the
    /// configured propose timeout.
    #[tracing::instrument(level = "debug", skip_all, fields(node = self.inner.id))]
    pub async fn propose(&self, cmd: Command) -> Result<CommandResponse, RaftError> {
        let deadline = Instant::now() + self.inner.propose_timeout;
        let mut backoff = Duration::from_millis(20);
        let mut last_problem;
        loop {
            let reply = match self.known_leader() {
                Some((l, addr)) => ForwardReply::NotLeader {
                    leader: Some(l),
                    addr: Some(addr),
                },
                // Bounded like a forward: openraft answers a leader's
                // proposal only once it is applied or overwritten, so a
                // leader without its quorum (which openraft does not step
                // down) or one whose entry was replaced by a snapshot would
                // hold the caller forever, and with it, say, a whole feed
                // pull. The outcome is then unknown (the entry may still
                // commit), which every caller already handles as for a
                // forward that timed out.
                None => tokio::time::timeout_at(deadline, self.propose_local(cmd.clone()))
                    .await
                    .map_err(|_| RaftError::Unavailable {
                        reason: format!(
                            "not committed within {:?} (this node may have lost its quorum); \
                             the outcome is unknown: retry with the same idempotency key",
                            self.inner.propose_timeout
                        ),
                    })?,
            };
            last_problem = match reply {
                ForwardReply::Applied { response, .. } => return Ok(response),
                ForwardReply::Fatal(reason) => return Err(RaftError::Fatal { reason }),
                ForwardReply::Many(_) => {
                    return Err(fatal("a single proposal answered with many replies"))
                }
                ForwardReply::Unknown(reason) => return Err(RaftError::Unavailable { reason }),
                ForwardReply::NotLeader {
                    leader: Some(l),
                    addr: Some(addr),
                } if l != self.inner.id => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self
                        .forward(&addr, &cmd, left.max(Duration::from_millis(100)))
                        .await
                    {
                        Ok(ForwardReply::Applied { index, response }) => {
                            self.wait_applied(index, deadline).await;
                            return Ok(response);
                        }
                        Ok(ForwardReply::Fatal(reason)) => format!("leader {l}: {reason}"),
                        Ok(ForwardReply::Many(_)) => format!("leader {l}: many replies to one"),
                        Ok(ForwardReply::Unknown(reason)) => {
                            return Err(RaftError::Unavailable {
                                reason: format!("leader {l}: {reason}"),
                            })
                        }
                        Ok(ForwardReply::NotLeader { .. }) => {
                            format!("node {l} is no longer leader")
                        }
                        Err(e) => e.to_string(),
                    }
                }
                ForwardReply::NotLeader { .. } => "no leader elected yet".to_string(),
            };
            if Instant::now() + backoff > deadline {
                return Err(RaftError::Unavailable {
                    reason: last_problem,
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Waits until this node has applied `index` (best effort, until `deadline`).
    async fn wait_applied(&self, index: u64, deadline: Instant) {
        // On the state machine's own watch of the applied index, not
        // openraft's `wait()`: that clones the whole metrics (membership
        // maps included) for every waiter on every metrics change, and a
        // follower under load has dozens of writes waiting here.
        let until = deadline.max(Instant::now() + Duration::from_millis(500));
        let mut applied = self.inner.applied.clone();
        let _ = tokio::time::timeout_at(until, applied.wait_for(|a| *a >= index)).await;
    }

    /// Waits until the DC has a leader that this node knows, or `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, RaftError> {
        let m = self
            .inner
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "leader known")
            .await
            .map_err(|e| RaftError::Unavailable {
                reason: e.to_string(),
            })?;
        Ok(m.current_leader.expect("checked"))
    }

    /// Whether this node currently leads the DC log (reads the metrics
    /// watch in place; no clone of the membership).
    pub fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().current_leader == Some(self.inner.id)
    }

    /// Resolves when this node's Raft stops on its own (openraft's fatal
    /// error: a log or state-machine storage failure), with the reason.
    /// Never resolves while Raft runs.
    pub async fn stopped(&self) -> String {
        let mut m = self.inner.raft.metrics();
        loop {
            if let Err(f) = &m.borrow_and_update().running_state {
                return f.to_string();
            }
            if m.changed().await.is_err() {
                return "raft stopped".into();
            }
        }
    }

    /// This node's current Raft state.
    pub fn report(&self) -> NodeReport {
        let m = self.inner.raft.metrics().borrow().clone();
        NodeReport {
            id: m.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            leader: m.current_leader,
            members: m
                .membership_config
                .nodes()
                .map(|(id, n)| (*id, n.addr.clone()))
                .collect(),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            matched: m
                .replication
                .iter()
                .flatten()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, l)| (*id, l.map(|l| l.index)))
                .collect(),
        }
    }

    /// Asks the node at `addr` for its report.
    pub async fn remote_report(&self, addr: &str) -> Result<NodeReport, RaftError> {
        let mut client = peer_client(&self.inner.peers, addr)?;
        let mut req = tonic::Request::new(RaftBytes {
            data: bytes::Bytes::new(),
        });
        req.set_timeout(Duration::from_secs(2));
        let r = client
            .status(req)
            .await
            .map_err(|s| RaftError::Unavailable {
                reason: format!("{addr}: {}", s.message()),
            })?;
        decode(&r.into_inner().data)
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        let _ = self.inner.raft.shutdown().await;
    }
}

fn fatal(f: impl std::fmt::Display) -> RaftError {
    RaftError::Fatal {
        reason: f.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A proposal whose write never returns (openraft never answers an
    /// entry a snapshot covered before it was applied) must give its batch
    /// slot back after the timeout: before, each held one for good, and
    /// once `BATCHES_IN_FLIGHT` were held no proposal was written again.
    #[tokio::test]
    async fn a_write_that_never_returns_frees_its_slot_after_the_timeout() {
        let calls = Arc::new(AtomicUsize::new(0));
        let write = {
            let calls = calls.clone();
            move |_cmd: Command| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < BATCHES_IN_FLIGHT {
                        std::future::pending::<()>().await;
                    }
                    ForwardReply::Applied {
                        index: n as u64,
                        response: Ok(CommandResult::None),
                    }
                }
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(group_commit(write, rx, Duration::from_millis(200)));
        let mut stuck = Vec::new();
        for i in 0..BATCHES_IN_FLIGHT {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send((Command::Expire { before_ms: 0 }, reply))
                .await
                .unwrap();
            // One entry each: the next is queued only once this one is out.
            while calls.load(Ordering::SeqCst) <= i {
                tokio::task::yield_now().await;
            }
            stuck.push(answer);
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send((Command::Expire { before_ms: 0 }, reply))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("a proposal behind writes that never return is still written")
            .unwrap();
        assert!(
            matches!(got, ForwardReply::Applied { .. }),
            "written: {got:?}"
        );
        for answer in stuck {
            let got = answer.await.unwrap();
            assert!(
                matches!(got, ForwardReply::Unknown(_)),
                "the stuck one's outcome is unknown: {got:?}"
            );
        }
    }

    /// Queues a forward to `addr` whose caller waits `patience`.
    async fn forward_to(
        tx: &tokio::sync::mpsc::Sender<Forwarded>,
        addr: &str,
        patience: Duration,
    ) -> tokio::sync::oneshot::Receiver<Result<ForwardReply, RaftError>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let deadline = Instant::now() + patience;
        tx.send((
            addr.into(),
            Command::Expire { before_ms: 0 },
            deadline,
            reply,
        ))
        .await
        .unwrap();
        answer
    }

    /// Forwards to a leader that stopped answering (frozen, or behind a
    /// link that drops packets) must not hold up forwards to the leader
    /// elected after it: before, every address shared the same few slots,
    /// so writes through followers stalled until the old forwards' deadlines
    /// (up to the propose timeout) after a failover.
    #[tokio::test]
    async fn forwards_to_a_frozen_leader_do_not_block_forwards_to_the_new_one() {
        let frozen_calls = Arc::new(AtomicUsize::new(0));
        let rpc = {
            let frozen_calls = frozen_calls.clone();
            move |addr: String, _cmd: Command, timeout: Duration| {
                let frozen_calls = frozen_calls.clone();
                async move {
                    if addr == "frozen" {
                        frozen_calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(timeout).await;
                        return Err(RaftError::Unavailable {
                            reason: "no answer".into(),
                        });
                    }
                    Ok(ForwardReply::Applied {
                        index: 7,
                        response: Ok(CommandResult::None),
                    })
                }
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(forward_batches(rpc, rx));
        let mut stuck = Vec::new();
        for i in 0..FORWARDS_IN_FLIGHT + 2 {
            let answer = forward_to(&tx, "frozen", Duration::from_secs(60)).await;
            // One RPC each while slots are free (no batching them together).
            while i < FORWARDS_IN_FLIGHT && frozen_calls.load(Ordering::SeqCst) <= i {
                tokio::task::yield_now().await;
            }
            stuck.push(answer);
        }
        let answer = forward_to(&tx, "new", Duration::from_secs(5)).await;
        let got = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .expect("a forward to the new leader is sent while the old one's are stuck")
            .unwrap();
        assert!(
            matches!(got, Ok(ForwardReply::Applied { index: 7, .. })),
            "{got:?}"
        );
        drop(stuck);
    }

    /// A proposal whose caller stopped waiting before it was written is
    /// dropped, not committed later than anyone expects.
    #[tokio::test]
    async fn a_proposal_nobody_waits_for_is_not_written() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let write = {
            let written = written.clone();
            move |cmd: Command| {
                written.lock().unwrap().push(format!("{cmd:?}"));
                async move {
                    ForwardReply::Applied {
                        index: 1,
                        response: Ok(CommandResult::None),
                    }
                }
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (gone, answer) = tokio::sync::oneshot::channel();
        drop(answer);
        tx.send((Command::Expire { before_ms: 1 }, gone))
            .await
            .unwrap();
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send((Command::Expire { before_ms: 2 }, reply))
            .await
            .unwrap();
        tokio::spawn(group_commit(write, rx, Duration::from_secs(10)));
        let got = answer.await.unwrap();
        assert!(matches!(got, ForwardReply::Applied { .. }), "{got:?}");
        let written = written.lock().unwrap().clone();
        assert_eq!(written.len(), 1, "{written:?}");
        assert!(written[0].contains("before_ms: 2"), "{written:?}");
    }
}
