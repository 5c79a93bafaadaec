//! Payloads sent ahead of their records.
//!
//! A small segmented upload (up to [`PUSH_MAX_MESSAGE`]) is complete in the
//! origin's memory the moment its last byte arrives, but its feed record
//! exists only after the origin has fsynced the segments and committed the
//! metadata. Waiting for that to send the payload puts the origin's fsync
//! and commit, the transfer and the remote's segment fsync one after the
//! other on the path of every `immediate` ack and of the replication lag.
//!
//! So the upload hands its bytes, with each segment's SHA-256, to this hub
//! as soon as they are all in, and every live feed stream on the node sends
//! them at once, ahead of the record, on the same stream (so they always
//! arrive first). The receiver stores them verified against the declared
//! SHA-256 while the origin commits, and counts them as held only when the
//! record arrives and its SHA-256s agree. Nothing depends on this path: a
//! payload that is dropped (no live stream, a slow stream, the memory
//! budget spent) travels with its record as before, and a payload whose
//! record never comes (the upload failed to commit) is an orphan segment the
//! remote's collector removes.
//!
//! An upload received by a follower hands its payload to the leader (which
//! serves the feed streams) with the `Replication.Early` RPC instead,
//! before the follower's own fsync and its forwarded proposal.
//!
//! Memory is bounded: bytes held for uploads in progress are capped by
//! [`EARLY_BUDGET`], and the broadcast buffer by [`EARLY_QUEUE`] payloads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mailbox_proto::replication::replication_client::ReplicationClient;
use mailbox_proto::replication::{EarlyRequest, PushedSegment};
use mailbox_types::{Digest, MessageId};
use tokio::sync::broadcast;
use tonic::transport::Channel;

use crate::feed::PUSH_MAX_MESSAGE;

/// Bytes all uploads on a node may hold for early sending at once.
pub const EARLY_BUDGET: i64 = 64 << 20;
/// Largest `Replication.Early` request accepted: one message of at most
/// [`PUSH_MAX_MESSAGE`] bytes, with room for framing.
pub const EARLY_REQUEST_MAX: usize = PUSH_MAX_MESSAGE as usize + (64 << 10);

/// Early payloads queued for the feed streams; a stream that falls
/// further behind skips them (their records carry them instead).
pub const EARLY_QUEUE: usize = 16;

/// One message's segments, sent ahead of its record.
#[derive(Debug)]
pub struct EarlyPayload {
    /// The message.
    pub id: MessageId,
    /// Its segments, each with the SHA-256 the receiver verifies.
    pub segments: Vec<PushedSegment>,
}

/// How long a follower's hand-off to its leader may take; later, the
/// record carries the payload anyway.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(1);

/// The node's hub between uploads and feed streams.
#[derive(Debug)]
pub struct EarlyPayloads {
    tx: broadcast::Sender<Arc<EarlyPayload>>,
    budget: AtomicI64,
    /// Connections to the leader(s) this node has handed payloads to.
    leaders: Mutex<HashMap<String, ReplicationClient<Channel>>>,
}

impl Default for EarlyPayloads {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(EARLY_QUEUE).0,
            budget: AtomicI64::new(EARLY_BUDGET),
            leaders: Mutex::default(),
        }
    }
}

impl EarlyPayloads {
    /// A feed stream's subscription.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<EarlyPayload>> {
        self.tx.subscribe()
    }

    /// A collector for one upload, or `None` when no feed stream is open
    /// on this node (nobody to send to).
    pub fn collector(self: &Arc<Self>) -> Option<EarlyCollector> {
        (self.tx.receiver_count() > 0).then(|| self.new_collector(None))
    }

    /// A collector for an upload received by a follower: its payload goes
    /// to the leader at `leader_addr`, whose feed streams send it.
    pub fn forwarding_collector(self: &Arc<Self>, leader_addr: String) -> EarlyCollector {
        self.new_collector(Some(leader_addr))
    }

    fn new_collector(self: &Arc<Self>, forward_to: Option<String>) -> EarlyCollector {
        EarlyCollector {
            hub: self.clone(),
            chunks: Vec::new(),
            reserved: 0,
            gave_up: false,
            forward_to,
        }
    }

    /// A payload a follower handed over: to this node's feed streams.
    pub fn accept(&self, segments: Vec<PushedSegment>) {
        let Some(first) = segments.first() else {
            return;
        };
        let Some(id) = crate::pushed_id(first) else {
            return;
        };
        let _ = self.tx.send(Arc::new(EarlyPayload { id, segments }));
    }

    /// Hands `segments` to the leader at `addr` (best effort, bounded).
    async fn forward(&self, addr: &str, segments: Vec<PushedSegment>) {
        let cached = self
            .leaders
            .lock()
            .expect("leaders lock")
            .get(addr)
            .cloned();
        let client = match cached {
            Some(c) => c,
            None => {
                let Ok(Ok(ch)) = tokio::time::timeout(FORWARD_TIMEOUT, crate::connect(addr)).await
                else {
                    return;
                };
                let c = ReplicationClient::new(ch)
                    .max_encoding_message_size(mailbox_proto::MAX_MESSAGE_SIZE);
                self.leaders
                    .lock()
                    .expect("leaders lock")
                    .insert(addr.to_string(), c.clone());
                c
            }
        };
        let mut req = tonic::Request::new(EarlyRequest { segments });
        req.set_timeout(FORWARD_TIMEOUT);
        if let Err(e) = client.clone().early(req).await {
            tracing::debug!(
                leader = addr,
                "early payload not handed over: {}",
                e.message()
            );
            self.leaders.lock().expect("leaders lock").remove(addr);
        }
    }

    fn reserve(&self, n: u64) -> bool {
        let n = n as i64;
        if self.budget.fetch_sub(n, Ordering::AcqRel) >= n {
            true
        } else {
            self.budget.fetch_add(n, Ordering::AcqRel);
            false
        }
    }

    fn release(&self, n: u64) {
        self.budget.fetch_add(n as i64, Ordering::AcqRel);
    }
}

/// Keeps an upload's chunks (shared buffers, not copies) while it is
/// small enough to be sent early.
pub struct EarlyCollector {
    hub: Arc<EarlyPayloads>,
    chunks: Vec<Bytes>,
    reserved: u64,
    gave_up: bool,
    /// The leader to hand the payload to (this node is a follower).
    forward_to: Option<String>,
}

impl EarlyCollector {
    /// Keeps `chunk`; gives up for good once the upload is too large or the
    /// node's budget is spent.
    pub fn push(&mut self, chunk: &Bytes) {
        if self.gave_up {
            return;
        }
        let n = chunk.len() as u64;
        if self.reserved + n > PUSH_MAX_MESSAGE || !self.hub.reserve(n) {
            self.give_up();
            return;
        }
        self.reserved += n;
        self.chunks.push(chunk.clone());
    }

    fn give_up(&mut self) {
        self.gave_up = true;
        self.chunks = Vec::new();
        self.hub.release(std::mem::take(&mut self.reserved));
    }

    /// Hashes the payload cut into `segment_size` segments and hands it to
    /// the feed streams, in the background: the caller goes on to make its
    /// own segments durable and commit.
    pub fn publish(mut self, id: MessageId, segment_size: u64) {
        if self.gave_up || self.chunks.is_empty() || segment_size == 0 {
            return;
        }
        let chunks = std::mem::take(&mut self.chunks);
        let reserved = std::mem::take(&mut self.reserved);
        let hub = self.hub.clone();
        let forward_to = self.forward_to.take();
        tokio::spawn(async move {
            let segments = tokio::task::spawn_blocking(move || {
                let data = if chunks.len() == 1 {
                    chunks.into_iter().next().expect("one chunk")
                } else {
                    let mut all = BytesMut::with_capacity(reserved as usize);
                    for c in &chunks {
                        all.extend_from_slice(c);
                    }
                    all.freeze()
                };
                let id_bytes = Bytes::copy_from_slice(id.as_bytes());
                (0..data.len())
                    .step_by(segment_size as usize)
                    .enumerate()
                    .map(|(index, start)| {
                        let end = (start + segment_size as usize).min(data.len());
                        let data = data.slice(start..end);
                        PushedSegment {
                            id: id_bytes.clone(),
                            index: index as u32,
                            sha256: Bytes::copy_from_slice(&Digest::of(&data).0),
                            data,
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            hub.release(reserved);
            match (segments, forward_to) {
                (Ok(segments), Some(leader)) => hub.forward(&leader, segments).await,
                (Ok(segments), None) => {
                    // No receiver left is fine: the records carry the payload.
                    let _ = hub.tx.send(Arc::new(EarlyPayload { id, segments }));
                }
                (Err(_), _) => {}
            }
        });
    }
}

impl Drop for EarlyCollector {
    fn drop(&mut self) {
        self.hub.release(std::mem::take(&mut self.reserved));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn collector_respects_size_and_budget_and_cuts_segments() {
        let hub = Arc::new(EarlyPayloads::default());
        assert!(hub.collector().is_none(), "no stream, no collection");
        let mut rx = hub.subscribe();

        // Cut into 3-byte segments, each with its own SHA-256.
        let mut c = hub.collector().expect("a stream is open");
        c.push(&Bytes::from_static(b"hello "));
        c.push(&Bytes::from_static(b"world"));
        let id = MessageId::new();
        c.publish(id, 3);
        let p = rx.recv().await.unwrap();
        assert_eq!(p.id, id);
        let got: Vec<&[u8]> = p.segments.iter().map(|s| &s.data[..]).collect();
        assert_eq!(got, vec![&b"hel"[..], b"lo ", b"wor", b"ld"]);
        for (i, s) in p.segments.iter().enumerate() {
            assert_eq!(s.index, i as u32);
            assert_eq!(&s.sha256[..], &Digest::of(&s.data).0[..]);
        }
        assert_eq!(hub.budget.load(Ordering::Acquire), EARLY_BUDGET);

        // Too large: given up, budget back, nothing sent.
        let mut c = hub.collector().unwrap();
        c.push(&Bytes::from(vec![0u8; PUSH_MAX_MESSAGE as usize]));
        c.push(&Bytes::from_static(b"x"));
        c.publish(MessageId::new(), 1 << 20);
        assert_eq!(hub.budget.load(Ordering::Acquire), EARLY_BUDGET);

        // The node's budget bounds concurrent uploads.
        let mut held = Vec::new();
        for _ in 0..(EARLY_BUDGET as u64 / PUSH_MAX_MESSAGE) {
            let mut c = hub.collector().unwrap();
            c.push(&Bytes::from(vec![0u8; PUSH_MAX_MESSAGE as usize]));
            assert!(!c.gave_up);
            held.push(c);
        }
        let mut over = hub.collector().unwrap();
        over.push(&Bytes::from_static(b"y"));
        assert!(over.gave_up, "budget spent");
        drop(held);
        drop(over);
        assert_eq!(hub.budget.load(Ordering::Acquire), EARLY_BUDGET);
        assert!(rx.try_recv().is_err(), "nothing else was sent");
    }
}
