//! The upload pipeline shared by every protocol adapter.
//!
//! An [`Upload`] receives a payload chunk by chunk. It keeps up to
//! `inline_threshold` bytes in memory; past that it streams into segments of
//! `segment_size` in the DC's segment store, hashing each segment and the
//! whole payload as bytes pass. [`Upload::finish`] verifies the declared
//! SHA-256, proposes `PutMessage` and only then is the message visible.
//! Any failure before the commit removes the segments written so far
//! (best effort; the orphan collector catches what a crash leaves).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Buf, Bytes};

use mailbox_raft::RaftNode;
use mailbox_replication::StatusHandle;
use mailbox_segments::{SegmentStore, SegmentWriter};
use mailbox_state::{Command, CommandResult};
use mailbox_types::{
    validate_message_name, Digest, MailboxPath, MessageId, MessageMeta, PathPattern, Payload,
    SegmentMeta,
};
use sha2::{Digest as _, Sha256};

use std::time::Duration;

use crate::config::{AckMode, ClusterConfig};
use crate::error::ServiceError;

/// Largest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Most attributes per message.
pub const MAX_ATTRIBUTES: usize = 64;
/// Longest attribute key or value, in bytes.
pub const MAX_ATTRIBUTE_LEN: usize = 1024;

/// Checks a message's attributes: count, key and value lengths.
pub fn validate_attributes<'a>(
    attrs: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), ServiceError> {
    if attrs.len() > MAX_ATTRIBUTES {
        return Err(ServiceError::invalid(format!(
            "at most {MAX_ATTRIBUTES} attributes"
        )));
    }
    for (k, v) in attrs {
        if k.is_empty() || k.len() > MAX_ATTRIBUTE_LEN || v.len() > MAX_ATTRIBUTE_LEN {
            return Err(ServiceError::invalid(format!(
                "attribute keys must be 1..={MAX_ATTRIBUTE_LEN} bytes, values at most {MAX_ATTRIBUTE_LEN}"
            )));
        }
    }
    Ok(())
}

/// What a client declares before sending bytes.
#[derive(Debug, Clone)]
pub struct UploadRequest {
    /// Target mailbox.
    pub mailbox: String,
    /// Message name.
    pub name: String,
    /// Optional idempotency key.
    pub idempotency_key: Option<String>,
    /// Optional expected SHA-256 (hex).
    pub sha256: Option<String>,
    /// User attributes.
    pub attributes: BTreeMap<String, String>,
    /// Per-upload acknowledgement override.
    pub ack: Option<AckMode>,
}

/// When an upload is acknowledged.
#[derive(Debug, Clone)]
pub struct AckPolicy {
    /// Default mode.
    pub mode: AckMode,
    /// Other DCs that must hold the payload for `immediate`.
    pub others_required: usize,
    /// How long `immediate` waits.
    pub timeout: Duration,
}

/// The cluster's acknowledgement policy and its per-mailbox overrides.
#[derive(Debug, Clone)]
pub struct AckRules {
    /// Policy where no rule matches.
    pub default: AckPolicy,
    /// `(pattern, policy)`, first match wins.
    pub rules: Vec<(PathPattern, AckPolicy)>,
}

impl AckRules {
    /// Builds the rules from the `[cluster]` config (already validated).
    pub fn from_config(c: &ClusterConfig, total_dcs: usize) -> Result<Self, ServiceError> {
        let default = AckPolicy {
            mode: c.ack,
            others_required: c.immediate_quorum.others_required(total_dcs),
            timeout: c.immediate_timeout.0,
        };
        let mut rules = Vec::new();
        for r in &c.ack_rules {
            rules.push((
                PathPattern::parse(&r.mailbox)?,
                AckPolicy {
                    mode: r.ack.unwrap_or(c.ack),
                    others_required: r
                        .immediate_quorum
                        .unwrap_or(c.immediate_quorum)
                        .others_required(total_dcs),
                    timeout: r.immediate_timeout.unwrap_or(c.immediate_timeout).0,
                },
            ));
        }
        Ok(AckRules { default, rules })
    }

    /// The policy for uploads into `mailbox`.
    pub fn for_mailbox(&self, mailbox: &MailboxPath) -> &AckPolicy {
        self.rules
            .iter()
            .find(|(p, _)| p.matches(mailbox))
            .map(|(_, a)| a)
            .unwrap_or(&self.default)
    }
}

/// Node-wide things an upload needs.
#[derive(Clone)]
pub struct IngestContext {
    /// The DC log.
    pub raft: RaftNode,
    /// The DC's segment store.
    pub segments: Arc<dyn SegmentStore>,
    /// This node's DC name.
    pub dc: String,
    /// Inline threshold in bytes.
    pub inline_threshold: u64,
    /// Segment size in bytes.
    pub segment_size: u64,
    /// Acknowledgement policy.
    pub ack: AckRules,
    /// Replication status, including replica acks seen on incoming feeds.
    pub replication: StatusHandle,
}

/// An upload in progress.
pub struct Upload {
    ctx: IngestContext,
    id: MessageId,
    mailbox: MailboxPath,
    name: String,
    idempotency_key: Option<String>,
    declared: Option<Digest>,
    attributes: BTreeMap<String, String>,
    ack: AckPolicy,
    whole: WholeHash,
    size: u64,
    inline: Vec<u8>,
    spilled: bool,
    writer: Option<Box<dyn SegmentWriter>>,
    writer_len: u64,
    /// Full segments being made durable (fsync, rename, directory fsync)
    /// while the next one is received, oldest first.
    finishing: std::collections::VecDeque<FinishJob>,
    segments: Vec<SegmentMeta>,
    /// The payload kept for sending to other DCs ahead of the record, while
    /// it is small enough (see `mailbox_replication::early`).
    early: Option<mailbox_replication::early::EarlyCollector>,
}

/// The SHA-256 of the whole payload, computed as chunks arrive. A large
/// chunk is hashed on a blocking thread while the upload goes on (the
/// segment writer hashes and writes its own copy on another), so hashing a
/// large upload neither stalls an async worker nor waits in line behind
/// the segment write; the next chunk waits for the previous one's hash.
enum WholeHash {
    Idle(Sha256),
    Busy(tokio::task::JoinHandle<Sha256>),
    /// A hashing task failed, or the digest was already taken: it no
    /// longer covers every byte, so every later use fails.
    Failed,
}

/// Chunks at least this large are hashed off the async workers (a 64 KiB
/// chunk is ~30 µs of SHA-256; smaller ones are not worth a thread hop).
const HASH_OFF_WORKER_MIN: usize = 64 << 10;

impl WholeHash {
    /// The hasher once every chunk given so far is in. The job is awaited
    /// in place, so a caller that gives up while it runs leaves `Busy`
    /// (awaited again next time), never a fresh hasher.
    async fn take(&mut self) -> Result<Sha256, ServiceError> {
        if let WholeHash::Busy(job) = self {
            match job.await {
                Ok(h) => *self = WholeHash::Idle(h),
                Err(e) => {
                    *self = WholeHash::Failed;
                    return Err(ServiceError::Internal {
                        reason: format!("payload hashing task: {e}"),
                    });
                }
            }
        }
        match std::mem::replace(self, WholeHash::Failed) {
            WholeHash::Idle(h) => Ok(h),
            _ => Err(ServiceError::Internal {
                reason: "the payload's digest is incomplete after an earlier failure".into(),
            }),
        }
    }

    async fn update(&mut self, data: &Bytes) -> Result<(), ServiceError> {
        let mut h = self.take().await?;
        if data.len() < HASH_OFF_WORKER_MIN {
            h.update(data);
            *self = WholeHash::Idle(h);
        } else {
            let data = data.clone();
            *self = WholeHash::Busy(tokio::task::spawn_blocking(move || {
                h.update(&data);
                h
            }));
        }
        Ok(())
    }
}

type FinishJob = tokio::task::JoinHandle<Result<SegmentMeta, mailbox_segments::SegmentError>>;

/// Full segments allowed to be finishing at once: bounds the dirty page
/// cache an upload holds to about this many segments (page cache, not the
/// process's memory: a finishing segment holds only its file handle). More
/// than two keeps the disk busy while one segment's fsync waits on the
/// journal.
const FINISHING_MAX: usize = 6;

/// Where an upload's payload goes ahead of its record: this node's feed
/// streams when it leads, the leader (which serves them) when it follows
/// and there are other DCs to send to.
fn early_collector(
    ctx: &IngestContext,
    several_dcs: bool,
) -> Result<Option<mailbox_replication::early::EarlyCollector>, ServiceError> {
    if ctx.raft.is_leader() {
        return Ok(ctx.replication.early.collector());
    }
    if !several_dcs {
        return Ok(None);
    }
    let me = ctx.raft.report();
    Ok(me
        .leader
        .and_then(|l| me.members.iter().find(|(id, _)| *id == l))
        .map(|(_, addr)| ctx.replication.early.forwarding_collector(addr.clone())))
}

/// The committed message and whether it was an idempotent repeat.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The message.
    pub meta: MessageMeta,
    /// True when an earlier upload with the same key was returned.
    pub deduplicated: bool,
    /// True when this upload stored a new message and is acknowledged
    /// `delayed`: its first apply recorded it as held by this DC alone,
    /// since its creation, and nothing else of its replication yet, so an
    /// answer needs no scan of its holders. (A replayed proposal answers
    /// with that first apply's view too; acks of other DCs that arrived
    /// since are not in it.)
    pub fresh: bool,
}

impl Upload {
    /// Validates the request and starts an upload. Nothing is written yet.
    pub async fn begin(ctx: IngestContext, req: UploadRequest) -> Result<Self, ServiceError> {
        let mailbox = MailboxPath::parse(&req.mailbox)?;
        validate_message_name(&req.name)?;
        if let Some(k) = &req.idempotency_key {
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || k.contains('\0') {
                return Err(ServiceError::invalid(format!(
                    "idempotency key must be 1..={MAX_IDEMPOTENCY_KEY} bytes without NUL"
                )));
            }
        }
        let declared = req.sha256.as_deref().map(Digest::from_hex).transpose()?;
        validate_attributes(req.attributes.iter())?;
        // Completion tracking needs the cluster's DC list in the log; the
        // leader records it moments after the first election.
        let mut applied = ctx.raft.applied_watch();
        let ready_by = tokio::time::Instant::now() + Duration::from_secs(5);
        let several_dcs = loop {
            if let Some(dcs) = mailbox_state::replication::configured_dcs(ctx.raft.view())? {
                break dcs.len() > 1;
            }
            if tokio::time::timeout_at(ready_by, applied.changed())
                .await
                .is_err()
            {
                return Err(ServiceError::Unavailable {
                    reason: "this DC has not recorded its cluster membership yet; retry shortly"
                        .into(),
                });
            }
        };
        // Fail fast on a missing mailbox before any byte is stored; the state
        // machine checks again at commit.
        if mailbox_state::get_mailbox(ctx.raft.view(), &mailbox)?.is_none() {
            return Err(ServiceError::NotFound {
                what: format!("mailbox {mailbox}"),
            });
        }
        // Per upload beats per mailbox beats the cluster default.
        let mut ack = ctx.ack.for_mailbox(&mailbox).clone();
        if let Some(mode) = req.ack {
            ack.mode = mode;
        }
        let early = early_collector(&ctx, several_dcs)?;
        Ok(Upload {
            ctx,
            early,
            ack,
            id: MessageId::new(),
            mailbox,
            name: req.name,
            idempotency_key: req.idempotency_key,
            declared,
            attributes: req.attributes,
            whole: WholeHash::Idle(Sha256::new()),
            size: 0,
            inline: Vec::new(),
            spilled: false,
            writer: None,
            writer_len: 0,
            finishing: std::collections::VecDeque::new(),
            segments: Vec::new(),
        })
    }

    /// Bytes received so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Accepts the next chunk of payload. Chunks past the inline threshold
    /// go to the segment writer as they are (sliced at segment boundaries,
    /// not copied).
    pub async fn write(&mut self, data: Bytes) -> Result<(), ServiceError> {
        self.whole.update(&data).await?;
        self.size += data.len() as u64;
        if let Some(early) = &mut self.early {
            early.push(&data);
        }
        if !self.spilled {
            if (self.inline.len() + data.len()) as u64 <= self.ctx.inline_threshold {
                self.inline.extend_from_slice(&data);
                return Ok(());
            }
            // Past the threshold: everything goes to segments from now on.
            self.spilled = true;
            let buffered = std::mem::take(&mut self.inline);
            self.write_segments(Bytes::from(buffered)).await?;
        }
        self.write_segments(data).await
    }

    async fn write_segments(&mut self, mut data: Bytes) -> Result<(), ServiceError> {
        while !data.is_empty() {
            let n = self.write_segments_some(&data).await?;
            data.advance(n);
        }
        Ok(())
    }

    /// Writes as much of `data` as fits in the current segment.
    async fn write_segments_some(&mut self, data: &Bytes) -> Result<usize, ServiceError> {
        if self.writer.is_none() {
            // Finishing segments come before this one.
            let index = (self.segments.len() + self.finishing.len()) as u32;
            self.writer = Some(self.ctx.segments.create(self.id, index).await?);
            self.writer_len = 0;
        }
        let room = (self.ctx.segment_size - self.writer_len) as usize;
        let n = room.min(data.len());
        let w = self.writer.as_mut().expect("opened above");
        w.write_bytes(data.slice(..n)).await?;
        self.writer_len += n as u64;
        if self.writer_len == self.ctx.segment_size {
            // Make it durable in the background; the upload goes on.
            let w = self.writer.take().expect("opened above");
            self.finishing.push_back(tokio::spawn(w.finish()));
            while self.finishing.len() > FINISHING_MAX {
                self.settle_oldest().await?;
            }
        }
        Ok(n)
    }

    /// Waits for the oldest finishing segment and records it.
    async fn settle_oldest(&mut self) -> Result<(), ServiceError> {
        if let Some(job) = self.finishing.pop_front() {
            let seg = job.await.map_err(|e| ServiceError::Internal {
                reason: format!("segment finish task: {e}"),
            })??;
            self.segments.push(seg);
        }
        Ok(())
    }

    /// Drops everything written so far.
    pub async fn abort(mut self) {
        self.writer = None;
        // Let finishing segments end before their directory is removed.
        while let Some(job) = self.finishing.pop_front() {
            let _ = job.await;
        }
        if self.spilled {
            if let Err(e) = self.ctx.segments.delete_message(self.id).await {
                tracing::warn!(id = %self.id, "could not remove aborted upload's segments: {e}");
            }
        }
    }

    /// Verifies, commits and returns the message. `expected_size`, when the
    /// protocol carries it, must equal the bytes received.
    #[tracing::instrument(level = "debug", skip(self), fields(id = %self.id, size = self.size))]
    pub async fn finish(mut self, expected_size: Option<u64>) -> Result<Stored, ServiceError> {
        match self.commit(expected_size).await {
            Ok(s) => {
                if self.ack.mode == AckMode::Immediate {
                    wait_replicated(&self.ctx, &s.meta, &self.ack).await?;
                }
                // Here rather than in the gRPC service: every protocol's
                // uploads pass through `finish`.
                crate::metrics::COUNTERS.upload_acked(self.ack.mode, self.size);
                Ok(s)
            }
            Err((e, cleanup)) => {
                // Only segments that provably belong to no committed message
                // go: the state machine answers a replay of this upload as a
                // success, so a refusal means this id was not committed;
                // checking the applied state as well costs two reads.
                if cleanup && self.spilled && !self.committed_here() {
                    self.abort().await;
                }
                Err(e)
            }
        }
    }

    /// Whether this node's applied state knows this upload's id as a
    /// message (or a deleted one); an unreadable state counts as yes.
    fn committed_here(&self) -> bool {
        let view = self.ctx.raft.view();
        !matches!(
            (
                mailbox_state::get_message(view, &self.id),
                mailbox_state::get_gone(view, &self.id),
            ),
            (Ok(None), Ok(None))
        )
    }

    /// Returns the error and whether segments must be removed (false when
    /// the commit may have happened and the collector must decide).
    async fn commit(&mut self, expected_size: Option<u64>) -> Result<Stored, (ServiceError, bool)> {
        if let Some(n) = expected_size {
            if n != self.size {
                return Err((
                    ServiceError::Truncated {
                        reason: format!("client declared {n} bytes, server received {}", self.size),
                    },
                    true,
                ));
            }
        }
        let sha256 = Digest::from(self.whole.take().await.map_err(|e| (e, true))?);
        if let Some(d) = self.declared {
            if d != sha256 {
                return Err((
                    ServiceError::ChecksumMismatch {
                        declared: d.to_hex(),
                        actual: sha256.to_hex(),
                    },
                    true,
                ));
            }
        }
        // All bytes are in and verified: other DCs can start storing them
        // while this DC makes its segments durable and commits.
        if let Some(early) = self.early.take() {
            if self.spilled {
                early.publish(self.id, self.ctx.segment_size);
            }
        }
        while !self.finishing.is_empty() {
            self.settle_oldest().await.map_err(|e| (e, true))?;
        }
        if let Some(w) = self.writer.take() {
            let seg = w.finish().await.map_err(|e| (e.into(), true))?;
            self.segments.push(seg);
        }
        // An upload that stalled for longer than the orphan grace period may
        // have lost its segments to the collector: fail here, cleanly, rather
        // than commit a message without them. (The collector's decision is
        // committed before it removes anything, so one that comes after
        // this check makes the state machine refuse the commit instead.)
        for seg in &self.segments {
            match self.ctx.segments.len(self.id, seg.index).await {
                Ok(n) if n == seg.size => {}
                Ok(n) => {
                    return Err((
                        ServiceError::Internal {
                            reason: format!(
                                "segment {} of upload {} has {n} bytes in the segment store, {} were written",
                                seg.index, self.id, seg.size
                            ),
                        },
                        true,
                    ))
                }
                Err(mailbox_segments::SegmentError::NotFound { .. }) => {
                    return Err((
                        ServiceError::Unavailable {
                            reason: format!(
                                "the segments of upload {} were removed as orphans while it stalled \
                                 (longer than the orphan grace period); upload again",
                                self.id
                            ),
                        },
                        true,
                    ))
                }
                Err(e) => return Err((e.into(), true)),
            }
        }
        let payload = if self.spilled {
            Payload::Segments {
                segment_size: self.ctx.segment_size,
                segments: std::mem::take(&mut self.segments),
            }
        } else {
            Payload::Inline
        };
        let meta = MessageMeta {
            id: self.id,
            mailbox: self.mailbox.clone(),
            name: self.name.clone(),
            size: self.size,
            sha256,
            created_ms: mailbox_types::now_ms(),
            origin_dc: self.ctx.dc.clone(),
            attributes: std::mem::take(&mut self.attributes),
            payload,
        };
        let cmd = Command::PutMessage {
            meta,
            inline: (!self.spilled).then(|| std::mem::take(&mut self.inline)),
            idempotency_key: self.idempotency_key.clone(),
        };
        // A proposal that times out may still commit: keep the segments and
        // let the orphan collector decide against the committed state.
        let res = self
            .ctx
            .raft
            .propose(cmd)
            .await
            .map_err(|e| (e.into(), false))?;
        match res {
            Ok(CommandResult::Message { meta, deduplicated }) => {
                // An earlier message holds the key: our copy's segments are
                // garbage. Never when the answer is our own id (a replayed
                // proposal that committed the first time).
                if deduplicated && self.spilled && meta.id != self.id {
                    let _ = self.ctx.segments.delete_message(self.id).await;
                }
                let fresh =
                    !deduplicated && meta.id == self.id && self.ack.mode == AckMode::Delayed;
                Ok(Stored {
                    meta,
                    deduplicated,
                    fresh,
                })
            }
            Ok(other) => Err((
                ServiceError::Internal {
                    reason: format!("unexpected put result {other:?}"),
                },
                false,
            )),
            Err(e) => Err((e.into(), true)),
        }
    }
}

/// Waits until the required number of other DCs hold `meta` in full: their
/// replica acks, committed in their DCs, either applied here already or
/// just arrived on their feeds (see `AckWaiters`). Times out with a retryable error; the message stays and
/// keeps replicating.
pub async fn wait_replicated(
    ctx: &IngestContext,
    meta: &MessageMeta,
    policy: &AckPolicy,
) -> Result<(), ServiceError> {
    let need = policy.others_required;
    if need == 0 {
        return Ok(());
    }
    // Deleted since (the answer to a retry came from its `Gone` record):
    // nothing will ever hold it again; the upload itself had succeeded.
    if mailbox_state::get_message(ctx.raft.view(), &meta.id)?.is_none()
        && mailbox_state::get_gone(ctx.raft.view(), &meta.id)?.is_some()
    {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + policy.timeout;
    let mut applied = ctx.raft.applied_watch();
    let acks = &ctx.replication.acks;
    acks.register(meta.id);
    // Unregister however this function returns.
    struct Tracked<'a>(&'a mailbox_replication::AckWaiters, MessageId);
    impl Drop for Tracked<'_> {
        fn drop(&mut self) {
            self.0.unregister(&self.1);
        }
    }
    let _tracked = Tracked(acks, meta.id);
    loop {
        applied.mark_unchanged();
        // Arm the ack notification before looking, so none is missed.
        let ack_arrived = acks.notified();
        tokio::pin!(ack_arrived);
        ack_arrived.as_mut().enable();
        // Replica acks already applied here, plus those that just arrived
        // on a feed (committed in their DC, not yet here).
        let mut holders: std::collections::BTreeSet<String> =
            mailbox_state::replication::holders(ctx.raft.view(), &meta.id)?
                .into_iter()
                .map(|(dc, _)| dc)
                .collect();
        holders.extend(acks.seen(&meta.id));
        // Other than the message's origin, not other than this DC: a retry
        // answered here with a message that originated elsewhere needs
        // this DC (or another) to hold it, not just the origin.
        let others = holders.iter().filter(|dc| **dc != meta.origin_dc).count();
        if others >= need {
            return Ok(());
        }
        tokio::select! {
            r = applied.changed() => {
                if r.is_err() {
                    return Err(ServiceError::Unavailable {
                        reason: "node shutting down".into(),
                    });
                }
            }
            _ = &mut ack_arrived => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ServiceError::Unavailable {
                    reason: format!(
                        "message {} is stored in DC {} but only {others} of the {need} other DCs required \
                         for immediate acknowledgement hold it after {:?}; it keeps replicating, retry with \
                         the same idempotency key to wait again",
                        meta.id, ctx.dc, policy.timeout
                    ),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_whole_hash_covers_every_chunk_in_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        // Small and large chunks mixed: some hashed in place, some on the
        // blocking pool, one behind the other.
        let sizes = [10usize, 70_000, 1, 200_000, 65_535, 65_536, 1_000_000, 3];
        let mut h = WholeHash::Idle(Sha256::new());
        let (mut at, mut i) = (0, 0);
        while at < data.len() {
            let n = sizes[i % sizes.len()].min(data.len() - at);
            h.update(&Bytes::copy_from_slice(&data[at..at + n]))
                .await
                .unwrap();
            at += n;
            i += 1;
        }
        let got = Digest::from(h.take().await.unwrap());
        assert_eq!(got, Digest::of(&data));
        // Taken once: a second take (a digest of nothing) is refused.
        assert!(h.take().await.is_err());
    }
}
