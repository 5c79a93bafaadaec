//! Orphaned-segment collector.
//!
//! Segments are written before their message commits, so an aborted upload,
//! a failed commit or a crash in between leaves segments that no message
//! references. The DC leader periodically removes every message directory
//! in the segment store whose id has no committed message and that nothing
//! has written to for `grace`. The grace period (at least twice the propose
//! timeout, enforced by config validation) covers uploads still streaming
//! and proposals still in flight; running only on the leader, whose applied
//! state is the most current, keeps the check close to the commit point.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mailbox_raft::RaftNode;
use mailbox_segments::SegmentStore;

use crate::error::ServiceError;

/// Runs one collection pass; returns how many messages' segments were removed.
pub async fn collect_once(
    raft: &RaftNode,
    segments: &dyn SegmentStore,
    grace: Duration,
) -> Result<usize, ServiceError> {
    let now = SystemTime::now();
    let mut removed = 0;
    for (id, last_write) in segments.list_messages().await? {
        if mailbox_state::get_message(raft.view(), &id)?.is_some() {
            continue;
        }
        if now.duration_since(last_write).unwrap_or_default() < grace {
            continue;
        }
        segments.delete_message(id).await?;
        tracing::info!(%id, "removed orphaned segments");
        removed += 1;
    }
    Ok(removed)
}

/// Collects every `interval` while this node leads, until `shutdown` fires.
pub async fn run(
    raft: RaftNode,
    segments: Arc<dyn SegmentStore>,
    grace: Duration,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !raft.is_leader() {
            continue;
        }
        if let Err(e) = collect_once(&raft, segments.as_ref(), grace).await {
            tracing::warn!("orphan collection failed: {e}");
        }
    }
}
