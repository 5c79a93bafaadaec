//! Orphaned-segment collector, and expiry of deleted messages' records.
//!
//! Segments are written before their message commits, so an aborted upload,
//! a failed commit or a crash in between leaves segments that no message
//! references. The DC leader periodically removes every message directory
//! in the segment store whose id has no committed message and that nothing
//! has written to for `grace` (at least twice the propose timeout, enforced
//! by config validation: uploads still streaming and proposals in flight).
//!
//! Invariants:
//! - **Leadership is confirmed, not assumed.** openraft 0.9 does not step a
//!   leader down without a quorum, so a leader cut off from its peers still
//!   believes it leads while it sees the shared segment store. Each pass
//!   starts with a linearizable read (a quorum confirms this node leads and
//!   its applied state is current), and so does each batch of removals.
//! - **The decision goes through the log before anything is removed.** The
//!   collector commits `CondemnOrphans`; the state machine condemns only ids
//!   without a committed message, and refuses any later `PutMessage` of a
//!   condemned id (an upload that stalled past the grace period fails
//!   cleanly instead of committing without its segments). A put committed
//!   first makes the state machine leave the id out of the condemned list.
//!   A deposed leader cannot commit, so it cannot condemn.
//! - Removals are confirmed with `OrphansCollected`; until then the fetcher
//!   leaves condemned ids alone (a late record of a payload pushed early),
//!   and the next pass (on any leader) finishes decisions older than
//!   `grace` that an earlier leader left unfinished.
//!
//! The same loop proposes `Expire`, forgetting deleted messages' replay
//! guards and idempotency keys, and old collector decisions, after the
//! idempotency retention.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mailbox_raft::RaftNode;
use mailbox_segments::SegmentStore;
use mailbox_state::{Command, CommandResult};
use mailbox_types::MessageId;

use crate::error::ServiceError;

/// Ids condemned per log entry at most.
const CONDEMN_BATCH: usize = 256;

/// Timing of the collector.
#[derive(Debug, Clone, Copy)]
pub struct GcConfig {
    /// Segments nothing wrote to for this long, without a message, go.
    pub grace: Duration,
    /// Time between passes.
    pub interval: Duration,
    /// Deleted messages' keys and replay guards are kept this long.
    pub retention: Duration,
}

/// Confirms through a quorum that this node leads and has applied
/// everything committed before now.
async fn confirm_leader(raft: &RaftNode) -> Result<(), ServiceError> {
    raft.raft()
        .ensure_linearizable()
        .await
        .map(|_| ())
        .map_err(|e| ServiceError::Unavailable {
            reason: format!("orphan collection skipped, leadership not confirmed: {e}"),
        })
}

fn unexpected(what: &str, r: impl std::fmt::Debug) -> ServiceError {
    ServiceError::Internal {
        reason: format!("{what}: unexpected result {r:?}"),
    }
}

/// Runs one collection pass; returns how many messages' segments were removed.
pub async fn collect_once(
    raft: &RaftNode,
    segments: &dyn SegmentStore,
    grace: Duration,
) -> Result<usize, ServiceError> {
    confirm_leader(raft).await?;
    let now = SystemTime::now();
    let now_ms = mailbox_types::now_ms();
    let view = raft.view();
    let grace_ms = grace.as_millis() as i64;
    let mut candidates = BTreeSet::new();
    for (id, last_write) in segments.list_messages().await? {
        if mailbox_state::get_message(view, &id)?.is_some() {
            continue;
        }
        if now.duration_since(last_write).unwrap_or_default() < grace {
            continue;
        }
        candidates.insert(id);
    }
    // Decisions an earlier pass (maybe on an earlier leader) committed but
    // did not finish; left alone for `grace`, so a deposed leader that
    // still removes is long done before anything writes there again.
    for (id, at_ms) in mailbox_state::pending_orphans(view, 4096)? {
        if now_ms - at_ms >= grace_ms {
            candidates.insert(id);
        }
    }
    let candidates: Vec<MessageId> = candidates.into_iter().collect();
    let mut removed = 0;
    for chunk in candidates.chunks(CONDEMN_BATCH) {
        let res = raft
            .propose(Command::CondemnOrphans {
                ids: chunk.to_vec(),
                at_ms: mailbox_types::now_ms(),
            })
            .await??;
        let CommandResult::Condemned { ids } = res else {
            return Err(unexpected("condemn orphans", res));
        };
        if ids.is_empty() {
            continue;
        }
        confirm_leader(raft).await?;
        let mut done = Vec::new();
        for id in &ids {
            // Still the decision this pass made or finishes: a leader that
            // was paused since may have been overtaken by one that finished
            // it and let the fetcher write there again.
            if !mailbox_state::orphan_pending(raft.view(), id)? {
                continue;
            }
            match segments.delete_message(*id).await {
                Ok(()) => {
                    tracing::info!(%id, "removed orphaned segments");
                    done.push(*id);
                }
                // One directory that cannot be removed must not hold up
                // the others (their fetches wait for the confirmation).
                Err(e) => tracing::warn!(%id, "cannot remove orphaned segments: {e}"),
            }
        }
        removed += done.len();
        if !done.is_empty() {
            raft.propose(Command::OrphansCollected { ids: done })
                .await??;
        }
    }
    Ok(removed)
}

/// Forgets what the retention no longer needs; returns how many records.
pub async fn expire_once(raft: &RaftNode, retention: Duration) -> Result<u64, ServiceError> {
    let before_ms = mailbox_types::now_ms() - retention.as_millis() as i64;
    let mut total = 0;
    loop {
        match raft.propose(Command::Expire { before_ms }).await?? {
            CommandResult::Expired { count, more } => {
                total += count;
                if !more {
                    return Ok(total);
                }
            }
            other => return Err(unexpected("expire", other)),
        }
    }
}

/// Collects every `interval` while this node leads, until `shutdown` fires.
pub async fn run(
    raft: RaftNode,
    segments: Arc<dyn SegmentStore>,
    cfg: GcConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !raft.is_leader() {
            continue;
        }
        match collect_once(&raft, segments.as_ref(), cfg.grace).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "orphan collection pass"),
            Err(e) => tracing::warn!("orphan collection failed: {e}"),
        }
        if let Err(e) = expire_once(&raft, cfg.retention).await {
            tracing::warn!("expiry of deleted messages' records failed: {e}");
        }
    }
}
