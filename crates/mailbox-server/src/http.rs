//! The node's HTTP endpoint (`http-listen`): `GET /metrics` in the
//! Prometheus text format and `GET /healthz` for load balancers and
//! orchestrators.
//!
//! axum routes, served with hyper's HTTP/1 connection builder directly:
//! both are already compiled for tonic, whereas axum's own `serve` would
//! need features that rebuild tonic. Like the gRPC server it takes a bound
//! listener and stops when the node's stop signal turns true.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::{MetricsSource, CONTENT_TYPE, COUNTERS};

/// The routes, over the node's state.
pub fn router(source: MetricsSource) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(source)
}

async fn metrics(State(source): State<MetricsSource>) -> Response {
    // Rendering reads the missing-payload index from RocksDB; keep that
    // off the async workers, which also carry Raft and the gRPC API.
    let rendered = tokio::task::spawn_blocking(move || source.render(&COUNTERS)).await;
    match rendered {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read node state: {e}\n"),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics task failed: {e}\n"),
        )
            .into_response(),
    }
}

/// 200 while this node knows a leader of its DC log (it can take writes,
/// forwarding them), 503 otherwise; a one-line JSON body says why.
async fn healthz(State(source): State<MetricsSource>) -> Response {
    let r = source.raft.report();
    let leader = r
        .leader
        .map(|l| l.to_string())
        .unwrap_or_else(|| "null".into());
    let body = format!(
        "{{\"dc\":{:?},\"node\":{},\"state\":{:?},\"term\":{},\"leader\":{leader}}}\n",
        source.dc, r.id, r.state, r.term
    );
    let code = if r.leader.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Serves `app` on `listener` until `stop` turns true, then lets requests
/// in progress finish (idle keep-alive connections close at once).
pub async fn run(listener: TcpListener, app: Router, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => (s, peer),
                Err(e) => {
                    // Out of file descriptors and the like: pause instead
                    // of spinning on the same error.
                    tracing::warn!("http accept: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = stopped(&mut stop) => break,
                    }
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = stream;
        // Handlers that log users in slow failures per client address.
        let svc = TowerToHyperService::new(
            app.clone()
                .layer(axum::Extension(mailbox_events::http::Peer(peer))),
        );
        let mut stop = stop.clone();
        conns.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            // A client that never finishes its request headers does not
            // hold a connection forever.
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let res = tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = res {
                tracing::debug!("http connection: {e}");
            }
        });
        // Reap finished connections so the set does not grow with uptime.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    // Scrapes are short; do not let a stuck client delay the node's stop.
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
    }
}

/// Resolves once the node's stop flag is true (or its sender is gone). The
/// flag's read guard is dropped here, never held across an await.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
