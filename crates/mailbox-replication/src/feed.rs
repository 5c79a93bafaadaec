//! Serving this DC's feed to the other DCs.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use mailbox_proto::replication::replication_server::Replication;
use mailbox_proto::replication::{FeedBatch, FeedRequest};
use mailbox_raft::RaftNode;
use mailbox_state::replication::{feed_head, feed_since};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Records per batch.
const BATCH: usize = 256;
/// A keep-alive batch is sent when nothing happened for this long, so the
/// puller can tell an idle feed from a dead connection.
const KEEPALIVE: Duration = Duration::from_secs(2);

/// gRPC service streaming this DC's feed.
#[derive(Clone)]
pub struct FeedService {
    raft: RaftNode,
    dc: String,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl FeedService {
    /// Serves `raft`'s applied feed, tagged as DC `dc`. Open streams end
    /// when `shutdown` turns true, so a graceful server stop is not held up
    /// by the other DCs' long-lived pulls.
    pub fn new(raft: RaftNode, dc: String, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { raft, dc, shutdown }
    }
}

type FeedStream = Pin<Box<dyn Stream<Item = Result<FeedBatch, Status>> + Send>>;

#[tonic::async_trait]
impl Replication for FeedService {
    type FeedStream = FeedStream;

    #[tracing::instrument(level = "info", skip_all, fields(peer = %req.get_ref().dc, since = req.get_ref().since))]
    async fn feed(&self, req: Request<FeedRequest>) -> Result<Response<FeedStream>, Status> {
        let mut since = req.into_inner().since;
        let raft = self.raft.clone();
        let origin = self.dc.clone();
        let (tx, rx) = mpsc::channel(4);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut applied = raft.applied_watch();
            loop {
                applied.mark_unchanged();
                let view = raft.view();
                let batch = feed_since(view, since, BATCH).and_then(|r| Ok((r, feed_head(view)?)));
                let (records, head) = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                let full = records.len() == BATCH;
                if let Some((last, _)) = records.last() {
                    since = *last;
                    let msg = FeedBatch {
                        records: bincode::serialize(&records).expect("feed records serialize"),
                        head,
                        origin: origin.clone(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    if full {
                        continue;
                    }
                }
                // Caught up: sleep until the next apply (or a keep-alive).
                if *shutdown.borrow() {
                    return;
                }
                let wake = tokio::select! {
                    r = tokio::time::timeout(KEEPALIVE, applied.changed()) => r,
                    _ = shutdown.changed() => return,
                };
                match wake {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        let ka = FeedBatch {
                            records: Vec::new(),
                            head,
                            origin: origin.clone(),
                        };
                        if tx.send(Ok(ka)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as FeedStream
        ))
    }
}
