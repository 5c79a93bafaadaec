//! Copying missing segments from other DCs (leader only).
//!
//! Work comes from the state machine's missing-payload index, so nothing is
//! lost across crashes. Each message is fetched segment by segment from its
//! origin DC first, then any other DC; every segment is verified against its
//! SHA-256 before it is written (a corrupt copy is discarded, counted and
//! fetched again). Concurrency is capped; failures back off per message
//! on the schedule kept in the persisted [`RetryTable`], so a restarted
//! leader neither forgets attempt counts nor retries everything at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailbox_proto::v1::mailbox_client::MailboxClient;
use mailbox_proto::v1::GetRequest;
use mailbox_raft::RaftNode;
use mailbox_segments::SegmentStore;
use mailbox_state::Command;
use mailbox_types::{Digest, MessageId, MessageMeta, Payload};
use tokio::sync::{watch, Semaphore};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::replicator::{is_leader, wait_leadership};
use crate::retry::{RetryKind, RetryTable};
use crate::{connect, RemoteDc, ReplicationError, StatusHandle};

/// Messages fetched at once.
const CONCURRENCY: usize = 8;
/// First retry delay of a failed fetch.
const RETRY_BASE: Duration = Duration::from_millis(200);
/// Longest retry delay of a failed fetch.
const RETRY_CAP: Duration = Duration::from_secs(30);
/// Missing-payload index entries read at a time.
const PAGE: usize = 1024;
/// How often the fetcher looks at the index without a new apply.
const IDLE_POLL: Duration = Duration::from_millis(500);

pub(crate) async fn run(
    raft: RaftNode,
    remotes: Vec<RemoteDc>,
    segments: Arc<dyn SegmentStore>,
    status: StatusHandle,
    retry: RetryTable,
    mut shutdown: watch::Receiver<bool>,
) {
    let sem = Arc::new(Semaphore::new(CONCURRENCY));
    // One connection per remote endpoint, shared by every fetch: HTTP/2
    // multiplexes the concurrent `Get`s, and a backlog of thousands of
    // messages does not pay a TCP and HTTP/2 handshake (two round trips
    // over a long link) each.
    let clients: Clients = Arc::default();
    let in_flight: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    let mut applied = raft.applied_watch();
    let mut passes = 0u64;
    loop {
        if !wait_leadership(&raft, &mut shutdown).await {
            return;
        }
        passes += 1;
        if passes % 64 == 1 {
            forget_finished(&raft, &retry);
        }
        let now = mailbox_types::now_ms();
        // Page through the whole index until every fetch slot is taken:
        // messages that keep failing (backed off) or are in flight must not
        // hide the ones behind them.
        let mut after: Option<MessageId> = None;
        let mut pending = Vec::new();
        'pages: loop {
            if sem.available_permits() == 0 {
                break;
            }
            let (page, next) = match mailbox_state::replication::missing_payloads_page(
                raft.view(),
                after.as_ref(),
                PAGE,
            ) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("missing-payload index unreadable: {e}");
                    break;
                }
            };
            after = next;
            for meta in page {
                if in_flight.lock().expect("lock").contains(&meta.id) {
                    continue;
                }
                match retry.get(RetryKind::Fetch, meta.id.as_bytes()) {
                    Ok(Some(e)) if e.due_ms > now => continue,
                    Ok(_) => {}
                    Err(e) => tracing::error!("{e}"),
                }
                // The orphan collector condemned segments under this id
                // (pushed ahead of a record that came late) and is removing
                // them: writing there now could be undone by it.
                if mailbox_state::orphan_pending(raft.view(), &meta.id).unwrap_or(true) {
                    continue;
                }
                pending.push(meta);
                if pending.len() >= sem.available_permits() {
                    break 'pages;
                }
            }
            if after.is_none() {
                break;
            }
        }
        for meta in pending {
            let Ok(permit) = sem.clone().try_acquire_owned() else {
                break;
            };
            in_flight.lock().expect("lock").insert(meta.id);
            let (raft, remotes, segments, status, in_flight, retry, clients) = (
                raft.clone(),
                remotes.clone(),
                segments.clone(),
                status.clone(),
                in_flight.clone(),
                retry.clone(),
                clients.clone(),
            );
            tokio::spawn(async move {
                let id = meta.id;
                let res =
                    fetch_message(&raft, &remotes, segments.as_ref(), &status, &clients, &meta)
                        .await;
                match res {
                    Ok(()) => {
                        if let Err(e) = retry.clear(RetryKind::Fetch, id.as_bytes()) {
                            tracing::error!("{e}");
                        }
                    }
                    Err(e) => {
                        status.fetch.lock().expect("lock").retries += 1;
                        if matches!(e, ReplicationError::Corrupt { .. }) {
                            status.fetch.lock().expect("lock").corrupt += 1;
                        }
                        match retry.record_failure(
                            RetryKind::Fetch,
                            id.as_bytes(),
                            &e.to_string(),
                            mailbox_types::now_ms(),
                            RETRY_BASE,
                            RETRY_CAP,
                        ) {
                            Ok(r) => tracing::warn!(
                                %id, attempt = r.attempts, retry_in_ms = r.due_ms - mailbox_types::now_ms(),
                                "segment fetch failed, will retry: {e}"
                            ),
                            Err(te) => tracing::error!(%id, "segment fetch failed ({e}) and {te}"),
                        }
                    }
                }
                in_flight.lock().expect("lock").remove(&id);
                drop(permit);
            });
        }
        // Wake on new applies (new missing payloads), when the next retry
        // is due, or after a while in any case.
        let until_due = retry
            .next_due_ms()
            .ok()
            .flatten()
            .map(|due| Duration::from_millis((due - mailbox_types::now_ms()).clamp(10, 500) as u64))
            .unwrap_or(IDLE_POLL);
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(until_due.min(IDLE_POLL)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Drops retry entries of messages that no longer miss their payload
/// (fetched by an earlier leader, or deleted).
fn forget_finished(raft: &RaftNode, retry: &RetryTable) {
    let Ok(entries) = retry.entries(RetryKind::Fetch, 4096) else {
        return;
    };
    for (subject, _) in entries {
        let Ok(bytes) = <[u8; 16]>::try_from(subject.as_slice()) else {
            let _ = retry.clear(RetryKind::Fetch, &subject);
            continue;
        };
        let id = MessageId::from_bytes(bytes);
        if !mailbox_state::replication::is_missing(raft.view(), &id).unwrap_or(true) {
            let _ = retry.clear(RetryKind::Fetch, &subject);
        }
    }
}

async fn fetch_message(
    raft: &RaftNode,
    remotes: &[RemoteDc],
    segments: &dyn SegmentStore,
    status: &StatusHandle,
    clients: &Clients,
    meta: &MessageMeta,
) -> Result<(), ReplicationError> {
    let Payload::Segments {
        segment_size,
        segments: segs,
    } = &meta.payload
    else {
        return Ok(());
    };
    // Origin first: it always has the payload.
    let mut sources: Vec<&RemoteDc> = remotes
        .iter()
        .filter(|r| r.name == meta.origin_dc)
        .collect();
    sources.extend(remotes.iter().filter(|r| r.name != meta.origin_dc));
    for seg in segs {
        // Resumable: a segment already stored whole (verified) is kept,
        // once its name is durable too (an earlier attempt may have crashed
        // between the rename and the directory fsync).
        if let Ok(b) = segments.read(meta.id, seg.index, 0, seg.size).await {
            if digest(b.to_vec()).await.1 == seg.sha256 {
                segments
                    .sync_message(meta.id)
                    .await
                    .map_err(|e| ReplicationError::Local(e.to_string()))?;
                continue;
            }
        }
        let mut last_err = None;
        let mut done = false;
        for src in &sources {
            match fetch_segment(clients, src, meta, seg.index, *segment_size, seg.size).await {
                Ok(data) => {
                    match write_segment(segments, meta.id, seg.index, &data, seg.sha256).await {
                        Ok(()) => {
                            status.fetch.lock().expect("lock").segments_copied += 1;
                            done = true;
                            break;
                        }
                        Err(mailbox_segments::SegmentError::Mismatch { .. }) => {
                            last_err = Some(ReplicationError::Corrupt {
                                dc: src.name.clone(),
                                id: meta.id.to_string(),
                                index: seg.index,
                            });
                        }
                        Err(e) => return Err(ReplicationError::Local(e.to_string())),
                    }
                }
                Err(e) => last_err = Some(e),
            }
        }
        if !done {
            return Err(
                last_err.unwrap_or(ReplicationError::Local("no source DC configured".into()))
            );
        }
    }
    if !is_leader(raft) {
        return Err(ReplicationError::Local(
            "lost leadership before acknowledging".into(),
        ));
    }
    raft.propose(Command::PayloadHeld {
        id: meta.id,
        at_ms: mailbox_types::now_ms(),
    })
    .await
    .map_err(|e| ReplicationError::Local(e.to_string()))?
    .map_err(|e| ReplicationError::Local(e.to_string()))?;
    Ok(())
}

/// Stores a copied segment durably (temp file, fsync, rename) if it hashes
/// to `sha256` (hashed once, while it is written); a corrupt copy is
/// refused with [`mailbox_segments::SegmentError::Mismatch`] and leaves
/// nothing under the segment's name.
pub(crate) async fn write_segment(
    segments: &dyn SegmentStore,
    id: MessageId,
    index: u32,
    data: &[u8],
    sha256: Digest,
) -> Result<(), mailbox_segments::SegmentError> {
    let mut w = segments.create(id, index).await?;
    w.write(data).await?;
    w.finish_expecting(sha256).await?;
    Ok(())
}

/// SHA-256 of `data`, computed on the blocking pool so that several
/// fetches hash on several cores and the runtime keeps moving bytes.
async fn digest(data: Vec<u8>) -> (Vec<u8>, Digest) {
    tokio::task::spawn_blocking(move || {
        let d = Digest::of(&data);
        (data, d)
    })
    .await
    .expect("hashing task panicked")
}

/// Open connections to remote endpoints, shared by all fetches. A
/// connection that fails a request is dropped and reopened on next use.
type Clients = Arc<Mutex<HashMap<String, MailboxClient<Channel>>>>;

async fn fetch_segment(
    clients: &Clients,
    src: &RemoteDc,
    meta: &MessageMeta,
    index: u32,
    segment_size: u64,
    size: u64,
) -> Result<Vec<u8>, ReplicationError> {
    let mut last = String::from("no endpoints");
    for ep in &src.endpoints {
        let cached = clients.lock().expect("clients lock").get(ep).cloned();
        let mut client = match cached {
            Some(c) => c,
            None => match connect(ep).await {
                Ok(ch) => {
                    let c = MailboxClient::new(ch)
                        .max_decoding_message_size(mailbox_proto::MAX_MESSAGE_SIZE);
                    clients
                        .lock()
                        .expect("clients lock")
                        .insert(ep.clone(), c.clone());
                    c
                }
                Err(e) => {
                    last = format!("{ep}: {e}");
                    continue;
                }
            },
        };
        let req = GetRequest {
            id: meta.id.to_string(),
            offset: index as u64 * segment_size,
            length: size,
        };
        let mut stream = match client.get(req).await {
            Ok(s) => s.into_inner(),
            Err(e) => {
                last = format!("{ep}: {}", e.message());
                clients.lock().expect("clients lock").remove(ep);
                continue;
            }
        };
        let mut buf = Vec::with_capacity(size as usize);
        let mut ok = true;
        while let Some(part) = stream.next().await {
            match part {
                Ok(p) => buf.extend_from_slice(&p.chunk),
                Err(e) => {
                    last = format!("{ep}: {}", e.message());
                    clients.lock().expect("clients lock").remove(ep);
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            return Ok(buf);
        }
    }
    Err(ReplicationError::Unreachable {
        dc: src.name.clone(),
        reason: last,
    })
}
