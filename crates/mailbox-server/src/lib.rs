//! Assembly of a `mailboxd` node: storage, Raft, segment store, services.
//!
//! [`serve`] takes an already bound listener and a shutdown future, so tests
//! bind port 0 and the binary binds its configured address. One gRPC server
//! carries both the public API and the node-to-node Raft service.
//! [`serve_with`] also takes the listener of the HTTP endpoint (`/metrics`,
//! `/healthz`; see [`http`]).

pub mod accounts;
pub mod config;
pub mod error;
pub mod gc;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod service;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use mailbox_proto::raft::raft_internal_server::RaftInternalServer;
use mailbox_proto::replication::replication_server::ReplicationServer;
use mailbox_proto::v1::mailbox_server::MailboxServer;
use mailbox_proto::{CONNECTION_WINDOW, MAX_MESSAGE_SIZE, STREAM_WINDOW};
use mailbox_raft::network::InternalService;
use mailbox_raft::{BasicNode, RaftNode};
use mailbox_replication::{FeedService, RemoteDc, Replicator, RetryTable, StatusHandle};
use mailbox_segments::{FsSegmentStore, SegmentStore};
use mailbox_state::Command;
use mailbox_storage::Store;
use tokio::net::TcpListener;

pub use config::NodeConfig;
pub use error::{ConfigError, ServiceError};

use crate::ingest::{AckRules, IngestContext};
use crate::service::MailboxService;

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Local storage could not be opened or written.
    #[error("storage: {0}")]
    Storage(#[from] mailbox_storage::StoreError),
    /// Raft could not start.
    #[error("raft: {0}")]
    Raft(#[from] mailbox_raft::RaftError),
    /// The segment store could not be opened.
    #[error("segment store: {0}")]
    Segments(#[from] mailbox_segments::SegmentError),
    /// A directory could not be created.
    #[error("cannot create {path}: {reason}")]
    Dir {
        /// The directory.
        path: String,
        /// OS error.
        reason: String,
    },
    /// Logins could not be set up.
    #[error("authenticator: {0}")]
    Auth(#[from] mailbox_auth::AuthError),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A configured address could not be bound.
    #[error("cannot listen on {field} {addr}: {reason}")]
    Bind {
        /// Kebab-case config field.
        field: &'static str,
        /// The address.
        addr: String,
        /// OS error.
        reason: String,
    },
    /// This node's Raft stopped on its own: its log or state storage
    /// failed (see the log line before). The node exits rather than go on
    /// serving reads and feeds from a state that no longer advances.
    #[error("raft stopped: {reason}; the node exits so that it is restarted and replays its log")]
    RaftStopped {
        /// openraft's fatal error.
        reason: String,
    },
}

/// Runs a node until `shutdown` resolves, then stops Raft cleanly. Binds
/// `http-listen` itself when it is configured; [`serve_with`] takes that
/// listener pre-bound instead.
pub async fn serve(
    cfg: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let http = match &cfg.http_listen {
        Some(addr) => Some(bind_http(addr).await?),
        None => None,
    };
    serve_with(cfg, listener, http, shutdown).await
}

/// Accepted gRPC connections, each with `TCP_NODELAY`.
///
/// Not `TcpListenerStream`: tonic's `Server::tcp_nodelay` applies only to
/// listeners it binds itself, so accepted sockets kept Nagle's algorithm
/// and every small reply (an upload's answer, a forwarded proposal's, an
/// AppendEntries acknowledgement) could wait for the peer's delayed ACK.
/// Not tonic's `TcpIncoming` either: it ends the stream on EMFILE and
/// the like, which stops the whole server with success. An accept error
/// here is logged and retried after a pause; the node keeps serving the
/// connections it has.
fn grpc_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    return Some((Ok(s), listener));
                }
                Err(e) => {
                    tracing::warn!("grpc accept: {e}; retrying in 100 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Binds the address of the `http-listen` setting.
pub async fn bind_http(addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr).await.map_err(|e| NodeError::Bind {
        field: "http-listen",
        addr: addr.to_string(),
        reason: e.to_string(),
    })
}

/// Runs a node until `shutdown` resolves: the gRPC server on `listener`, and
/// when `http_listener` is given, `/metrics` and `/healthz` on it (whatever
/// `http-listen` says; the caller bound it).
pub async fn serve_with(
    cfg: NodeConfig,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    cfg.validate()?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| NodeError::Dir {
        path: cfg.data_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let store = Store::open(&cfg.data_dir.join("db"))?;
    let retry = RetryTable::new(store.clone());
    let raft = RaftNode::start(
        cfg.node_id,
        &cfg.dc,
        store,
        &cfg.data_dir,
        &cfg.raft.tuning(),
    )
    .await?;
    let segments: Arc<dyn SegmentStore> = Arc::new(FsSegmentStore::open(&cfg.segment_dir).await?);
    let repl_status = StatusHandle::default();
    let ctx = IngestContext {
        replication: repl_status.clone(),
        raft: raft.clone(),
        segments: segments.clone(),
        dc: cfg.dc.clone(),
        inline_threshold: cfg.inline_threshold.0,
        segment_size: cfg.segment_size.0,
        ack: AckRules::from_config(&cfg.cluster, cfg.cluster_dcs().len()).map_err(|e| {
            ConfigError::Invalid {
                field: "cluster.ack-rules",
                reason: e.to_string(),
            }
        })?,
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = std::sync::Arc::new(stop_tx);
    let remotes: Vec<RemoteDc> = cfg
        .cluster
        .remotes
        .iter()
        .map(|r| RemoteDc {
            name: r.name.clone(),
            endpoints: r.endpoints.clone(),
        })
        .collect();
    let replicator = Replicator::new(
        raft.clone(),
        cfg.dc.clone(),
        remotes.clone(),
        segments.clone(),
        retry,
        repl_status.clone(),
    );
    replicator.spawn(stop_rx.clone());
    let http_task = match http_listener {
        Some(l) => {
            tracing::info!(
                addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
                "serving /metrics, /healthz and /api/v1/events over HTTP"
            );
            let app = http::router(metrics::MetricsSource {
                raft: raft.clone(),
                dc: cfg.dc.clone(),
                remotes: remotes.clone(),
                status: repl_status.clone(),
            })
            .merge(mailbox_events::http::router(
                mailbox_events::EventsService::new(raft.clone()),
                Arc::new(mailbox_auth::Authenticator::new(Default::default())?),
            ));
            Some(tokio::spawn(http::run(l, app, stop_rx.clone())))
        }
        None => None,
    };
    tokio::spawn(publish_cluster_dcs(
        raft.clone(),
        cfg.cluster_dcs(),
        stop_rx.clone(),
    ));
    tokio::spawn(gc::run(
        raft.clone(),
        segments.clone(),
        gc::GcConfig {
            grace: cfg.orphan_grace.0,
            interval: cfg.gc_interval.0,
            retention: cfg.idempotency_retention.0,
        },
        stop_rx.clone(),
    ));

    // The lowest id forms the group on first start; the others wait to be
    // contacted. Restarted nodes find their log initialized and skip this.
    let lowest = cfg.members.iter().map(|m| m.id).min();
    if lowest == Some(cfg.node_id) {
        let members: BTreeMap<_, _> = cfg
            .members
            .iter()
            .map(|m| (m.id, BasicNode::new(&m.addr)))
            .collect();
        let r = raft.clone();
        tokio::spawn(async move {
            if let Err(e) = r.initialize(members).await {
                tracing::error!("cannot initialize the DC log: {e}");
            }
        });
    }

    tracing::info!(
        node = cfg.node_id,
        dc = %cfg.dc,
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "mailboxd serving"
    );
    let feed = ReplicationServer::new(FeedService::new(
        raft.clone(),
        cfg.dc.clone(),
        segments.clone(),
        repl_status.early.clone(),
        stop_rx.clone(),
    ))
    .max_encoding_message_size(MAX_MESSAGE_SIZE)
    // Requests to this service are feed opens (bytes) and early payloads
    // (at most one small message's segments): a burst of them cannot
    // make the node decode gigabytes.
    .max_decoding_message_size(mailbox_replication::early::EARLY_REQUEST_MAX);
    let api = MailboxServer::new(MailboxService::new(ctx, remotes, repl_status))
        // Client requests are at most a `PutOne` (4 MiB and its header) or
        // an upload chunk of that size: larger ones are refused before
        // they are decoded, so concurrent requests cannot take gigabytes.
        .max_decoding_message_size(crate::service::MAX_API_REQUEST)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let events = mailbox_proto::v1::events_server::EventsServer::new(
        mailbox_events::EventsService::new(raft.clone()),
    );
    let accounts = mailbox_proto::v1::accounts_server::AccountsServer::new(
        crate::accounts::AccountsService::new(raft.clone()),
    );
    tokio::spawn(mailbox_events::expire_leases(
        raft.clone(),
        cfg.event_retention.0,
        stop_rx.clone(),
    ));
    tokio::spawn(mailbox_events::webhook::run(raft.clone(), stop_rx.clone()));
    tokio::spawn(mailbox_events::notify::run(raft.clone(), stop_rx.clone()));
    let internal = RaftInternalServer::new(InternalService::new(raft.clone()))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    // Background tasks and open feed streams stop as soon as shutdown is
    // requested, so the graceful stop does not wait on other DCs' pulls.
    //
    // A Raft that stops on its own (a storage failure in the log or while
    // applying) stops the node too: a node whose state no longer advances
    // would otherwise go on answering reads and serving its frozen feed to
    // the other DCs as if caught up.
    let stopper = stop_tx.clone();
    let died: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let (watched, died_in) = (raft.clone(), died.clone());
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            reason = watched.stopped() => {
                tracing::error!(
                    %reason,
                    "raft stopped on its own (storage failure); the node shuts down and exits with an error"
                );
                *died_in.lock().expect("lock") = Some(reason);
            }
        }
        let _ = stopper.send(true);
    };
    let incoming = grpc_incoming(listener);
    let result = tonic::transport::Server::builder()
        // HTTP/2's default 64 KiB windows turn a bulk upload into thousands
        // of window-update round trips; let a stream have 8 MiB in flight.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .concurrency_limit_per_connection(256)
        .add_service(api)
        .add_service(events)
        .add_service(accounts)
        .add_service(internal)
        .add_service(feed)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = stop_tx.send(true);
    if let Some(t) = http_task {
        // Bounded: the HTTP server gives its connections 5 s at most.
        let _ = t.await;
    }
    raft.shutdown().await;
    if let Some(reason) = died.lock().expect("lock").take() {
        return Err(NodeError::RaftStopped { reason });
    }
    tracing::info!(node = cfg.node_id, "mailboxd stopped");
    result.map_err(NodeError::from)
}

/// Keeps the DC log's list of cluster DCs equal to the configuration: the
/// leader proposes it whenever it differs (completion means "held by all").
async fn publish_cluster_dcs(
    raft: RaftNode,
    dcs: Vec<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut metrics = raft.raft().metrics();
    // Checked when this node's leadership (or term) changes, and every 5 s
    // (a retry after a failed proposal): not on every metrics change, which
    // under load comes thousands of times a second.
    let mut seen = None;
    let mut next_check = tokio::time::Instant::now();
    let mut retry = std::time::Duration::from_millis(200);
    loop {
        if *stop.borrow() {
            return;
        }
        let now = {
            let m = metrics.borrow_and_update();
            (m.current_leader, m.current_term)
        };
        if seen == Some(now) && tokio::time::Instant::now() < next_check {
            tokio::select! {
                r = metrics.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(next_check) => {}
                r = stop.changed() => if r.is_err() { return },
            }
            continue;
        }
        seen = Some(now);
        next_check = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        // Uploads wait for the cluster DCs to be recorded: a failed
        // proposal is retried soon, backing off to the 5 s check.
        let mut failed = false;
        if raft.is_leader() {
            let current = mailbox_state::replication::configured_dcs(raft.view())
                .ok()
                .flatten();
            // Once per DC log, ever: the feed's identity, so other DCs can
            // tell a rebuilt DC's fresh feed from the one their cursors
            // were counting (the state machine keeps the first one).
            if matches!(mailbox_state::feed_identity(raft.view()), Ok(None)) {
                let identity = uuid::Uuid::now_v7().to_string();
                match raft.propose(Command::InitFeedIdentity { identity }).await {
                    Ok(_) => tracing::info!("feed identity recorded in the DC log"),
                    Err(e) => {
                        tracing::warn!("cannot record the feed identity: {e}");
                        failed = true;
                    }
                }
            }
            if current.as_ref() != Some(&dcs) {
                match raft
                    .propose(Command::SetClusterDcs { dcs: dcs.clone() })
                    .await
                {
                    Ok(_) => tracing::info!(?dcs, "cluster DCs recorded in the DC log"),
                    Err(e) => {
                        tracing::warn!("cannot record cluster DCs: {e}");
                        failed = true;
                    }
                }
            }
        }
        if failed {
            next_check = tokio::time::Instant::now() + retry;
            retry = (retry * 2).min(std::time::Duration::from_secs(5));
        } else {
            retry = std::time::Duration::from_millis(200);
        }
    }
}
