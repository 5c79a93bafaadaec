//! The public gRPC API (`mailbox.v1.Mailbox`).
//!
//! Reads are served from this node's applied state (a node that forwarded a
//! write waits until it applied it, so clients read their own writes);
//! writes go through [`RaftNode::propose`]. Every error leaves through
//! `ServiceError -> Status`, the one conversion at this boundary.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use mailbox_proto::v1::mailbox_server::Mailbox;
use mailbox_proto::v1::{
    put_request, ClusterStatusRequest, ClusterStatusResponse, CreateMailboxRequest,
    CreateMailboxResponse, DcCopy, DeleteRequest, DeleteResponse, GetRequest, GetResponse,
    ListMailboxesRequest, ListMailboxesResponse, ListRequest, ListResponse, MessageInfo,
    NodeStatus, PutHeader, PutOneRequest, PutRequest, PutResponse, RemoteDcStatus, ReplicaInfo,
    ReplicationStatusRequest, ReplicationStatusResponse, SetAttributesRequest,
    SetAttributesResponse, StatRequest, StatResponse,
};
use mailbox_raft::RaftNode;
use mailbox_replication::{RemoteDc, StatusHandle};
use mailbox_state::{Command, CommandResult};
use mailbox_types::{MailboxPath, MessageId, MessageMeta, Payload};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::config::AckMode;
use crate::error::ServiceError;
use crate::ingest::{IngestContext, Stored, Upload, UploadRequest};

/// Size of the chunks a download is sent in.
pub const DOWNLOAD_CHUNK: u64 = 1 << 20;
/// Largest payload `PutOne` takes (larger ones stream through `Put`).
pub const MAX_PUT_ONE: usize = 4 << 20;
/// Largest request message the API decodes: a `PutOne` of `MAX_PUT_ONE`
/// with a header of the largest name, key and attributes, or a `Put`
/// chunk of that size.
pub const MAX_API_REQUEST: usize = MAX_PUT_ONE + (1 << 20);
/// Largest page a list returns.
pub const MAX_LIST_PAGE: u32 = 1000;

/// The public API of one node.
#[derive(Clone)]
pub struct MailboxService {
    ctx: IngestContext,
    remotes: Vec<RemoteDc>,
    status: StatusHandle,
}

impl MailboxService {
    /// A service over the node's ingest context; `remotes` and `status`
    /// come from the replicator.
    pub fn new(ctx: IngestContext, remotes: Vec<RemoteDc>, status: StatusHandle) -> Self {
        Self {
            ctx,
            remotes,
            status,
        }
    }

    /// Metadata plus this DC's view of where the message is held.
    fn info(&self, meta: &MessageMeta) -> Result<MessageInfo, ServiceError> {
        let holders = mailbox_state::replication::holders(self.raft().view(), &meta.id)?;
        self.info_with_holders(meta, holders)
    }

    /// [`Self::info`] with the holders already known (a new upload's own
    /// commit: this DC, since `created_ms`), which saves their scan.
    fn info_with_holders(
        &self,
        meta: &MessageMeta,
        holders: Vec<(String, i64)>,
    ) -> Result<MessageInfo, ServiceError> {
        let view = self.raft().view();
        let mut info = MessageInfo::from(meta);
        info.replicas = holders
            .into_iter()
            .map(|(dc, held_since_ms)| ReplicaInfo { dc, held_since_ms })
            .collect();
        info.complete_ms = mailbox_state::replication::complete_ms(view, &meta.id)?.unwrap_or(0);
        info.payload_pending = !info.replicas.iter().any(|r| r.dc == self.ctx.dc);
        info.metadata_since_ms = mailbox_state::replication::metadata_since(view, meta)?;
        Ok(info)
    }

    /// Every DC's copy of a message, each asked directly (in parallel, with
    /// a short timeout); a DC that cannot be asked is shown with the error
    /// and what this DC learned of it through replica acks.
    async fn copies(&self, info: &MessageInfo) -> Vec<DcCopy> {
        let held = |dc: &str| {
            info.replicas
                .iter()
                .find(|r| r.dc == dc)
                .map(|r| r.held_since_ms)
        };
        let mut out = vec![DcCopy {
            dc: self.ctx.dc.clone(),
            metadata_held: true,
            metadata_since_ms: info.metadata_since_ms,
            payload_held: !info.payload_pending,
            payload_since_ms: held(&self.ctx.dc).unwrap_or(0),
            error: String::new(),
        }];
        let asks = self.remotes.iter().map(|dc| {
            let id = info.id.clone();
            async move {
                let ask = async {
                    let mut last = Status::unavailable("no endpoints");
                    for ep in &dc.endpoints {
                        let ch = match mailbox_replication::connect(ep).await {
                            Ok(ch) => ch,
                            Err(e) => {
                                last = Status::unavailable(format!("{ep}: {e}"));
                                continue;
                            }
                        };
                        let mut c = mailbox_proto::v1::mailbox_client::MailboxClient::new(ch);
                        match c
                            .stat(StatRequest {
                                id: id.clone(),
                                local: true,
                            })
                            .await
                        {
                            Ok(r) => return Ok(r.into_inner().message),
                            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
                            Err(s) => last = s,
                        }
                    }
                    Err(last)
                };
                (dc, tokio::time::timeout(Duration::from_secs(2), ask).await)
            }
        });
        for (dc, res) in futures::future::join_all(asks).await {
            let mut copy = DcCopy {
                dc: dc.name.clone(),
                ..Default::default()
            };
            match res {
                Ok(Ok(Some(m))) => {
                    copy.metadata_held = true;
                    copy.metadata_since_ms = m.metadata_since_ms;
                    copy.payload_held = !m.payload_pending;
                    copy.payload_since_ms = m
                        .replicas
                        .iter()
                        .find(|r| r.dc == dc.name)
                        .map_or(0, |r| r.held_since_ms);
                }
                Ok(Ok(None)) => {}
                Ok(Err(s)) => copy.error = s.message().to_string(),
                Err(_) => copy.error = "no answer within 2s".into(),
            }
            if !copy.error.is_empty() {
                if let Some(t) = held(&dc.name) {
                    copy.payload_held = true;
                    copy.payload_since_ms = t;
                }
            }
            out.push(copy);
        }
        out
    }

    fn raft(&self) -> &RaftNode {
        &self.ctx.raft
    }

    fn message(&self, id: &str) -> Result<MessageMeta, ServiceError> {
        let id: MessageId = id.parse()?;
        mailbox_state::get_message(self.raft().view(), &id)?.ok_or(ServiceError::NotFound {
            what: format!("message {id}"),
        })
    }

    async fn receive_upload(
        &self,
        mut stream: Streaming<PutRequest>,
    ) -> Result<PutResponse, ServiceError> {
        let header = match stream.next().await {
            Some(Ok(PutRequest {
                part: Some(put_request::Part::Header(h)),
            })) => h,
            Some(Ok(_)) => {
                return Err(ServiceError::invalid(
                    "the first upload message must be a header",
                ))
            }
            Some(Err(s)) => {
                return Err(ServiceError::Truncated {
                    reason: format!("stream failed before the header: {}", s.message()),
                })
            }
            None => return Err(ServiceError::invalid("empty upload stream")),
        };
        let mut upload = Upload::begin(self.ctx.clone(), upload_request(header)?).await?;
        let trailer = loop {
            let next = match stream.next().await {
                Some(Ok(m)) => m.part,
                Some(Err(s)) => {
                    upload.abort().await;
                    return Err(ServiceError::Truncated {
                        reason: format!("client stream failed: {}", s.message()),
                    });
                }
                None => {
                    let got = upload.size();
                    upload.abort().await;
                    return Err(ServiceError::Truncated {
                        reason: format!("stream ended after {got} bytes without a trailer"),
                    });
                }
            };
            match next {
                Some(put_request::Part::Chunk(data)) => {
                    if let Err(e) = upload.write(data).await {
                        upload.abort().await;
                        return Err(e);
                    }
                }
                Some(put_request::Part::Trailer(t)) => break t,
                Some(put_request::Part::Header(_)) | None => {
                    upload.abort().await;
                    return Err(ServiceError::invalid("unexpected message in upload stream"));
                }
            }
        };
        let stored = upload.finish(Some(trailer.size)).await?;
        self.put_response(&stored)
    }

    /// The answer to a committed upload, whichever RPC carried it.
    fn put_response(&self, stored: &Stored) -> Result<PutResponse, ServiceError> {
        let info = if stored.fresh {
            // The holders scan cost 6-8% of a node's CPU on 1 KiB uploads
            // (profile, 2026-12-07); a new upload knows its one holder.
            let meta = &stored.meta;
            self.info_with_holders(meta, vec![(self.ctx.dc.clone(), meta.created_ms)])?
        } else {
            self.info(&stored.meta)?
        };
        Ok(PutResponse {
            message: Some(info),
            deduplicated: stored.deduplicated,
        })
    }

    /// A whole upload in one message (`PutOne`).
    async fn receive_one(&self, req: PutOneRequest) -> Result<PutResponse, ServiceError> {
        let header = req
            .header
            .ok_or_else(|| ServiceError::invalid("an upload needs a header"))?;
        if req.data.len() > MAX_PUT_ONE {
            return Err(ServiceError::invalid(format!(
                "PutOne takes at most {MAX_PUT_ONE} bytes, got {}; stream larger payloads with Put",
                req.data.len()
            )));
        }
        let size = req.data.len() as u64;
        let mut upload = Upload::begin(self.ctx.clone(), upload_request(header)?).await?;
        if !req.data.is_empty() {
            if let Err(e) = upload.write(req.data).await {
                upload.abort().await;
                return Err(e);
            }
        }
        let stored = upload.finish(Some(size)).await?;
        self.put_response(&stored)
    }
}

/// What an upload's header asks for, checked.
fn upload_request(header: PutHeader) -> Result<UploadRequest, ServiceError> {
    let opt = |s: String| (!s.is_empty()).then_some(s);
    Ok(UploadRequest {
        mailbox: header.mailbox,
        name: header.name,
        idempotency_key: opt(header.idempotency_key),
        sha256: opt(header.sha256),
        attributes: header.attributes.into_iter().collect(),
        ack: match header.ack.as_str() {
            "" => None,
            "delayed" => Some(AckMode::Delayed),
            "immediate" => Some(AckMode::Immediate),
            other => {
                return Err(ServiceError::invalid(format!(
                    "ack must be \"delayed\" or \"immediate\", not {other:?}"
                )))
            }
        },
    })
}

type GetStream = Pin<Box<dyn Stream<Item = Result<GetResponse, Status>> + Send>>;

impl MailboxService {
    /// Serves a download whose payload has not reached this DC yet from a DC
    /// that holds it (origin first), so a file that exists is never "not
    /// found" here.
    async fn proxy_get(
        &self,
        meta: &MessageMeta,
        r: GetRequest,
    ) -> Result<Response<GetStream>, Status> {
        let holders = mailbox_state::replication::holders(self.raft().view(), &meta.id)
            .map_err(ServiceError::from)?;
        let mut sources: Vec<&RemoteDc> = self
            .remotes
            .iter()
            .filter(|d| d.name == meta.origin_dc)
            .collect();
        sources.extend(
            self.remotes
                .iter()
                .filter(|d| d.name != meta.origin_dc && holders.iter().any(|(h, _)| h == &d.name)),
        );
        let mut last = String::from("no DC holding the payload is configured");
        for dc in sources {
            for ep in &dc.endpoints {
                let Ok(ch) = mailbox_replication::connect(ep).await else {
                    last = format!("{}: {ep} unreachable", dc.name);
                    continue;
                };
                let mut client = mailbox_proto::v1::mailbox_client::MailboxClient::new(ch)
                    .max_decoding_message_size(mailbox_proto::MAX_MESSAGE_SIZE);
                match client.get(r.clone()).await {
                    Ok(stream) => {
                        tracing::info!(id = %meta.id, from = %dc.name, "proxying download of a payload still replicating");
                        return Ok(Response::new(Box::pin(stream.into_inner()) as GetStream));
                    }
                    Err(e) => last = format!("{}: {}", dc.name, e.message()),
                }
            }
        }
        Err(ServiceError::Unavailable {
            reason: format!("payload of {} is still replicating to this DC and no other DC could serve it: {last}", meta.id),
        }
        .into())
    }
}

#[tonic::async_trait]
impl Mailbox for MailboxService {
    #[tracing::instrument(level = "info", skip_all, fields(path = %req.get_ref().path))]
    async fn create_mailbox(
        &self,
        req: Request<CreateMailboxRequest>,
    ) -> Result<Response<CreateMailboxResponse>, Status> {
        let r = req.into_inner();
        let path = MailboxPath::parse(&r.path).map_err(ServiceError::from)?;
        let cmd = Command::CreateMailbox {
            path,
            parents: r.parents,
            created_ms: mailbox_types::now_ms(),
        };
        let res = self.raft().propose(cmd).await.map_err(ServiceError::from)?;
        match res.map_err(ServiceError::from)? {
            CommandResult::Mailbox { record, created } => {
                Ok(Response::new(CreateMailboxResponse {
                    path: record.path.to_string(),
                    created,
                }))
            }
            other => Err(ServiceError::Internal {
                reason: format!("unexpected result {other:?}"),
            }
            .into()),
        }
    }

    async fn list_mailboxes(
        &self,
        req: Request<ListMailboxesRequest>,
    ) -> Result<Response<ListMailboxesResponse>, Status> {
        let prefix = req.into_inner().prefix;
        let list = mailbox_state::list_mailboxes(self.raft().view(), &prefix)
            .map_err(ServiceError::from)?;
        Ok(Response::new(ListMailboxesResponse {
            mailboxes: list.iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(level = "info", skip_all)]
    async fn put(
        &self,
        req: Request<Streaming<PutRequest>>,
    ) -> Result<Response<PutResponse>, Status> {
        let resp = self.receive_upload(req.into_inner()).await?;
        Ok(Response::new(resp))
    }

    #[tracing::instrument(level = "info", skip_all)]
    async fn put_one(&self, req: Request<PutOneRequest>) -> Result<Response<PutResponse>, Status> {
        let resp = self.receive_one(req.into_inner()).await?;
        Ok(Response::new(resp))
    }

    type GetStream = GetStream;

    #[tracing::instrument(level = "info", skip_all, fields(id = %req.get_ref().id))]
    async fn get(&self, req: Request<GetRequest>) -> Result<Response<Self::GetStream>, Status> {
        let r = req.into_inner();
        let meta = self.message(&r.id)?;
        if r.offset > meta.size {
            return Err(ServiceError::invalid(format!(
                "offset {} is past the end of the {}-byte message",
                r.offset, meta.size
            ))
            .into());
        }
        let end = if r.length == 0 {
            meta.size
        } else {
            r.offset.saturating_add(r.length).min(meta.size)
        };
        if !meta.segments().is_empty() {
            let held_here = mailbox_state::replication::holders(self.raft().view(), &meta.id)
                .map_err(ServiceError::from)?
                .iter()
                .any(|(dc, _)| dc == &self.ctx.dc);
            if !held_here {
                return self.proxy_get(&meta, r).await;
            }
        }
        let inline = match meta.payload {
            Payload::Inline => Some(
                mailbox_state::inline_payload(self.raft().view(), &meta.id)
                    .map_err(ServiceError::from)?
                    .ok_or_else(|| ServiceError::PayloadDamaged {
                        reason: format!("inline payload of {} missing", meta.id),
                    })?,
            ),
            Payload::Segments { .. } => None,
        };
        // Bounded: a slow reader holds at most a few chunks in memory.
        let (tx, rx) = mpsc::channel::<Result<GetResponse, Status>>(4);
        let segments = self.ctx.segments.clone();
        tokio::spawn(async move {
            let mut first = Some(MessageInfo::from(&meta));
            let mut pos = r.offset;
            // An empty range still delivers the metadata.
            if pos == end {
                let _ = tx
                    .send(Ok(GetResponse {
                        message: first.take(),
                        chunk: bytes::Bytes::new(),
                    }))
                    .await;
                return;
            }
            while pos < end {
                let chunk = match (&inline, &meta.payload) {
                    (Some(data), _) => {
                        let stop = (pos + DOWNLOAD_CHUNK).min(end);
                        Ok(bytes::Bytes::copy_from_slice(
                            &data[pos as usize..stop as usize],
                        ))
                    }
                    (None, Payload::Segments { segment_size, .. }) => {
                        let index = pos / segment_size;
                        let within = pos % segment_size;
                        let len = DOWNLOAD_CHUNK.min(segment_size - within).min(end - pos);
                        segments
                            .read(meta.id, index as u32, within, len)
                            .await
                            .map_err(|e| Status::from(ServiceError::from(e)))
                    }
                    (None, Payload::Inline) => unreachable!("inline payload loaded above"),
                };
                let msg = chunk.map(|chunk| {
                    pos += chunk.len() as u64;
                    GetResponse {
                        message: first.take(),
                        chunk,
                    }
                });
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as GetStream))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let r = req.into_inner();
        let mailbox = MailboxPath::parse(&r.mailbox).map_err(ServiceError::from)?;
        if mailbox_state::get_mailbox(self.raft().view(), &mailbox)
            .map_err(ServiceError::from)?
            .is_none()
        {
            return Err(ServiceError::NotFound {
                what: format!("mailbox {mailbox}"),
            }
            .into());
        }
        let after = if r.after.is_empty() {
            None
        } else {
            Some(r.after.parse::<MessageId>().map_err(ServiceError::from)?)
        };
        let limit = match r.limit {
            0 => 100,
            n => n.min(MAX_LIST_PAGE),
        } as usize;
        let page =
            mailbox_state::list_messages(self.raft().view(), &mailbox, after.as_ref(), limit)
                .map_err(ServiceError::from)?;
        let next_after = match page.last() {
            Some(m) if page.len() == limit => m.id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(ListResponse {
            messages: page.iter().map(Into::into).collect(),
            next_after,
        }))
    }

    async fn stat(&self, req: Request<StatRequest>) -> Result<Response<StatResponse>, Status> {
        let req = req.into_inner();
        let meta = self.message(&req.id)?;
        let mut info = self.info(&meta)?;
        if !req.local {
            info.copies = self.copies(&info).await;
        }
        Ok(Response::new(StatResponse {
            message: Some(info),
        }))
    }

    #[tracing::instrument(level = "info", skip_all, fields(id = %req.get_ref().id))]
    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let id: MessageId = req.into_inner().id.parse().map_err(ServiceError::from)?;
        let res = self
            .raft()
            .propose(Command::DeleteMessage {
                id,
                at_ms: mailbox_types::now_ms(),
            })
            .await
            .map_err(ServiceError::from)?;
        if let CommandResult::Deleted { meta } = res.map_err(ServiceError::from)? {
            if !meta.segments().is_empty() {
                // Best effort: the orphan collector removes them otherwise.
                if let Err(e) = self.ctx.segments.delete_message(meta.id).await {
                    tracing::warn!(id = %meta.id, "segments of deleted message kept for GC: {e}");
                }
            }
        }
        Ok(Response::new(DeleteResponse {}))
    }

    #[tracing::instrument(level = "info", skip_all, fields(id = %req.get_ref().id))]
    async fn set_attributes(
        &self,
        req: Request<SetAttributesRequest>,
    ) -> Result<Response<SetAttributesResponse>, Status> {
        let req = req.into_inner();
        let id: MessageId = req.id.parse().map_err(ServiceError::from)?;
        if let Some(k) = req.remove.iter().find(|k| req.set.contains_key(*k)) {
            return Err(
                ServiceError::invalid(format!("attribute {k:?} is both set and removed")).into(),
            );
        }
        // The result must stay within the per-message limits too.
        let mut after = self.message(&req.id)?.attributes;
        for k in &req.remove {
            after.remove(k);
        }
        after.extend(req.set.iter().map(|(k, v)| (k.clone(), v.clone())));
        crate::ingest::validate_attributes(after.iter())?;
        let res = self
            .raft()
            .propose(Command::SetAttributes {
                id,
                set: req.set.into_iter().collect(),
                remove: req.remove,
                wall_ms: mailbox_types::now_ms(),
            })
            .await
            .map_err(ServiceError::from)?;
        match res.map_err(ServiceError::from)? {
            CommandResult::Updated { meta } => Ok(Response::new(SetAttributesResponse {
                message: Some(self.info(&meta)?),
            })),
            other => Err(ServiceError::Internal {
                reason: format!("unexpected result of SetAttributes: {other:?}"),
            }
            .into()),
        }
    }

    async fn replication_status(
        &self,
        _req: Request<ReplicationStatusRequest>,
    ) -> Result<Response<ReplicationStatusResponse>, Status> {
        Ok(Response::new(replication_report(
            self.raft(),
            &self.ctx.dc,
            &self.remotes,
            &self.status,
        )?))
    }

    #[tracing::instrument(level = "info", skip_all, fields(dc = %req.get_ref().dc))]
    async fn reset_feed(
        &self,
        req: Request<mailbox_proto::v1::ResetFeedRequest>,
    ) -> Result<Response<mailbox_proto::v1::ResetFeedResponse>, Status> {
        let dc = req.into_inner().dc;
        if !self.remotes.iter().any(|r| r.name == dc) {
            return Err(ServiceError::NotFound {
                what: format!("remote DC {dc} (not in this node's [cluster] remotes)"),
            }
            .into());
        }
        // Only as the recovery it is: re-reading a feed that was not
        // rebuilt could bring back messages whose deletes are long purged.
        let refused = self
            .status
            .remotes
            .lock()
            .expect("status lock")
            .get(&dc)
            .is_some_and(|s| s.state == "feed-identity-changed");
        if !refused {
            return Err(ServiceError::FailedPrecondition {
                reason: format!(
                    "this node does not see DC {dc}'s feed refused for a changed identity \
                     (ask the DC's leader; see `mailbox replication status`); nothing reset"
                ),
            }
            .into());
        }
        let old_cursor = mailbox_state::replication::cursor(self.raft().view(), &dc)
            .map_err(ServiceError::from)?;
        self.raft()
            .propose(Command::ResetFeed { origin: dc.clone() })
            .await
            .map_err(ServiceError::from)?
            .map_err(ServiceError::from)?;
        tracing::warn!(%dc, old_cursor, "cursor on a remote feed reset by an admin");
        Ok(Response::new(mailbox_proto::v1::ResetFeedResponse {
            old_cursor,
        }))
    }

    #[tracing::instrument(level = "info", skip_all)]
    async fn snapshot(
        &self,
        _req: Request<mailbox_proto::v1::SnapshotRequest>,
    ) -> Result<Response<mailbox_proto::v1::SnapshotResponse>, Status> {
        let started = std::time::Instant::now();
        let (index, bytes) = self
            .raft()
            .snapshot_now(std::time::Duration::from_secs(600))
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(mailbox_proto::v1::SnapshotResponse {
            node_id: self.raft().id(),
            index,
            bytes,
            millis: started.elapsed().as_millis() as u64,
        }))
    }

    async fn cluster_status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let local = req.into_inner().local;
        let me = self.raft().report();
        let mut nodes = Vec::new();
        for (id, addr) in &me.members {
            let report = if *id == me.id {
                Ok(me.clone())
            } else if local {
                Err(ServiceError::Unavailable {
                    reason: "not asked (local view)".into(),
                })
            } else {
                self.raft().remote_report(addr).await.map_err(Into::into)
            };
            nodes.push(match report {
                Ok(r) => NodeStatus {
                    node_id: *id,
                    addr: addr.clone(),
                    reachable: true,
                    state: r.state,
                    term: r.term,
                    last_log_index: r.last_log_index.unwrap_or(0),
                    applied_index: r.applied_index.unwrap_or(0),
                    error: String::new(),
                },
                Err(e) => NodeStatus {
                    node_id: *id,
                    addr: addr.clone(),
                    reachable: false,
                    error: e.to_string(),
                    ..Default::default()
                },
            });
        }
        Ok(Response::new(ClusterStatusResponse {
            dc: self.ctx.dc.clone(),
            leader_id: me.leader.unwrap_or(0),
            has_leader: me.leader.is_some(),
            term: me.term,
            nodes,
        }))
    }
}

/// This node's view of replication: per remote DC (connection, cursor, lag,
/// reconnects) and of the payloads still missing here. What the
/// `ReplicationStatus` RPC answers and `/metrics` exports.
pub fn replication_report(
    raft: &RaftNode,
    dc: &str,
    remotes: &[RemoteDc],
    status: &StatusHandle,
) -> Result<ReplicationStatusResponse, ServiceError> {
    let view = raft.view();
    let pending = mailbox_state::replication::missing_payloads(view, usize::MAX)?;
    let now = mailbox_types::now_ms();
    let oldest = pending.iter().map(|m| m.created_ms).min();
    let live = status.remotes.lock().expect("status lock").clone();
    let fetch = status.fetch.lock().expect("status lock").clone();
    let mut out = Vec::new();
    for r in remotes {
        let s = live.get(&r.name).cloned().unwrap_or_default();
        // The cursor in the applied state is authoritative (followers
        // have no live pull); the live status adds the remote head.
        let cursor = mailbox_state::replication::cursor(view, &r.name)?;
        let head = s.remote_head.max(cursor);
        out.push(RemoteDcStatus {
            dc: r.name.clone(),
            state: if s.state.is_empty() {
                "idle".into()
            } else {
                s.state
            },
            cursor,
            remote_head: head,
            lag_records: head - cursor,
            lag_seconds: s
                .behind_since_ms
                .map(|t| (now - t).max(0) as f64 / 1000.0)
                .unwrap_or(0.0),
            retries: s.retries,
            last_error: s.last_error,
        });
    }
    let feed_head = mailbox_state::replication::feed_head(view)?;
    let feed_floor = mailbox_state::replication::feed_floor(view)?;
    Ok(ReplicationStatusResponse {
        dc: dc.to_string(),
        remotes: out,
        pending_messages: pending.len() as u64,
        pending_bytes: pending.iter().map(|m| m.size).sum(),
        oldest_pending_seconds: oldest
            .map(|t| (now - t).max(0) as f64 / 1000.0)
            .unwrap_or(0.0),
        fetch_retries: fetch.retries,
        corrupt_copies: fetch.corrupt,
        feed_head,
        tombstones: mailbox_state::replication::tombstone_count(view, 1_000_000)? as u64,
        feed_floor,
        feed_records: feed_head.saturating_sub(feed_floor),
    })
}
