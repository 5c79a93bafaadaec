//! Copying missing segments from other DCs (leader only).
//!
//! Work comes from the state machine's missing-payload index, so nothing is
//! lost across crashes. Each message is fetched segment by segment from its
//! origin DC first, then any other DC; every segment is verified against its
//! SHA-256 before it is written (a corrupt copy is discarded, counted and
//! fetched again). Concurrency is capped; failures back off per message.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::{backoff, connect, RemoteDc, ReplicationError, StatusHandle};

/// Messages fetched at once.
const CONCURRENCY: usize = 4;

pub(crate) async fn run(
    raft: RaftNode,
    remotes: Vec<RemoteDc>,
    segments: Arc<dyn SegmentStore>,
    status: StatusHandle,
    mut shutdown: watch::Receiver<bool>,
) {
    let sem = Arc::new(Semaphore::new(CONCURRENCY));
    let in_flight: Arc<Mutex<HashSet<MessageId>>> = Arc::default();
    // Per message: failed attempts and when to try again.
    let retry: Arc<Mutex<HashMap<MessageId, (u32, Instant)>>> = Arc::default();
    let mut applied = raft.applied_watch();
    loop {
        if !wait_leadership(&raft, &mut shutdown).await {
            return;
        }
        let pending = match mailbox_state::replication::missing_payloads(raft.view(), 1024) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("missing-payload index unreadable: {e}");
                Vec::new()
            }
        };
        let now = Instant::now();
        for meta in pending {
            if in_flight.lock().expect("lock").contains(&meta.id) {
                continue;
            }
            if retry
                .lock()
                .expect("lock")
                .get(&meta.id)
                .is_some_and(|(_, at)| *at > now)
            {
                continue;
            }
            let Ok(permit) = sem.clone().try_acquire_owned() else {
                break;
            };
            in_flight.lock().expect("lock").insert(meta.id);
            let (raft, remotes, segments, status, in_flight, retry) = (
                raft.clone(),
                remotes.clone(),
                segments.clone(),
                status.clone(),
                in_flight.clone(),
                retry.clone(),
            );
            tokio::spawn(async move {
                let id = meta.id;
                let res = fetch_message(&raft, &remotes, segments.as_ref(), &status, &meta).await;
                match res {
                    Ok(()) => {
                        retry.lock().expect("lock").remove(&id);
                    }
                    Err(e) => {
                        status.fetch.lock().expect("lock").retries += 1;
                        if matches!(e, ReplicationError::Corrupt { .. }) {
                            status.fetch.lock().expect("lock").corrupt += 1;
                        }
                        let mut r = retry.lock().expect("lock");
                        let entry = r.entry(id).or_insert((0, Instant::now()));
                        entry.0 += 1;
                        entry.1 = Instant::now()
                            + backoff(entry.0, Duration::from_millis(200), Duration::from_secs(30));
                        tracing::warn!(%id, attempt = entry.0, "segment fetch failed, will retry: {e}");
                    }
                }
                in_flight.lock().expect("lock").remove(&id);
                drop(permit);
            });
        }
        // Wake on new applies (new missing payloads) or periodically for retries.
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn fetch_message(
    raft: &RaftNode,
    remotes: &[RemoteDc],
    segments: &dyn SegmentStore,
    status: &StatusHandle,
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
    let mut clients = Clients::new();
    for seg in segs {
        // Resumable: a segment already stored whole (verified) is kept.
        if let Ok(b) = segments.read(meta.id, seg.index, 0, seg.size).await {
            if Digest::of(&b) == seg.sha256 {
                continue;
            }
        }
        let mut last_err = None;
        let mut done = false;
        for src in &sources {
            match fetch_segment(&mut clients, src, meta, seg.index, *segment_size, seg.size).await {
                Ok(data) => {
                    if Digest::of(&data) != seg.sha256 {
                        last_err = Some(ReplicationError::Corrupt {
                            dc: src.name.clone(),
                            id: meta.id.to_string(),
                            index: seg.index,
                        });
                        continue;
                    }
                    let mut w = segments
                        .create(meta.id, seg.index)
                        .await
                        .map_err(|e| ReplicationError::Local(e.to_string()))?;
                    w.write(&data)
                        .await
                        .map_err(|e| ReplicationError::Local(e.to_string()))?;
                    w.finish()
                        .await
                        .map_err(|e| ReplicationError::Local(e.to_string()))?;
                    status.fetch.lock().expect("lock").segments_copied += 1;
                    done = true;
                    break;
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

/// Connections opened while copying one message, reused across its segments.
type Clients = HashMap<String, MailboxClient<Channel>>;

async fn fetch_segment(
    clients: &mut Clients,
    src: &RemoteDc,
    meta: &MessageMeta,
    index: u32,
    segment_size: u64,
    size: u64,
) -> Result<Vec<u8>, ReplicationError> {
    let mut last = String::from("no endpoints");
    for ep in &src.endpoints {
        let mut client = match clients.get(ep) {
            Some(c) => c.clone(),
            None => match connect(ep).await {
                Ok(ch) => {
                    let c = MailboxClient::new(ch)
                        .max_decoding_message_size(mailbox_proto::MAX_MESSAGE_SIZE);
                    clients.insert(ep.clone(), c.clone());
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
                clients.remove(ep);
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
                    clients.remove(ep);
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
