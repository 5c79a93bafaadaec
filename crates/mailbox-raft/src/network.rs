//! Node-to-node transport inside one DC: openraft RPCs over tonic.
//!
//! Each RPC carries openraft's own serde types, bincode-encoded, in a
//! `RaftBytes` message. Replies carry `Result<Reply, RaftError>` so a remote
//! refusal (higher vote, ...) reaches openraft as a remote error, while a
//! transport failure becomes `Unreachable`, which openraft retries with
//! backoff.

use std::time::Duration;

use mailbox_proto::raft::raft_internal_client::RaftInternalClient;
use mailbox_proto::raft::raft_internal_server::RaftInternal;
use mailbox_proto::raft::RaftBytes;
use mailbox_proto::MAX_MESSAGE_SIZE;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::node::{ForwardReply, NodeReport, RaftNode};
use crate::{decode, encode, BasicNode, NodeId, TypeConfig};

/// Builds a lazily-connecting gRPC channel to a node address (`host:port`).
pub fn channel(addr: &str, timeout: Option<Duration>) -> Result<Channel, tonic::transport::Error> {
    let mut ep = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(mailbox_proto::STREAM_WINDOW)
        .initial_connection_window_size(mailbox_proto::CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    if let Some(t) = timeout {
        ep = ep.timeout(t);
    }
    Ok(ep.connect_lazy())
}

/// Internal client with our message size limits.
pub fn internal_client(ch: Channel) -> RaftInternalClient<Channel> {
    RaftInternalClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// Creates connections to the other nodes of the DC.
#[derive(Debug, Clone, Default)]
pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let client = channel(&node.addr, None)
            .map(internal_client)
            .map_err(|e| e.to_string());
        Connection { target, client }
    }
}

/// Entry bytes sent per AppendEntries at most (a single larger entry goes
/// alone): small enough to cross a 100 ms heartbeat interval on a loaded
/// LAN, far below the gRPC message limit.
pub const APPEND_MAX_BYTES: usize = 2 << 20;

/// How many of `entries` fit in one AppendEntries (at least one).
fn append_prefix(entries: &[openraft::Entry<TypeConfig>]) -> usize {
    let mut total = 0;
    for (i, e) in entries.iter().enumerate() {
        total += match &e.payload {
            openraft::EntryPayload::Normal(cmd) => crate::node::approx_bytes(cmd),
            _ => 256,
        };
        if total > APPEND_MAX_BYTES && i > 0 {
            return i;
        }
    }
    entries.len()
}

/// A connection to one peer.
pub struct Connection {
    target: NodeId,
    client: Result<RaftInternalClient<Channel>, String>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        which: &'static str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: serde::Serialize,
        Resp: for<'de> serde::Deserialize<'de>,
        E: std::error::Error + for<'de> serde::Deserialize<'de>,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => {
                return Err(RPCError::Unreachable(Unreachable::new(
                    &std::io::Error::other(e.clone()),
                )))
            }
        };
        let mut request = Request::new(RaftBytes {
            data: encode(req).into(),
        });
        // openraft bounds every call by this same deadline itself (and
        // treats its own timeout unlike `Unreachable`, which would put the
        // stream into backoff): the header only lets the server give up.
        request.set_timeout(option.hard_ttl());
        let resp = match which {
            "append" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let bytes = match resp {
            Ok(r) => r.into_inner().data,
            Err(status) => {
                return Err(match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled => RPCError::Unreachable(Unreachable::new(&status)),
                    _ => RPCError::Network(NetworkError::new(&status)),
                })
            }
        };
        let reply: Result<Resp, RaftError<NodeId, E>> =
            decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        reply.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    /// Sends at most [`APPEND_MAX_BYTES`] of entries (at least one) and
    /// reports a prefix as `PartialSuccess`; openraft sends the rest next.
    /// openraft gives every AppendEntries one heartbeat interval: a batch
    /// of large inline entries that cannot cross in it times out again and
    /// again, and the follower never catches up (seen: 1,457 entries of
    /// 60 KiB payloads, a follower stuck at index 3 for minutes).
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let keep = append_prefix(&rpc.entries);
        if keep == rpc.entries.len() {
            return self.call("append", &rpc, &option).await;
        }
        rpc.entries.truncate(keep);
        let last = rpc.entries.last().map(|e| e.log_id);
        Ok(match self.call("append", &rpc, &option).await? {
            AppendEntriesResponse::Success => AppendEntriesResponse::PartialSuccess(last),
            other => other,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call("vote", &rpc, &option).await
    }
}

/// Server side of the node-to-node service.
#[derive(Clone)]
pub struct InternalService {
    node: RaftNode,
}

impl InternalService {
    /// Serves `node`'s Raft.
    pub fn new(node: RaftNode) -> Self {
        Self { node }
    }
}

fn bad_request(e: crate::RaftError) -> Status {
    Status::invalid_argument(e.to_string())
}

#[tonic::async_trait]
impl RaftInternal for InternalService {
    async fn append_entries(&self, req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> =
            decode(&req.into_inner().data).map_err(bad_request)?;
        let res = self.node.raft().append_entries(rpc).await;
        Ok(Response::new(RaftBytes {
            data: encode(&res).into(),
        }))
    }

    async fn vote(&self, req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let rpc: VoteRequest<NodeId> = decode(&req.into_inner().data).map_err(bad_request)?;
        let res = self.node.raft().vote(rpc).await;
        Ok(Response::new(RaftBytes {
            data: encode(&res).into(),
        }))
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftBytes>,
    ) -> Result<Response<RaftBytes>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> =
            decode(&req.into_inner().data).map_err(bad_request)?;
        let res = self.node.raft().install_snapshot(rpc).await;
        Ok(Response::new(RaftBytes {
            data: encode(&res).into(),
        }))
    }

    async fn forward(&self, req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let cmd = decode(&req.into_inner().data).map_err(bad_request)?;
        let reply: ForwardReply = match cmd {
            // A follower's batched forwards: each proposed on its own (a
            // batch inside a batch entry is not a command), all queued
            // before any is awaited, so they share log entries.
            mailbox_state::Command::Batch(cmds) => {
                let mut pending = Vec::with_capacity(cmds.len());
                for c in cmds {
                    pending.push(self.node.enqueue_local(c).await);
                }
                let mut replies = Vec::with_capacity(pending.len());
                for rx in pending {
                    replies.push(
                        rx.await
                            .unwrap_or_else(|_| ForwardReply::Fatal("raft stopped".into())),
                    );
                }
                ForwardReply::Many(replies)
            }
            cmd => self.node.propose_local(cmd).await,
        };
        Ok(Response::new(RaftBytes {
            data: encode(&reply).into(),
        }))
    }

    async fn status(&self, _req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let report: NodeReport = self.node.report();
        Ok(Response::new(RaftBytes {
            data: encode(&report).into(),
        }))
    }
}
