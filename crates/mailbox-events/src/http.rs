//! Events over plain HTTP, for scripts (on the node's `http-listen`):
//!
//! - `GET /api/v1/events/{queue}/next?consumer=NAME&max=1&wait=30s&lease=30s`
//!   leases up to `max` due events, waiting up to `wait` (a long poll, at
//!   most 60 s) for one; answers a JSON array (empty when none came).
//! - `POST /api/v1/events/{id}/ack?attempt=N&outcome=complete|retry|fail|progress&reason=TEXT&delay=10s`
//!   answers delivery `N` (required: the number the event came with);
//!   answers the event.
//! - `GET /api/v1/events/{id}`: one event with every attempt.
//!
//! Errors answer `{"error": code, "message": text}` with the HTTP status
//! of [`EventsError::http_status`]; a lease that ran out is 409.
//!
//! Every request logs in (`Authorization: Basic` with a user's password,
//! or `Bearer mbx_…` with a token; 401 otherwise) and needs the right to
//! the events' files: an admin, or a user who may `download` from every
//! mailbox whose events go into the queue (for a rule over a subtree,
//! by grants that cover sub-mailboxes, also every grant below it).
//! Showing an event needs `download` on its file's mailbox (otherwise it
//! is not found), answering it that and the right to consume its queue.
//! The check reads the rules in force: events a rule raised before it
//! was deleted or pointed elsewhere stay in its queue, for whoever may
//! consume that now (name queues per partner).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use mailbox_auth::{Authenticator, Credential, Principal};
use mailbox_types::account::Perms;
use mailbox_types::{Event, EventId, HumanDuration};

use crate::{EventsError, EventsService};

/// The state of the routes.
#[derive(Clone)]
pub struct HttpState {
    svc: EventsService,
    auth: Arc<Authenticator>,
}

/// The client's address, put in each request's extensions by the server
/// (failed logins are slowed per address).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The routes, over this node's events service, logging in with `auth`.
pub fn router(svc: EventsService, auth: Arc<Authenticator>) -> Router {
    Router::new()
        .route("/api/v1/events/:queue/next", get(next))
        .route("/api/v1/events/:id/ack", post(ack))
        .route("/api/v1/events/:id", get(show))
        .with_state(HttpState { svc, auth })
}

fn unauthorized() -> Response {
    let mut r = json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"error": "unauthenticated", "message": "log in: Basic (user and password) or Bearer (a token)"}),
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"mailbox\""),
    );
    r
}

/// Logs the request in, or answers 401.
async fn login(
    st: &HttpState,
    headers: &HeaderMap,
    peer: Option<Peer>,
) -> Result<Principal, Response> {
    use base64::Engine as _;
    let from = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.0.ip());
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let r = if let Some(b64) = value.strip_prefix("Basic ") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(unauthorized)?;
        let (user, password) = decoded.split_once(':').ok_or_else(unauthorized)?;
        let account =
            mailbox_auth::lookup(st.svc.view(), user).map_err(|e| error(auth_error(e)))?;
        st.auth
            .login(account, user, Credential::Password(password), from, "http")
            .await
    } else if let Some(token) = value.strip_prefix("Bearer ") {
        let found = mailbox_auth::lookup_token(st.svc.view(), token.trim())
            .map_err(|e| error(auth_error(e)))?;
        st.auth.token(found, from, mailbox_types::now_ms()).await
    } else {
        return Err(unauthorized());
    };
    r.map_err(|e| match e {
        mailbox_auth::AuthError::Failed => unauthorized(),
        e => error(auth_error(e)),
    })
}

fn auth_error(e: mailbox_auth::AuthError) -> EventsError {
    match e {
        mailbox_auth::AuthError::Denied { .. } => EventsError::PermissionDenied {
            reason: e.to_string(),
        },
        e => EventsError::Internal {
            reason: e.to_string(),
        },
    }
}

fn denied(what: String) -> EventsError {
    EventsError::PermissionDenied {
        reason: format!("permission denied: {what}"),
    }
}

/// Whether `p` may consume `queue` (see the module docs).
fn may_consume(svc: &EventsService, p: &Principal, queue: &str) -> Result<(), EventsError> {
    if p.is_admin() {
        return Ok(());
    }
    let rules: Vec<_> = mailbox_state::events::list_rules(svc.view())?
        .into_iter()
        .map(|(r, _)| r)
        .filter(|r| r.queue == queue)
        .collect();
    if rules.is_empty() {
        return Err(denied(format!(
            "queue {queue} has no rule whose files {} may download",
            p.user.name
        )));
    }
    for r in &rules {
        let mut ok = p.perms(&r.mailbox).allows(Perms::DOWNLOAD);
        if r.subtree && !p.is_admin() {
            // Every mailbox below must allow it too: the nearest grant of
            // each is the rule's mailbox's or one below it, and each of
            // those must allow downloads and cover what is below it.
            let below = format!("{}/", r.mailbox.as_str());
            let mine: Vec<_> = p
                .grants
                .iter()
                .filter(|g| g.user == p.user.name && g.incarnation == p.user.incarnation)
                .collect();
            let nearest_above = mine
                .iter()
                .filter(|g| {
                    g.mailbox == r.mailbox
                        || r.mailbox.as_str().starts_with(&format!("{}/", g.mailbox))
                })
                .max_by_key(|g| g.mailbox.as_str().len());
            ok &= nearest_above.is_some_and(|g| g.subtree);
            ok &= mine
                .iter()
                .filter(|g| g.mailbox.as_str().starts_with(&below))
                .all(|g| g.subtree && g.perms.allows(Perms::DOWNLOAD));
        }
        if !ok {
            return Err(denied(format!(
                "{} may not download every file rule {} sends to queue {queue}",
                p.user.name, r.name
            )));
        }
    }
    Ok(())
}

/// Whether `p` may see and answer `ev`: an event whose file the user may
/// not download is, to them, one that does not exist (no probing of
/// which rules fired, or of paths outside their root).
fn may_handle(p: &Principal, ev: &Event) -> Result<(), EventsError> {
    if p.perms(&ev.message.mailbox).allows(Perms::DOWNLOAD) {
        Ok(())
    } else {
        Err(EventsError::NotFound {
            what: format!("event {}", ev.id),
        })
    }
}

/// An event as JSON (the same fields as `mailbox events ... --json`).
pub fn event_json(e: &Event) -> serde_json::Value {
    let m = &e.message;
    serde_json::json!({
        "id": e.id.to_string(), "rule": e.rule, "queue": e.queue, "status": e.status.as_str(),
        "attempt": e.deliveries, "failures": e.failures, "max_attempts": e.retry.max_attempts,
        "message": {
            "id": m.id.to_string(), "mailbox": m.mailbox.to_string(), "name": m.name,
            "size": m.size, "sha256": m.sha256.to_hex(), "created_ms": m.created_ms,
            "origin_dc": m.origin_dc, "attributes": m.attributes,
        },
        "complete_ms": e.complete_ms, "raised_ms": e.raised_ms, "due_ms": e.due_ms,
        "without": e.without, "blocked": e.blocked,
        "lease_consumer": e.lease.as_ref().map(|l| l.consumer.clone()),
        "attempts": e.attempts.iter().map(|a| serde_json::json!({
            "number": a.number, "leased_ms": a.leased_ms, "consumer": a.consumer,
            "outcome": a.outcome.map(|o| o.as_str()), "ended_ms": a.ended_ms, "error": a.error,
        })).collect::<Vec<_>>(),
    })
}

fn json(code: StatusCode, v: serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{v}\n"),
    )
        .into_response()
}

fn error(e: EventsError) -> Response {
    let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(
        code,
        serde_json::json!({"error": e.code(), "message": e.to_string()}),
    )
}

/// `%XX` and `+` decoding of one query component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() && s.is_char_boundary(i + 3) => {
                match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn duration(q: &HashMap<String, String>, k: &str) -> Result<Option<Duration>, EventsError> {
    q.get(k)
        .filter(|v| !v.is_empty())
        .map(|v| v.parse::<HumanDuration>().map(|d| d.get()))
        .transpose()
        .map_err(EventsError::from)
}

async fn next(
    State(st): State<HttpState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(queue): Path<String>,
    uri: Uri,
) -> Response {
    let p = match login(&st, &headers, peer.map(|e| e.0)).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let svc = &st.svc;
    let q = query(&uri);
    let run = async {
        mailbox_types::event::validate_event_name("queue name", &queue)?;
        may_consume(svc, &p, &queue)?;
        let max = match q.get("max") {
            Some(m) => m
                .parse::<u32>()
                .map_err(|_| EventsError::invalid(format!("max {m:?} is not a number")))?,
            None => 1,
        };
        let wait = duration(&q, "wait")?.unwrap_or(Duration::ZERO);
        let lease = duration(&q, "lease")?.map(|d| d.as_millis() as u64);
        let consumer = q.get("consumer").cloned().unwrap_or_else(|| "http".into());
        svc.lease_wait(&queue, &consumer, max, lease, wait).await
    };
    match run.await {
        Ok(events) => json(
            StatusCode::OK,
            serde_json::Value::Array(events.iter().map(event_json).collect()),
        ),
        Err(e) => error(e),
    }
}

async fn ack(
    State(st): State<HttpState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    uri: Uri,
) -> Response {
    let p = match login(&st, &headers, peer.map(|e| e.0)).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let svc = &st.svc;
    let q = query(&uri);
    let run = async {
        let id: EventId = id.parse()?;
        let ev = svc.event(&id)?;
        may_handle(&p, &ev)?;
        may_consume(svc, &p, &ev.queue)?;
        // Required: the delivery number is the lease's token, so a worker
        // whose lease ran out cannot answer for the next one.
        let attempt = match q.get("attempt") {
            Some(a) => a
                .parse::<u32>()
                .map_err(|_| EventsError::invalid(format!("attempt {a:?} is not a number")))?,
            None => {
                return Err(EventsError::invalid(
                    "attempt= is required: the delivery number the event came with",
                ))
            }
        };
        let outcome = q.get("outcome").cloned().ok_or_else(|| {
            EventsError::invalid("outcome= is required: complete, retry, fail or progress")
        })?;
        let delay = duration(&q, "delay")?.map(|d| d.as_millis() as u64);
        let consumer = q.get("consumer").cloned().unwrap_or_else(|| "http".into());
        let reason = q.get("reason").cloned().unwrap_or_default();
        svc.answer(id, attempt, &consumer, &outcome, reason, delay)
            .await
    };
    match run.await {
        Ok(e) => json(StatusCode::OK, event_json(&e)),
        Err(e) => error(e),
    }
}

async fn show(
    State(st): State<HttpState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let p = match login(&st, &headers, peer.map(|e| e.0)).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let r = id
        .parse::<EventId>()
        .map_err(EventsError::from)
        .and_then(|id| st.svc.event(&id))
        .and_then(|e| may_handle(&p, &e).map(|()| e));
    match r {
        Ok(e) => json(StatusCode::OK, event_json(&e)),
        Err(e) => error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn query_components_are_decoded() {
        assert_eq!(decode("bad+envelope%21"), "bad envelope!");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%C3%A9"), "é");
    }
}
