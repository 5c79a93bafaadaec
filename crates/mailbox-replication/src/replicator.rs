//! Pulling other DCs' feeds into this DC's log (leader only).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mailbox_proto::replication::replication_client::ReplicationClient;
use mailbox_proto::replication::{AckRequest, FeedRequest, PushedSegment};
use mailbox_proto::v1::mailbox_client::MailboxClient;
use mailbox_proto::v1::ClusterStatusRequest;
use mailbox_raft::RaftNode;
use mailbox_segments::SegmentStore;
use mailbox_state::{Command, CommandResult, FeedRecord};
use mailbox_types::{Digest, MessageId, MessageMeta};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::retry::{RetryKind, RetryTable};
use crate::{connect, fetcher, RemoteDc, RemoteStatus, ReplicationError, StatusHandle};

/// First reconnect delay of a failed feed pull.
const PULL_RETRY_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect delay of a failed feed pull.
const PULL_RETRY_CAP: Duration = Duration::from_secs(2);
/// Longest wait for a remote node to accept a feed request.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Received batches (their pushed segments being stored) queued for the
/// proposer, besides the one it is committing and the one being received.
const PIPELINE_DEPTH: usize = 2;
/// Pushed segments written at once.
const STORE_CONCURRENCY: usize = 4;
/// A pipeline step that takes longer than this is logged (once), naming
/// what it waits for: a pull that stalls must say where, not only show a
/// cursor that stopped.
const SLOW_STEP: Duration = Duration::from_secs(10);

/// Awaits `fut`, warning once if it takes longer than [`SLOW_STEP`].
async fn warn_if_slow<F: std::future::Future>(dc: &str, what: &str, fut: F) -> F::Output {
    tokio::pin!(fut);
    match tokio::time::timeout(SLOW_STEP, &mut fut).await {
        Ok(v) => v,
        Err(_) => {
            tracing::warn!(%dc, "feed pull: still waiting after {SLOW_STEP:?} for {what}");
            let started = std::time::Instant::now();
            let v = fut.await;
            tracing::warn!(%dc, "feed pull: {what} done after {:?} more", started.elapsed());
            v
        }
    }
}

/// Runs the feed pulls and the segment fetcher of one node.
pub struct Replicator {
    raft: RaftNode,
    local_dc: String,
    remotes: Vec<RemoteDc>,
    segments: Arc<dyn SegmentStore>,
    status: StatusHandle,
    retry: RetryTable,
}

impl Replicator {
    /// A replicator for DC `local_dc` pulling from `remotes`, keeping its
    /// retry schedule in `retry` and reporting into `status`.
    pub fn new(
        raft: RaftNode,
        local_dc: String,
        remotes: Vec<RemoteDc>,
        segments: Arc<dyn SegmentStore>,
        retry: RetryTable,
        status: StatusHandle,
    ) -> Self {
        Self {
            raft,
            local_dc,
            remotes,
            segments,
            status,
            retry,
        }
    }

    /// Live status, shared with the status RPC.
    pub fn status(&self) -> StatusHandle {
        self.status.clone()
    }

    /// Spawns one pull task per remote DC and the fetcher; they stop when
    /// `shutdown` turns true.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) {
        for remote in &self.remotes {
            tokio::spawn(pull_loop(
                self.raft.clone(),
                self.local_dc.clone(),
                remote.clone(),
                self.status.clone(),
                self.retry.clone(),
                self.segments.clone(),
                shutdown.clone(),
            ));
        }
        tokio::spawn(fetcher::run(
            self.raft.clone(),
            self.remotes.clone(),
            self.segments.clone(),
            self.status.clone(),
            self.retry,
            shutdown,
        ));
    }
}

pub(crate) fn is_leader(raft: &RaftNode) -> bool {
    raft.is_leader()
}

/// Waits until this node leads (true) or shutdown (false).
pub(crate) async fn wait_leadership(raft: &RaftNode, shutdown: &mut watch::Receiver<bool>) -> bool {
    let mut metrics = raft.raft().metrics();
    loop {
        if *shutdown.borrow() {
            return false;
        }
        if is_leader(raft) {
            return true;
        }
        tokio::select! {
            _ = metrics.changed() => {}
            _ = shutdown.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

fn set_status(status: &StatusHandle, dc: &str, f: impl FnOnce(&mut RemoteStatus)) {
    let mut map = status.remotes.lock().expect("status lock");
    f(map.entry(dc.to_string()).or_default());
}

async fn pull_loop(
    raft: RaftNode,
    local_dc: String,
    remote: RemoteDc,
    status: StatusHandle,
    retry: RetryTable,
    segments: Arc<dyn SegmentStore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let subject = remote.name.as_bytes();
    // Attempts survive restarts, so the status keeps counting.
    if let Ok(Some(e)) = retry.get(RetryKind::Pull, subject) {
        set_status(&status, &remote.name, |s| {
            s.retries = e.attempts as u64;
            s.last_error = e.last_error.clone();
        });
    }
    loop {
        set_status(&status, &remote.name, |s| keep_refused(s, "idle"));
        if !wait_leadership(&raft, &mut shutdown).await {
            return;
        }
        // Honour the persisted schedule (e.g. right after a restart).
        if let Ok(Some(e)) = retry.get(RetryKind::Pull, subject) {
            let wait = (e.due_ms - mailbox_types::now_ms()).clamp(0, 60_000) as u64;
            if wait > 0 {
                set_status(&status, &remote.name, |s| keep_refused(s, "disconnected"));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
        // A refused feed stays shown as refused while the pull retries
        // (an admin acts on it, and `reset-feed` checks for it), until a
        // pull connects.
        set_status(&status, &remote.name, |s| keep_refused(s, "connecting"));
        let result = tokio::select! {
            r = pull_once(&raft, &local_dc, &remote, &status, &retry, &segments) => r,
            _ = shutdown.changed() => return,
        };
        if let Err(e) = result {
            let refused = matches!(e, ReplicationError::FeedIdentityChanged { .. });
            let corrupt = matches!(e, ReplicationError::CorruptInline { .. });
            if refused {
                tracing::error!(dc = %remote.name, "feed pull stopped: {e}; after checking that DC, run `mailbox replication reset-feed {}`", remote.name);
            } else {
                tracing::warn!(dc = %remote.name, "feed pull: {e}");
            }
            set_status(&status, &remote.name, |s| {
                s.state = if refused {
                    "feed-identity-changed".into()
                } else if corrupt {
                    // Shown until a batch passes the check: a record that
                    // stays damaged stops this feed here, visibly.
                    "corrupt-feed".into()
                } else {
                    "disconnected".into()
                };
                s.retries += 1;
                s.last_error = e.to_string();
            });
            if let Err(te) = retry.record_failure(
                RetryKind::Pull,
                subject,
                &e.to_string(),
                mailbox_types::now_ms(),
                PULL_RETRY_BASE,
                PULL_RETRY_CAP,
            ) {
                tracing::error!(dc = %remote.name, "{te}");
                // Still back off, from memory.
                tokio::select! {
                    _ = tokio::time::sleep(PULL_RETRY_CAP) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

fn keep_refused(s: &mut RemoteStatus, state: &str) {
    if s.state != "feed-identity-changed" && s.state != "corrupt-feed" {
        s.state = state.into();
    }
}

async fn pull_once(
    raft: &RaftNode,
    local_dc: &str,
    remote: &RemoteDc,
    status: &StatusHandle,
    retry: &RetryTable,
    segments: &Arc<dyn SegmentStore>,
) -> Result<(), ReplicationError> {
    let cursor = mailbox_state::replication::cursor(raft.view(), &remote.name)
        .map_err(|e| ReplicationError::Local(e.to_string()))?;
    let identity = mailbox_state::replication::remote_feed_identity(raft.view(), &remote.name)
        .map_err(|e| ReplicationError::Local(e.to_string()))?
        .unwrap_or_default();
    let (channels, mut last_err) = leader_first(&remote.endpoints).await;
    let mut stream = None;
    let mut acks_to = None;
    let mut from_leader = false;
    for (ep, ch, leads) in channels {
        // Bounded: a link that accepts but never answers must not hold
        // the pull (and with it the whole DC's replication) indefinitely.
        let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
            ReplicationClient::new(ch.clone())
                .max_decoding_message_size(mailbox_proto::MAX_MESSAGE_SIZE)
                .feed(FeedRequest {
                    since: cursor,
                    dc: local_dc.to_string(),
                    identity: identity.clone(),
                })
                .await
        })
        .await;
        let opened = match opened {
            Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => {
                return Err(ReplicationError::FeedIdentityChanged {
                    dc: remote.name.clone(),
                    reason: s.message().to_string(),
                })
            }
            Ok(other) => other.map_err(|e| format!("{ep}: {}", e.message())),
            Err(_) => Err(format!("{ep}: no answer within {OPEN_TIMEOUT:?}")),
        };
        match opened {
            Ok(s) => {
                tracing::info!(dc = %remote.name, endpoint = %ep, leader = leads, cursor, "feed pull connected");
                stream = Some(s.into_inner());
                acks_to = Some(ReplicationClient::new(ch));
                from_leader = leads;
                break;
            }
            Err(e) => last_err = e,
        }
    }
    let mut stream = stream.ok_or_else(|| ReplicationError::Unreachable {
        dc: remote.name.clone(),
        reason: last_err,
    })?;
    set_status(status, &remote.name, |s| {
        s.cursor = cursor;
        // A feed stopped at a damaged record stays shown as such, with its
        // error, until a batch passes the checks.
        if s.state != "corrupt-feed" {
            s.state = "connected".into();
            s.last_error.clear();
        }
    });
    // Two stages: the receiver takes batches off the stream and starts
    // storing their pushed segments while the proposer commits earlier
    // batches, each once its segments are stored, so the link, the segment
    // fsyncs and the Raft commits overlap. The proposer is
    // one task committing in stream order; the state machine also refuses a
    // batch that does not follow the cursor, so no record is ever skipped.
    // (head, the batch's command being prepared, whether it is a resync:
    // those are never merged with feed batches.)
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(u64, Option<AbortOnDrop<Command>>, bool)>(PIPELINE_DEPTH);
    // The receiver owns the sending half: when it ends (this node no
    // longer leads, or an error), the proposer sees the channel close once
    // it has committed what was queued, and the pull ends. Borrowed
    // instead, the sender outlived the receiver, and a receiver that ended
    // cleanly (leadership lost) left the proposer waiting forever: this
    // node never pulled again, even once it led again.
    let receiver = async move {
        let tx = tx;
        let mut connected = false;
        let mut last_contact: Option<std::time::Instant> = None;
        // Payloads sent ahead of their records, being stored or stored.
        let mut early: EarlyJobs = HashMap::new();
        loop {
            // Idle feeds send keep-alives every 2s; silence for longer means the
            // link is dead even if TCP has not noticed.
            let next = tokio::time::timeout(Duration::from_secs(6), stream.next())
                .await
                .map_err(|_| ReplicationError::Unreachable {
                    dc: remote.name.clone(),
                    reason: "feed stream silent for 6s".into(),
                })?;
            let batch = match next {
                None => {
                    return Err(ReplicationError::Unreachable {
                        dc: remote.name.clone(),
                        reason: "feed stream ended".into(),
                    })
                }
                Some(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
                    return Err(ReplicationError::FeedIdentityChanged {
                        dc: remote.name.clone(),
                        reason: status.message().to_string(),
                    })
                }
                Some(Err(status)) => {
                    return Err(ReplicationError::Remote {
                        dc: remote.name.clone(),
                        code: status.code(),
                        message: status.message().to_string(),
                    })
                }
                Some(Ok(b)) => b,
            };
            if !is_leader(raft) {
                // A new leader resumes from the persisted cursor.
                return Ok::<(), ReplicationError>(());
            }
            // The remote's head as last heard, before any check: a feed
            // that stops on a damaged record still shows how far behind
            // this DC is.
            set_status(status, &remote.name, |st| {
                st.remote_head = st.remote_head.max(batch.head)
            });
            let mut job = None;
            let resync = batch.resync || batch.resync_floor > 0;
            // The head a follower reports may lag its DC's: reaching it
            // proves nothing (see `PeerHeard::caught_up_ms`), so only a
            // leader's counts.
            let proven_head = if from_leader { batch.head } else { u64::MAX };
            if batch.records.is_empty() && !batch.payloads.is_empty() && !resync {
                store_early(&mut early, segments, status, &remote.name, batch.payloads);
            } else if batch.records.is_empty() && !resync {
                // A keep-alive: committed now and then as proof of contact
                // (what a takeover waits to go silent, and what a DC back
                // from an outage waits for when the other DC is idle).
                if contact_due(raft, &remote.name, &mut last_contact) {
                    let cmd = Command::ApplyRemote {
                        origin: remote.name.clone(),
                        records: Vec::new(),
                        received_ms: mailbox_types::now_ms(),
                        payload_here: Vec::new(),
                        identity: batch.identity,
                        head: proven_head,
                    };
                    job = Some(AbortOnDrop(tokio::spawn(async move { cmd })));
                }
            } else if !batch.records.is_empty() || resync {
                let records: Vec<(u64, FeedRecord)> = bincode::deserialize(&batch.records)
                    .map_err(|e| {
                        ReplicationError::Local(format!("bad feed batch from {}: {e}", remote.name))
                    })?;
                // Every inline payload is checked against its record before
                // anything of the batch is applied: a payload damaged in
                // transit would otherwise be stored as the message.
                let (checked, bad) = verify_inline(records).await;
                let records = checked;
                if let Some((id, reason)) = bad {
                    status.fetch.lock().expect("lock").corrupt += 1;
                    tracing::warn!(%id, from = %remote.name, "inline payload on the feed is corrupt ({reason}); pulling the batch again");
                    return Err(ReplicationError::CorruptInline {
                        dc: remote.name.clone(),
                        id,
                        reason,
                    });
                }
                for (_, rec) in &records {
                    if let FeedRecord::Held { id, dc, .. } = rec {
                        status.acks.observe(id, dc);
                    }
                }
                // Stored in a task of its own, so the next batches are
                // received and stored while this one's fsyncs run: a slow
                // fsync delays one batch, not every batch queued behind it.
                let (segments, status, origin) =
                    (segments.clone(), status.clone(), remote.name.clone());
                let claimed: Vec<_> = records
                    .iter()
                    .filter_map(|(_, r)| match r {
                        FeedRecord::Message { meta, .. } => early
                            .remove(&meta.id)
                            .filter(|(at, _)| at.elapsed() < EARLY_MAX_AGE)
                            .map(|(_, job)| (meta.id, job)),
                        _ => None,
                    })
                    .collect();
                job = Some(AbortOnDrop(tokio::spawn(async move {
                    let mut payload_here = store_pushed(
                        segments.as_ref(),
                        &status,
                        &origin,
                        &records,
                        batch.payloads,
                    )
                    .await;
                    for id in early_held(&records, claimed).await {
                        if !payload_here.contains(&id) {
                            payload_here.push(id);
                        }
                    }
                    if resync {
                        Command::ApplyResync {
                            origin,
                            identity: batch.identity,
                            records: records.into_iter().map(|(_, r)| r).collect(),
                            received_ms: mailbox_types::now_ms(),
                            payload_here,
                            floor: batch.resync_floor,
                            done: batch.resync_done,
                        }
                    } else {
                        Command::ApplyRemote {
                            origin,
                            records,
                            received_ms: mailbox_types::now_ms(),
                            payload_here,
                            identity: batch.identity,
                            head: proven_head,
                        }
                    }
                })));
            }
            if !connected {
                // Connected, serving and passing the checks: the failure
                // streak is over.
                connected = true;
                set_status(status, &remote.name, |st| {
                    if st.state == "corrupt-feed" {
                        st.state = "connected".into();
                        st.last_error.clear();
                    }
                });
                if let Err(e) = retry.clear(RetryKind::Pull, remote.name.as_bytes()) {
                    tracing::error!("{e}");
                }
                // Fetches that backed off while the link was down go now.
                match retry.expedite(RetryKind::Fetch, mailbox_types::now_ms(), 4096) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(dc = %remote.name, "link up: {n} backed-off fetches retried now")
                    }
                    Err(e) => tracing::error!("{e}"),
                }
            }
            let queued = warn_if_slow(
                &remote.name,
                "the proposer to take the next batch",
                tx.send((batch.head, job, resync)),
            );
            if queued.await.is_err() {
                return Ok(());
            }
        }
    };
    let proposer = async {
        let mut applied_cursor = cursor;
        let mut acks = CursorAcks::new(acks_to, local_dc, &remote.name);
        let mut queued = std::collections::VecDeque::new();
        loop {
            if queued.is_empty() {
                match rx.recv().await {
                    Some(x) => queued.push_back(x),
                    None => break,
                }
            }
            while let Ok(x) = rx.try_recv() {
                queued.push_back(x);
            }
            let (mut head, job, resync) = queued.pop_front().expect("one queued");
            if let Some(mut job) = job {
                let mut cmd =
                    warn_if_slow(&remote.name, "a batch's segments to be stored", &mut job.0)
                        .await
                        .map_err(|e| ReplicationError::Local(format!("storing a batch: {e}")))?;
                // Batches behind it whose segments are already stored go in
                // the same commit: under load the DC commits once for
                // several batches instead of queueing a commit per batch.
                let mut merged = 1;
                let mut bytes = inline_bytes(&cmd);
                while merged < MERGE_MAX && bytes < MERGE_MAX_BYTES && !resync {
                    match queued.front() {
                        Some((_, _, true)) => break,
                        Some((h, None, _)) => head = head.max(*h),
                        Some((_, Some(next), _)) if next.0.is_finished() => {}
                        _ => break,
                    }
                    let (h, next, _) = queued.pop_front().expect("front exists");
                    head = head.max(h);
                    if let Some(mut next) = next {
                        let more = (&mut next.0).await.map_err(|e| {
                            ReplicationError::Local(format!("storing a batch: {e}"))
                        })?;
                        bytes += inline_bytes(&more);
                        merge_apply(&mut cmd, more);
                        merged += 1;
                    }
                }
                if let Command::ApplyRemote { head: h, .. } = &mut cmd {
                    // Job-less batches merged in reported heads too.
                    *h = (*h).max(head);
                }
                let res = warn_if_slow(&remote.name, "a batch's commit", raft.propose(cmd))
                    .await
                    .map_err(|e| ReplicationError::Local(e.to_string()))?;
                match res {
                    Ok(CommandResult::Remote { cursor, .. }) => applied_cursor = cursor,
                    Ok(other) => {
                        return Err(ReplicationError::Local(format!("unexpected {other:?}")))
                    }
                    Err(e @ mailbox_state::StateError::FeedIdentityChanged { .. }) => {
                        return Err(ReplicationError::FeedIdentityChanged {
                            dc: remote.name.clone(),
                            reason: e.to_string(),
                        })
                    }
                    Err(e) => return Err(ReplicationError::Local(e.to_string())),
                }
            }
            acks.report(applied_cursor, raft);
            set_status(status, &remote.name, |s| {
                s.cursor = applied_cursor;
                s.remote_head = head.max(applied_cursor);
                s.behind_since_ms = if applied_cursor >= head {
                    None
                } else {
                    s.behind_since_ms.or(Some(mailbox_types::now_ms()))
                };
            });
        }
        Ok(())
    };
    // Either stage failing ends the pull; the next one starts from the
    // persisted cursor.
    tokio::try_join!(receiver, proposer).map(|_| ())
}

/// How often a pull reports its applied cursor to the origin at most.
const ACK_EVERY: Duration = Duration::from_secs(5);

/// Reports this DC's cursor on a remote feed to its origin (which trims
/// what every DC has applied), at most every [`ACK_EVERY`], one report in
/// flight; a lost report is simply sent again later with a newer cursor.
struct CursorAcks {
    client: Option<ReplicationClient<tonic::transport::Channel>>,
    dc: String,
    origin: String,
    /// The last cursor the origin took (a refused or lost report is sent
    /// again, even when the cursor has not moved since).
    sent: Arc<std::sync::atomic::AtomicU64>,
    last: Option<std::time::Instant>,
    in_flight: Option<AbortOnDrop<()>>,
}

impl CursorAcks {
    fn new(
        client: Option<ReplicationClient<tonic::transport::Channel>>,
        dc: &str,
        origin: &str,
    ) -> Self {
        Self {
            client,
            dc: dc.to_string(),
            origin: origin.to_string(),
            sent: Arc::default(),
            last: None,
            in_flight: None,
        }
    }

    fn report(&mut self, cursor: u64, raft: &RaftNode) {
        let Some(client) = &self.client else { return };
        if cursor <= self.sent.load(std::sync::atomic::Ordering::Relaxed)
            || self.last.is_some_and(|t| t.elapsed() < ACK_EVERY)
            || self.in_flight.as_ref().is_some_and(|j| !j.0.is_finished())
        {
            return;
        }
        // The identity the cursor belongs to, as committed with it.
        let identity =
            match mailbox_state::replication::remote_feed_identity(raft.view(), &self.origin) {
                Ok(Some(i)) => i,
                _ => return,
            };
        let reporter_identity = match mailbox_state::feed_identity(raft.view()) {
            Ok(Some(i)) => i,
            _ => return,
        };
        self.last = Some(std::time::Instant::now());
        let mut client = client.clone();
        let (dc, origin, sent) = (self.dc.clone(), self.origin.clone(), self.sent.clone());
        self.in_flight = Some(AbortOnDrop(tokio::spawn(async move {
            let req = AckRequest {
                dc,
                identity,
                cursor,
                reporter_identity,
            };
            match tokio::time::timeout(OPEN_TIMEOUT, client.ack(req)).await {
                Ok(Ok(r)) => {
                    sent.fetch_max(cursor, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(%origin, cursor, floor = r.get_ref().floor, "cursor reported")
                }
                Ok(Err(e)) => {
                    tracing::warn!(%origin, cursor, "cursor report refused: {}", e.message())
                }
                Err(_) => tracing::debug!(%origin, cursor, "cursor report timed out"),
            }
        })));
    }
}

/// Feed batches committed together at most.
const MERGE_MAX: usize = 4;
/// Checks every inline payload in `records` against its record's size
/// and SHA-256 (on the blocking pool: a batch holds up to a few MiB);
/// returns the records and the first mismatch, if any.
async fn verify_inline(
    records: Vec<(u64, FeedRecord)>,
) -> (Vec<(u64, FeedRecord)>, Option<(String, String)>) {
    let has_inline = records.iter().any(|(_, r)| {
        matches!(
            r,
            FeedRecord::Message {
                inline: Some(_),
                ..
            }
        )
    });
    if !has_inline {
        let bad = first_bad_inline(&records);
        return (records, bad);
    }
    tokio::task::spawn_blocking(move || {
        let bad = first_bad_inline(&records);
        (records, bad)
    })
    .await
    .unwrap_or_else(|e| {
        (
            Vec::new(),
            Some(("(batch)".into(), format!("check task: {e}"))),
        )
    })
}

/// The first inline payload whose length or SHA-256 differs from what its
/// record declares.
fn first_bad_inline(records: &[(u64, FeedRecord)]) -> Option<(String, String)> {
    records.iter().find_map(|(_, r)| match r {
        // The payload's shape must match its metadata: inline bytes for
        // an inline message (none only when it is empty), none for a
        // segmented one (whose segments are fetched and checked).
        FeedRecord::Message {
            meta, inline: None, ..
        } if matches!(meta.payload, mailbox_types::Payload::Inline) && meta.size > 0 => Some((
            meta.id.to_string(),
            "an inline message without its payload".into(),
        )),
        FeedRecord::Message {
            meta,
            inline: Some(_),
            ..
        } if !matches!(meta.payload, mailbox_types::Payload::Inline) => Some((
            meta.id.to_string(),
            "inline bytes for a segmented message".into(),
        )),
        FeedRecord::Message {
            meta,
            inline: Some(b),
            ..
        } => {
            if b.len() as u64 != meta.size {
                Some((
                    meta.id.to_string(),
                    format!("{} bytes, the record says {}", b.len(), meta.size),
                ))
            } else if Digest::of(b) != meta.sha256 {
                Some((
                    meta.id.to_string(),
                    "SHA-256 differs from the record's".into(),
                ))
            } else {
                None
            }
        }
        _ => None,
    })
}

/// Inline payload bytes merged into one `ApplyRemote` at most: it is one
/// log entry, which must reach the DC's followers within a heartbeat.
const MERGE_MAX_BYTES: usize = 2 << 20;

/// Inline payload bytes of an `ApplyRemote`'s records.
fn inline_bytes(cmd: &Command) -> usize {
    match cmd {
        Command::ApplyRemote { records, .. } => records
            .iter()
            .map(|(_, r)| match r {
                FeedRecord::Message {
                    inline: Some(b), ..
                } => b.len(),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Appends the next batch's `ApplyRemote` to `cmd` (consecutive records of
/// the same feed); the held-since stamp is the later one.
fn merge_apply(cmd: &mut Command, next: Command) {
    if let (
        Command::ApplyRemote {
            records,
            received_ms,
            payload_here,
            head,
            ..
        },
        Command::ApplyRemote {
            records: more,
            received_ms: at,
            payload_here: held,
            head: later,
            ..
        },
    ) = (cmd, next)
    {
        records.extend(more);
        *received_ms = (*received_ms).max(at);
        payload_here.extend(held);
        *head = (*head).max(later);
    }
}

/// How stale what this DC last heard from a feed may get before a
/// keep-alive is committed as contact (see [`contact_due`]).
const CONTACT_EVERY: Duration = Duration::from_secs(5);

/// Whether to commit a keep-alive from `origin` as proof of contact: when
/// the last contact or the last catching up committed is older than
/// [`CONTACT_EVERY`], and this pull has not sent one for as long. An idle
/// link so costs a log entry every few seconds, a busy one none (its
/// batches are the contact).
fn contact_due(raft: &RaftNode, origin: &str, last_sent: &mut Option<std::time::Instant>) -> bool {
    if last_sent.is_some_and(|t| t.elapsed() < CONTACT_EVERY) {
        return false;
    }
    let stale = match mailbox_state::replication::peer_heard(raft.view(), origin) {
        Ok(h) => {
            let now = mailbox_types::now_ms();
            let every = CONTACT_EVERY.as_millis() as i64;
            now - h.contact_ms >= every || now - h.caught_up_ms >= every
        }
        Err(e) => {
            tracing::error!(dc = %origin, "reading what was last heard from the feed: {e}");
            false
        }
    };
    if stale {
        *last_sent = Some(std::time::Instant::now());
    }
    stale
}

/// A task storing pushed segments (a batch's, yielding its command, or a
/// payload sent ahead of its record). Aborted when dropped (the pull
/// ended): the next pull sends the batch again from the persisted cursor.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Payloads sent ahead of their records kept at once; beyond this they
/// are not stored early (their records bring them).
const EARLY_MAX: usize = 1024;
/// A payload stored ahead of its record counts only if the record comes
/// within this long: an early segment whose record is late may meanwhile
/// look like an orphan to the segment collector (its grace period is far
/// longer), and the fetch path re-verifies what is on disk anyway.
const EARLY_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(5);

/// Early payloads by message: when they arrived, and their store task.
type EarlyJobs = HashMap<MessageId, (std::time::Instant, EarlyJob)>;

/// Stores one early payload; yields the segments stored, with the SHA-256
/// each was verified against.
type EarlyJob = AbortOnDrop<Vec<(u32, Digest)>>;

/// Starts storing payloads sent ahead of their records, each segment
/// verified against the SHA-256 sent with it.
fn store_early(
    early: &mut EarlyJobs,
    segments: &Arc<dyn SegmentStore>,
    status: &StatusHandle,
    dc: &str,
    pushed: Vec<PushedSegment>,
) {
    let mut by_id: HashMap<MessageId, Vec<PushedSegment>> = HashMap::new();
    for p in pushed {
        if let Some(id) = crate::pushed_id(&p) {
            by_id.entry(id).or_default().push(p);
        }
    }
    if early.len() >= EARLY_MAX {
        // Records that never came (uploads that failed to commit).
        early.retain(|_, (at, _)| at.elapsed() < EARLY_MAX_AGE);
    }
    for (id, segs) in by_id {
        if early.len() >= EARLY_MAX || early.contains_key(&id) {
            continue;
        }
        let (segments, status, dc) = (segments.clone(), status.clone(), dc.to_string());
        early.insert(
            id,
            (std::time::Instant::now(), AbortOnDrop(tokio::spawn(async move {
                let mut stored = Vec::new();
                for p in segs {
                    let Ok(sha) = <[u8; 32]>::try_from(&p.sha256[..]) else {
                        continue;
                    };
                    let sha = Digest(sha);
                    match fetcher::write_segment(segments.as_ref(), id, p.index, &p.data, sha).await {
                        Ok(()) => {
                            status.fetch.lock().expect("lock").segments_early += 1;
                            stored.push((p.index, sha));
                        }
                        Err(mailbox_segments::SegmentError::Mismatch { .. }) => {
                            status.fetch.lock().expect("lock").corrupt += 1;
                            tracing::warn!(%id, index = p.index, from = %dc, "early segment is corrupt; its record's copy or a fetch replaces it");
                        }
                        Err(e) => tracing::warn!(%id, index = p.index, "cannot store early segment: {e}"),
                    }
                }
                stored
            }))),
        );
    }
}

/// The messages stored by `records`, by id.
fn message_metas(records: &[(u64, FeedRecord)]) -> HashMap<MessageId, &MessageMeta> {
    records
        .iter()
        .filter_map(|(_, r)| match r {
            FeedRecord::Message { meta, .. } => Some((meta.id, meta)),
            _ => None,
        })
        .collect()
}

/// Messages of `records` whose every segment was stored from a payload sent
/// ahead of the record, with the SHA-256s the record gives.
async fn early_held(
    records: &[(u64, FeedRecord)],
    claimed: Vec<(MessageId, EarlyJob)>,
) -> Vec<MessageId> {
    let metas = message_metas(records);
    let mut held = Vec::new();
    for (id, mut job) in claimed {
        let Ok(stored) = (&mut job.0).await else {
            continue;
        };
        let Some(meta) = metas.get(&id) else {
            continue;
        };
        let whole = !meta.segments().is_empty()
            && meta.segments().iter().all(|s| {
                stored
                    .iter()
                    .any(|(index, sha)| *index == s.index && *sha == s.sha256)
            });
        if whole {
            held.push(id);
        }
    }
    held
}

/// Connects to every endpoint of a remote DC at once and returns the live
/// ones, the remote leader first (then in configured order), with the last
/// connection error. A feed served by the leader sends each record the
/// moment it is applied there; a follower first has to learn of the commit
/// and apply it, which every `immediate` upload and the replication lag
/// would pay for.
async fn leader_first(endpoints: &[String]) -> (Vec<(String, Channel, bool)>, String) {
    let probes = endpoints.iter().enumerate().map(|(order, ep)| async move {
        let probe = tokio::time::timeout(OPEN_TIMEOUT, async {
            let ch = connect(ep).await.map_err(|e| format!("{ep}: {e}"))?;
            // Asked locally, a node answers for itself: leader or not.
            let leads = MailboxClient::new(ch.clone())
                .cluster_status(ClusterStatusRequest { local: true })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    r.has_leader
                        && r.nodes
                            .iter()
                            .any(|n| n.reachable && n.node_id == r.leader_id)
                })
                .unwrap_or(false);
            Ok::<_, String>((ch, leads))
        })
        .await
        .unwrap_or_else(|_| Err(format!("{ep}: no answer within {OPEN_TIMEOUT:?}")));
        (order, ep.clone(), probe)
    });
    let mut live = Vec::new();
    let mut last_err = String::from("no endpoints");
    for (order, ep, probe) in futures::future::join_all(probes).await {
        match probe {
            Ok((ch, leads)) => live.push((!leads, order, ep, ch)),
            Err(e) => last_err = e,
        }
    }
    live.sort_by_key(|(follower, order, ..)| (*follower, *order));
    let live = live
        .into_iter()
        .map(|(follower, _, ep, ch)| (ep, ch, !follower))
        .collect();
    (live, last_err)
}

/// Stores the segments pushed with a feed batch, each verified against its
/// record's SHA-256 first, and returns the messages now held in full here.
/// Anything missing, corrupt or unwritable is left to the fetcher.
async fn store_pushed(
    segments: &dyn SegmentStore,
    status: &StatusHandle,
    dc: &str,
    records: &[(u64, FeedRecord)],
    pushed: Vec<PushedSegment>,
) -> Vec<MessageId> {
    if pushed.is_empty() {
        return Vec::new();
    }
    let metas = message_metas(records);
    // Verify and write concurrently: each write ends in fsyncs, which
    // overlap instead of queueing one behind the other.
    let metas = &metas;
    let results: Vec<Option<(MessageId, u32)>> = futures::stream::iter(pushed)
        .map(|p| async move {
            let id = crate::pushed_id(&p)?;
            let seg = metas
                .get(&id)
                .and_then(|m| m.segments().iter().find(|s| s.index == p.index))?;
            if p.data.len() as u64 != seg.size {
                status.fetch.lock().expect("lock").corrupt += 1;
                tracing::warn!(%id, index = p.index, from = dc, "pushed segment has the wrong size; it will be fetched");
                return None;
            }
            // Verified by the writer as it hashes: a corrupt copy is never
            // stored under the segment's name.
            match fetcher::write_segment(segments, id, p.index, &p.data, seg.sha256).await {
                Ok(()) => {
                    status.fetch.lock().expect("lock").segments_copied += 1;
                    Some((id, p.index))
                }
                Err(mailbox_segments::SegmentError::Mismatch { .. }) => {
                    status.fetch.lock().expect("lock").corrupt += 1;
                    tracing::warn!(%id, index = p.index, from = dc, "pushed segment is corrupt; it will be fetched");
                    None
                }
                Err(e) => {
                    tracing::warn!(%id, index = p.index, "cannot store pushed segment: {e}");
                    None
                }
            }
        })
        .buffer_unordered(STORE_CONCURRENCY)
        .collect()
        .await;
    let mut stored: HashMap<MessageId, HashSet<u32>> = HashMap::new();
    for (id, index) in results.into_iter().flatten() {
        stored.entry(id).or_default().insert(index);
    }
    stored
        .into_iter()
        .filter(|(id, idx)| metas[id].segments().len() == idx.len())
        .map(|(id, _)| id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailbox_types::{MailboxPath, Payload};

    fn inline_record(payload: &[u8], declared: &[u8]) -> (u64, FeedRecord) {
        let meta = MessageMeta {
            id: MessageId::new(),
            mailbox: MailboxPath::parse("/inbox").unwrap(),
            name: "m".into(),
            size: declared.len() as u64,
            sha256: Digest::of(declared),
            created_ms: 1,
            origin_dc: "east".into(),
            attributes: Default::default(),
            payload: Payload::Inline,
        };
        (
            1,
            FeedRecord::Message {
                meta,
                inline: Some(payload.to_vec()),
                idempotency_key: None,
            },
        )
    }

    #[tokio::test]
    async fn an_inline_payload_damaged_in_transit_is_refused() {
        let good = inline_record(b"hello world", b"hello world");
        assert!(verify_inline(vec![good.clone()]).await.1.is_none());
        // One bit flipped: same length, another digest.
        let flipped = inline_record(b"hello worle", b"hello world");
        let (_, bad) = verify_inline(vec![good.clone(), flipped]).await;
        let (_, reason) = bad.expect("a flipped bit is detected");
        assert!(reason.contains("SHA-256"), "{reason}");
        // Cut short.
        let short = inline_record(b"hello", b"hello world");
        let (_, bad) = verify_inline(vec![short, good.clone()]).await;
        assert!(bad
            .expect("a short payload is detected")
            .1
            .contains("bytes"));
        // Shapes that do not match the metadata.
        let (seq, mut missing) = good.clone();
        if let FeedRecord::Message { inline, .. } = &mut missing {
            *inline = None;
        }
        assert!(verify_inline(vec![(seq, missing)]).await.1.is_some());
        let (seq, mut segmented) = good;
        if let FeedRecord::Message { meta, .. } = &mut segmented {
            meta.payload = Payload::Segments {
                segment_size: 1 << 20,
                segments: Vec::new(),
            };
        }
        assert!(verify_inline(vec![(seq, segmented)]).await.1.is_some());
    }
}
