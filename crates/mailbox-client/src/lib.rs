//! Client library for a mailbox data center, used by the `mailbox` CLI, the
//! load generator and the integration tests.
//!
//! A [`Client`] talks to one node of a DC; any node accepts writes (followers
//! forward to the leader), so the client only needs a reachable endpoint.
//! Uploads and downloads stream: memory use does not grow with file size.

pub mod config;

use std::collections::BTreeMap;
use std::time::Duration;

use mailbox_proto::v1::events_client::EventsClient;
use mailbox_proto::v1::mailbox_client::MailboxClient;
use mailbox_proto::v1::{
    put_request, ClusterStatusRequest, ClusterStatusResponse, CreateMailboxRequest,
    CreateMailboxResponse, DeleteRequest, GetRequest, ListMailboxesRequest, ListRequest,
    ListResponse, MailboxInfo, MessageInfo, PutHeader, PutOneRequest, PutRequest, PutResponse,
    PutTrailer, ReplicationStatusRequest, ReplicationStatusResponse, SetAttributesRequest,
    StatRequest,
};
use mailbox_proto::MAX_MESSAGE_SIZE;
use mailbox_types::Digest;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

pub use config::ClientConfig;

/// Size of upload chunks.
pub const UPLOAD_CHUNK: usize = 1 << 20;

/// Errors from the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No endpoint could be reached.
    #[error("cannot connect to any of {endpoints:?}: {reason}")]
    Connect {
        /// Endpoints tried.
        endpoints: Vec<String>,
        /// Last failure.
        reason: String,
    },
    /// The server refused the request.
    #[error("{code:?}: {message}")]
    Status {
        /// gRPC code.
        code: tonic::Code,
        /// Server's message.
        message: String,
        /// Stable error code from `x-mailbox-error`, if sent.
        error_code: Option<String>,
    },
    /// Local I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Downloaded bytes do not match the stored SHA-256.
    #[error("downloaded data is corrupt: expected sha256 {expected}, got {actual}")]
    Corrupt {
        /// Digest the server reported.
        expected: String,
        /// Digest of what arrived.
        actual: String,
    },
    /// The server's answer was not what the protocol promises.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Client configuration problem.
    #[error("client config: {0}")]
    Config(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Status {
            code: s.code(),
            message: s.message().to_string(),
            error_code: s
                .metadata()
                .get("x-mailbox-error")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        }
    }
}

impl ClientError {
    /// The gRPC code, when the server answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What to upload.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// Target mailbox.
    pub mailbox: String,
    /// Message name.
    pub name: String,
    /// Expected SHA-256 (hex); the server refuses a mismatch with DATA_LOSS.
    pub sha256: Option<String>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// User attributes.
    pub attributes: BTreeMap<String, String>,
    /// Acknowledgement override: "delayed" or "immediate".
    pub ack: Option<String>,
}

/// Result of a download.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// The message's metadata.
    pub message: MessageInfo,
    /// Bytes received.
    pub bytes: u64,
    /// SHA-256 of the bytes received.
    pub sha256: Digest,
}

/// A connection to one DC.
#[derive(Clone)]
pub struct Client {
    inner: MailboxClient<Channel>,
    channel: Channel,
    endpoint: String,
}

/// Opens a channel to one endpoint (`host:port` or a URI).
async fn open(ep: &str, timeout: Duration) -> Result<(MailboxClient<Channel>, Channel), String> {
    let uri = if ep.contains("://") {
        ep.to_string()
    } else {
        format!("http://{ep}")
    };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| format!("{ep}: {e}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(mailbox_proto::STREAM_WINDOW)
        .initial_connection_window_size(mailbox_proto::CONNECTION_WINDOW);
    let ch = endpoint.connect().await.map_err(|e| format!("{ep}: {e}"))?;
    Ok((
        MailboxClient::new(ch.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE),
        ch,
    ))
}

/// The first message of an upload: what the client declares.
fn header_part(opts: PutOptions) -> PutRequest {
    PutRequest {
        part: Some(put_request::Part::Header(header_of(opts))),
    }
}

/// Up to `UPLOAD_CHUNK` bytes of `reader`; fewer only at its end.
async fn read_chunk<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Vec<u8>> {
    // Read into spare capacity: no zero-filling a fresh chunk buffer for
    // every megabyte (or every small upload).
    let mut buf = Vec::with_capacity(UPLOAD_CHUNK);
    while buf.len() < UPLOAD_CHUNK {
        if reader.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf)
}

fn header_of(opts: PutOptions) -> PutHeader {
    PutHeader {
        mailbox: opts.mailbox,
        name: opts.name,
        idempotency_key: opts.idempotency_key.unwrap_or_default(),
        sha256: opts.sha256.unwrap_or_default(),
        attributes: opts.attributes.into_iter().collect(),
        ack: opts.ack.unwrap_or_default(),
    }
}

impl Client {
    /// Connects to the DC's leader, found through the first reachable
    /// endpoint. Any node accepts every request (followers forward writes),
    /// but the leader answers writes without the extra hop; when the leader
    /// is unknown or unreachable from here, the client stays on the node it
    /// reached.
    pub async fn connect(endpoints: &[String]) -> Result<Self, ClientError> {
        let first = Self::connect_any(endpoints).await?;
        let Ok(status) = first
            .inner
            .clone()
            .cluster_status(ClusterStatusRequest { local: true })
            .await
        else {
            return Ok(first);
        };
        let status = status.into_inner();
        let leader = status
            .nodes
            .iter()
            .find(|n| status.has_leader && n.node_id == status.leader_id)
            .map(|n| n.addr.clone());
        match leader {
            Some(addr) if addr != first.endpoint => {
                match open(&addr, Duration::from_secs(1)).await {
                    Ok((inner, channel)) => Ok(Client {
                        inner,
                        channel,
                        endpoint: addr,
                    }),
                    Err(_) => Ok(first),
                }
            }
            _ => Ok(first),
        }
    }

    /// Connects to the first reachable endpoint, in order, and stays there
    /// (no leader lookup): for talking to one particular node.
    pub async fn connect_any(endpoints: &[String]) -> Result<Self, ClientError> {
        let mut last = String::from("no endpoints configured");
        for ep in endpoints {
            match open(ep, Duration::from_secs(3)).await {
                Ok((inner, channel)) => {
                    return Ok(Client {
                        inner,
                        channel,
                        endpoint: ep.clone(),
                    })
                }
                Err(e) => last = e,
            }
        }
        Err(ClientError::Connect {
            endpoints: endpoints.to_vec(),
            reason: last,
        })
    }

    /// The endpoint this client is connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The events API (rules, queues, the dead-letter queue) on the same
    /// connection.
    pub fn events(&self) -> EventsClient<Channel> {
        EventsClient::new(self.channel.clone())
    }

    /// The accounts API (users, keys, tokens, grants) on the same channel.
    pub fn accounts(&self) -> mailbox_proto::v1::accounts_client::AccountsClient<Channel> {
        mailbox_proto::v1::accounts_client::AccountsClient::new(self.channel.clone())
    }

    /// Creates a mailbox.
    pub async fn mkdir(
        &self,
        path: &str,
        parents: bool,
    ) -> Result<CreateMailboxResponse, ClientError> {
        let r = self
            .inner
            .clone()
            .create_mailbox(CreateMailboxRequest {
                path: path.into(),
                parents,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Lists mailboxes under a prefix.
    pub async fn list_mailboxes(&self, prefix: &str) -> Result<Vec<MailboxInfo>, ClientError> {
        let r = self
            .inner
            .clone()
            .list_mailboxes(ListMailboxesRequest {
                prefix: prefix.into(),
            })
            .await?;
        Ok(r.into_inner().mailboxes)
    }

    /// Uploads everything `reader` yields. `progress` is called with the
    /// running byte count.
    pub async fn put<R>(
        &self,
        opts: PutOptions,
        mut reader: R,
        progress: impl Fn(u64) + Send + 'static,
    ) -> Result<PutResponse, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        // A source that ends within the first chunk goes out in one
        // `PutOne` request; a read error there stores nothing.
        let first = read_chunk(&mut reader)
            .await
            .map_err(|source| ClientError::Io {
                context: "reading upload source".into(),
                source,
            })?;
        let first = bytes::Bytes::from(first);
        if first.len() < UPLOAD_CHUNK {
            if let Some(r) = self.put_one(&opts, first.clone()).await? {
                progress(first.len() as u64);
                return Ok(r);
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<PutRequest>(4);
        let header = header_part(opts);
        // Reads the source; on a read error it stops without a trailer, which
        // the server treats as a truncated upload and stores nothing.
        let reader_task = tokio::spawn(async move {
            if tx.send(header).await.is_err() {
                return Ok(());
            }
            let mut total = first.len() as u64;
            let msg = PutRequest {
                part: Some(put_request::Part::Chunk(first)),
            };
            if tx.send(msg).await.is_err() {
                return Ok(());
            }
            progress(total);
            loop {
                let buf = read_chunk(&mut reader).await?;
                let filled = buf.len();
                if filled == 0 {
                    break;
                }
                total += filled as u64;
                let msg = PutRequest {
                    part: Some(put_request::Part::Chunk(buf.into())),
                };
                if tx.send(msg).await.is_err() {
                    return Ok(());
                }
                progress(total);
                if filled < UPLOAD_CHUNK {
                    break;
                }
            }
            let trailer = PutRequest {
                part: Some(put_request::Part::Trailer(PutTrailer { size: total })),
            };
            let _ = tx.send(trailer).await;
            Ok::<(), std::io::Error>(())
        });
        let result = self.inner.clone().put(ReceiverStream::new(rx)).await;
        let read_result = reader_task
            .await
            .map_err(|e| ClientError::Protocol(format!("reader task: {e}")))?;
        read_result.map_err(|source| ClientError::Io {
            context: "reading upload source".into(),
            source,
        })?;
        Ok(result?.into_inner())
    }

    /// Uploads `data` in one `PutOne` request (one message, no stream
    /// framing; the server's checks and acknowledgement are those of
    /// `Put`). `None` when the server predates `PutOne` (then the caller
    /// streams).
    async fn put_one(
        &self,
        opts: &PutOptions,
        data: bytes::Bytes,
    ) -> Result<Option<PutResponse>, ClientError> {
        match self
            .inner
            .clone()
            .put_one(PutOneRequest {
                header: Some(header_of(opts.clone())),
                data,
            })
            .await
        {
            Ok(r) => Ok(Some(r.into_inner())),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    /// Uploads an in-memory payload: the bytes go out as they are (moved,
    /// not copied), with no reader task; up to one chunk in a single
    /// `PutOne` request, larger ones streamed.
    pub async fn put_bytes(
        &self,
        opts: PutOptions,
        data: Vec<u8>,
    ) -> Result<PutResponse, ClientError> {
        let size = data.len() as u64;
        // Slices of one buffer: no copy per chunk.
        let data = bytes::Bytes::from(data);
        if data.len() <= UPLOAD_CHUNK {
            if let Some(r) = self.put_one(&opts, data.clone()).await? {
                return Ok(r);
            }
        }
        let mut parts = Vec::with_capacity(2 + data.len() / UPLOAD_CHUNK + 1);
        parts.push(header_part(opts));
        for start in (0..data.len()).step_by(UPLOAD_CHUNK) {
            let end = (start + UPLOAD_CHUNK).min(data.len());
            parts.push(PutRequest {
                part: Some(put_request::Part::Chunk(data.slice(start..end))),
            });
        }
        parts.push(PutRequest {
            part: Some(put_request::Part::Trailer(PutTrailer { size })),
        });
        let r = self.inner.clone().put(tokio_stream::iter(parts)).await?;
        Ok(r.into_inner())
    }

    /// Downloads a message (or a range) into `out`, computing the SHA-256 of
    /// what arrives. For a whole-message download a digest mismatch is an
    /// error.
    pub async fn get_to<W>(
        &self,
        id: &str,
        offset: u64,
        length: u64,
        out: &mut W,
        progress: impl Fn(u64, u64),
    ) -> Result<Downloaded, ClientError>
    where
        W: AsyncWrite + Unpin,
    {
        let mut stream = self
            .inner
            .clone()
            .get(GetRequest {
                id: id.into(),
                offset,
                length,
            })
            .await?
            .into_inner();
        let mut message = None;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(part) = stream.next().await {
            let part = part?;
            if let Some(m) = part.message {
                message = Some(m);
            }
            hasher.update(&part.chunk);
            bytes += part.chunk.len() as u64;
            out.write_all(&part.chunk)
                .await
                .map_err(|source| ClientError::Io {
                    context: "writing download".into(),
                    source,
                })?;
            if let Some(m) = &message {
                progress(bytes, m.size);
            }
        }
        out.flush().await.map_err(|source| ClientError::Io {
            context: "flushing download".into(),
            source,
        })?;
        let message =
            message.ok_or_else(|| ClientError::Protocol("download without metadata".into()))?;
        let sha256 = Digest::from(hasher);
        if offset == 0 && (length == 0 || length >= message.size) {
            if bytes != message.size {
                return Err(ClientError::Protocol(format!(
                    "download ended after {bytes} of {} bytes",
                    message.size
                )));
            }
            if sha256.to_hex() != message.sha256 {
                return Err(ClientError::Corrupt {
                    expected: message.sha256.clone(),
                    actual: sha256.to_hex(),
                });
            }
        }
        Ok(Downloaded {
            message,
            bytes,
            sha256,
        })
    }

    /// Downloads a whole message into memory (tests and small payloads).
    pub async fn get_bytes(&self, id: &str) -> Result<(MessageInfo, Vec<u8>), ClientError> {
        let mut out = Vec::new();
        let d = self.get_to(id, 0, 0, &mut out, |_, _| {}).await?;
        Ok((d.message, out))
    }

    /// One page of a mailbox listing.
    pub async fn list(
        &self,
        mailbox: &str,
        after: &str,
        limit: u32,
    ) -> Result<ListResponse, ClientError> {
        let r = self
            .inner
            .clone()
            .list(ListRequest {
                mailbox: mailbox.into(),
                after: after.into(),
                limit,
            })
            .await?;
        Ok(r.into_inner())
    }

    /// Every message of a mailbox, following pages.
    pub async fn list_all(&self, mailbox: &str) -> Result<Vec<MessageInfo>, ClientError> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.list(mailbox, &after, 1000).await?;
            out.extend(page.messages);
            if page.next_after.is_empty() {
                return Ok(out);
            }
            after = page.next_after;
        }
    }

    /// A message's metadata.
    pub async fn stat(&self, id: &str) -> Result<MessageInfo, ClientError> {
        self.stat_with(id, false).await
    }

    /// Metadata of a message as this DC knows it, without asking the other
    /// DCs for their copies (`copies` stays empty): one local read, for
    /// polling many messages.
    pub async fn stat_local(&self, id: &str) -> Result<MessageInfo, ClientError> {
        self.stat_with(id, true).await
    }

    async fn stat_with(&self, id: &str, local: bool) -> Result<MessageInfo, ClientError> {
        let r = self
            .inner
            .clone()
            .stat(StatRequest {
                id: id.into(),
                local,
            })
            .await?;
        r.into_inner()
            .message
            .ok_or_else(|| ClientError::Protocol("stat without message".into()))
    }

    /// Deletes a message.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.inner
            .clone()
            .delete(DeleteRequest { id: id.into() })
            .await?;
        Ok(())
    }

    /// Sets and removes attributes of a message (last writer wins across
    /// DCs); returns the message afterwards.
    pub async fn set_attributes(
        &self,
        id: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<MessageInfo, ClientError> {
        let r = self
            .inner
            .clone()
            .set_attributes(SetAttributesRequest {
                id: id.into(),
                set: set.into_iter().collect(),
                remove,
            })
            .await?;
        r.into_inner()
            .message
            .ok_or_else(|| ClientError::Protocol("set-attributes without message".into()))
    }

    /// Replication state of this DC: per remote DC and pending payloads.
    pub async fn replication_status(&self) -> Result<ReplicationStatusResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .replication_status(ReplicationStatusRequest {})
            .await?
            .into_inner())
    }

    /// Forgets this DC's cursor on remote DC `dc`'s feed (after `dc` was
    /// rebuilt from empty); returns the cursor that was forgotten.
    pub async fn reset_feed(&self, dc: &str) -> Result<u64, ClientError> {
        Ok(self
            .inner
            .clone()
            .reset_feed(mailbox_proto::v1::ResetFeedRequest { dc: dc.to_string() })
            .await?
            .into_inner()
            .old_cursor)
    }

    /// Builds a snapshot on the node this client talks to (the leader,
    /// unless connected with `connect_any`) and waits until it is written.
    pub async fn snapshot(&self) -> Result<mailbox_proto::v1::SnapshotResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .snapshot(mailbox_proto::v1::SnapshotRequest {})
            .await?
            .into_inner())
    }

    /// Members, leader, term and applied index of every node.
    pub async fn cluster_status(&self) -> Result<ClusterStatusResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .cluster_status(ClusterStatusRequest::default())
            .await?
            .into_inner())
    }
}
