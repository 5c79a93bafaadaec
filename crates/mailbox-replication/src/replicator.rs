//! Pulling other DCs' feeds into this DC's log (leader only).

use std::sync::Arc;
use std::time::Duration;

use mailbox_proto::replication::replication_client::ReplicationClient;
use mailbox_proto::replication::FeedRequest;
use mailbox_raft::RaftNode;
use mailbox_segments::SegmentStore;
use mailbox_state::{Command, CommandResult, FeedRecord};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::{backoff, connect, fetcher, RemoteDc, RemoteStatus, ReplicationError, StatusHandle};

/// Runs the feed pulls and the segment fetcher of one node.
pub struct Replicator {
    raft: RaftNode,
    local_dc: String,
    remotes: Vec<RemoteDc>,
    segments: Arc<dyn SegmentStore>,
    status: StatusHandle,
}

impl Replicator {
    /// A replicator for DC `local_dc` pulling from `remotes`.
    pub fn new(
        raft: RaftNode,
        local_dc: String,
        remotes: Vec<RemoteDc>,
        segments: Arc<dyn SegmentStore>,
    ) -> Self {
        Self {
            raft,
            local_dc,
            remotes,
            segments,
            status: StatusHandle::default(),
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
                shutdown.clone(),
            ));
        }
        tokio::spawn(fetcher::run(
            self.raft.clone(),
            self.remotes.clone(),
            self.segments.clone(),
            self.status.clone(),
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
    mut shutdown: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    loop {
        set_status(&status, &remote.name, |s| s.state = "idle".into());
        if !wait_leadership(&raft, &mut shutdown).await {
            return;
        }
        set_status(&status, &remote.name, |s| s.state = "connecting".into());
        let result = tokio::select! {
            r = pull_once(&raft, &local_dc, &remote, &status, &mut attempt) => r,
            _ = shutdown.changed() => return,
        };
        if let Err(e) = result {
            tracing::warn!(dc = %remote.name, "feed pull: {e}");
            set_status(&status, &remote.name, |s| {
                s.state = "disconnected".into();
                s.retries += 1;
                s.last_error = e.to_string();
            });
            attempt += 1;
            let wait = backoff(attempt, Duration::from_millis(100), Duration::from_secs(5));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn pull_once(
    raft: &RaftNode,
    local_dc: &str,
    remote: &RemoteDc,
    status: &StatusHandle,
    attempt: &mut u32,
) -> Result<(), ReplicationError> {
    let cursor = mailbox_state::replication::cursor(raft.view(), &remote.name)
        .map_err(|e| ReplicationError::Local(e.to_string()))?;
    let mut last_err = String::from("no endpoints");
    let mut stream = None;
    for ep in &remote.endpoints {
        match connect(ep).await {
            Ok(ch) => {
                let mut client = ReplicationClient::new(ch)
                    .max_decoding_message_size(mailbox_proto::MAX_MESSAGE_SIZE);
                match client
                    .feed(FeedRequest {
                        since: cursor,
                        dc: local_dc.to_string(),
                    })
                    .await
                {
                    Ok(s) => {
                        stream = Some(s.into_inner());
                        break;
                    }
                    Err(e) => last_err = format!("{ep}: {}", e.message()),
                }
            }
            Err(e) => last_err = format!("{ep}: {e}"),
        }
    }
    let mut stream = stream.ok_or_else(|| ReplicationError::Unreachable {
        dc: remote.name.clone(),
        reason: last_err,
    })?;
    set_status(status, &remote.name, |s| {
        s.state = "connected".into();
        s.cursor = cursor;
        s.last_error.clear();
    });
    let mut applied_cursor = cursor;
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
            Some(Err(status)) => {
                return Err(ReplicationError::Remote {
                    dc: remote.name.clone(),
                    status,
                })
            }
            Some(Ok(b)) => b,
        };
        if !is_leader(raft) {
            // A new leader resumes from the persisted cursor.
            return Ok(());
        }
        *attempt = 0;
        let head = batch.head;
        if !batch.records.is_empty() {
            let records: Vec<(u64, FeedRecord)> =
                bincode::deserialize(&batch.records).map_err(|e| {
                    ReplicationError::Local(format!("bad feed batch from {}: {e}", remote.name))
                })?;
            let res = raft
                .propose(Command::ApplyRemote {
                    origin: remote.name.clone(),
                    records,
                })
                .await
                .map_err(|e| ReplicationError::Local(e.to_string()))?;
            match res {
                Ok(CommandResult::Remote { cursor, .. }) => applied_cursor = cursor,
                Ok(other) => return Err(ReplicationError::Local(format!("unexpected {other:?}"))),
                Err(e) => return Err(ReplicationError::Local(e.to_string())),
            }
        }
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
}
