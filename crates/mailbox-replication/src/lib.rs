//! Replication between data centers.
//!
//! - [`FeedService`]: every node serves its DC's feed (records that originate
//!   in the DC) from its applied state, as a long-lived gRPC stream that
//!   pushes new records as soon as they are applied (no polling interval).
//! - [`Replicator`]: in every DC, the current Raft leader keeps one stream
//!   open per remote DC, starting at the persisted cursor, and proposes what
//!   arrives as `ApplyRemote`; the state machine advances the cursor in the
//!   same write, so records apply exactly once across crashes and leader
//!   changes. A new leader simply resumes from the cursor.
//! - The fetcher (also leader-only) copies segments of messages whose
//!   metadata arrived without payload from a DC that has them, verifies each
//!   segment's SHA-256 before writing it to the local segment store, then
//!   proposes `PayloadHeld`. The missing-payload index lives in the state
//!   machine, so pending work survives any crash; failed fetches are retried
//!   with capped exponential backoff and jitter, never dropped.
//!
//! - [`RetryTable`]: when each failed fetch or pull is tried next, with
//!   capped exponential backoff and jitter, persisted in the node's local
//!   column family so the schedule and attempt counts survive restarts.

pub mod early;
mod feed;
mod fetcher;
mod replicator;
pub mod retry;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailbox_types::MessageId;

pub use feed::FeedService;
pub use replicator::Replicator;
pub use retry::{RetryKind, RetryTable};

/// How to reach another DC.
#[derive(Debug, Clone)]
pub struct RemoteDc {
    /// DC name.
    pub name: String,
    /// `host:port` of its nodes, tried in order.
    pub endpoints: Vec<String>,
}

/// Errors of the replication layer.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// No endpoint of a remote DC answered.
    #[error("DC {dc} unreachable: {reason}")]
    Unreachable {
        /// The DC.
        dc: String,
        /// Last failure.
        reason: String,
    },
    /// The remote answered with an error.
    #[error("DC {dc}: {code:?}: {message}")]
    Remote {
        /// The DC.
        dc: String,
        /// gRPC status code.
        code: tonic::Code,
        /// gRPC status message.
        message: String,
    },
    /// A copied segment did not match its SHA-256.
    #[error("segment {index} of {id} from DC {dc} is corrupt")]
    Corrupt {
        /// Source DC.
        dc: String,
        /// Message id.
        id: String,
        /// Segment index.
        index: u32,
    },
    /// An inline payload that arrived on a feed does not match the size or
    /// SHA-256 its record declares: the batch is refused whole (nothing of
    /// it is applied) and pulled again.
    #[error("inline payload of {id} from DC {dc} is corrupt: {reason}")]
    CorruptInline {
        /// Source DC.
        dc: String,
        /// Message id.
        id: String,
        /// What did not match.
        reason: String,
    },
    /// The remote DC's feed is not the one this DC's cursor counts (it was
    /// rebuilt from empty): pulls stop until an admin resets the cursor
    /// (`mailbox replication reset-feed DC`).
    #[error("DC {dc}: feed identity changed: {reason}")]
    FeedIdentityChanged {
        /// The remote DC.
        dc: String,
        /// What was seen.
        reason: String,
    },
    /// Local failure (state, raft, segment store).
    #[error("local: {0}")]
    Local(String),
}

/// Live status of one remote DC's feed pull.
#[derive(Debug, Clone, Default)]
pub struct RemoteStatus {
    /// connected | connecting | disconnected | idle.
    pub state: String,
    /// Last applied sequence number of its feed.
    pub cursor: u64,
    /// Its feed's head when last heard.
    pub remote_head: u64,
    /// When the oldest unapplied record was first seen behind (ms epoch).
    pub behind_since_ms: Option<i64>,
    /// Reconnects so far.
    pub retries: u64,
    /// Last error.
    pub last_error: String,
}

/// Counters of the segment fetcher.
#[derive(Debug, Clone, Default)]
pub struct FetchStatus {
    /// Failed fetch attempts (retried).
    pub retries: u64,
    /// Copies discarded for a SHA-256 mismatch.
    pub corrupt: u64,
    /// Segments copied.
    pub segments_copied: u64,
    /// Segments stored from payloads sent ahead of their records.
    pub segments_early: u64,
}

/// Shared, always-current replication status of this node.
#[derive(Debug, Default)]
pub struct Status {
    /// Per remote DC.
    pub remotes: Mutex<BTreeMap<String, RemoteStatus>>,
    /// Fetcher counters.
    pub fetch: Mutex<FetchStatus>,
    /// Replica acks for uploads waiting on `immediate`.
    pub acks: AckWaiters,
    /// Payloads of uploads in progress, for the feed streams to send ahead
    /// of their records.
    pub early: Arc<early::EarlyPayloads>,
}

/// Shared handle to [`Status`].
pub type StatusHandle = Arc<Status>;

/// Replica acks seen arriving on other DCs' feeds, for uploads waiting on
/// `immediate` on this node. A replica ack in a DC's feed is committed
/// there, so that DC holds the payload durably the moment the record
/// arrives; waiting for this DC to commit the record as well would only add
/// a local commit to every `immediate` upload. Only ids someone waits for
/// are tracked, so memory stays bounded by the uploads in flight.
#[derive(Debug, Default)]
pub struct AckWaiters {
    seen: Mutex<BTreeMap<MessageId, BTreeSet<String>>>,
    notify: tokio::sync::Notify,
}

impl AckWaiters {
    /// Starts tracking acks for `id`.
    pub fn register(&self, id: MessageId) {
        self.seen.lock().expect("acks lock").entry(id).or_default();
    }

    /// Stops tracking `id`.
    pub fn unregister(&self, id: &MessageId) {
        self.seen.lock().expect("acks lock").remove(id);
    }

    /// DCs whose replica ack for `id` arrived so far.
    pub fn seen(&self, id: &MessageId) -> BTreeSet<String> {
        self.seen
            .lock()
            .expect("acks lock")
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Resolves at the next observed ack of any tracked id.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    pub(crate) fn observe(&self, id: &MessageId, dc: &str) {
        let mut seen = self.seen.lock().expect("acks lock");
        if let Some(dcs) = seen.get_mut(id) {
            dcs.insert(dc.to_string());
            self.notify.notify_waiters();
        }
    }
}

/// The message a pushed segment belongs to (`None` for a malformed id).
pub(crate) fn pushed_id(p: &mailbox_proto::replication::PushedSegment) -> Option<MessageId> {
    <[u8; 16]>::try_from(&p.id[..])
        .ok()
        .map(MessageId::from_bytes)
}

/// Exponential backoff with full jitter, capped.
pub(crate) fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16)).min(cap);
    let jitter = rand::random::<f64>();
    exp.mul_f64(0.5 + jitter / 2.0)
}

/// Connects to a node of another DC with the settings bulk transfers need
/// (8 MiB HTTP/2 windows, connect timeout, keep-alives).
pub async fn connect(ep: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{ep}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(mailbox_proto::STREAM_WINDOW)
        .initial_connection_window_size(mailbox_proto::CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
}
