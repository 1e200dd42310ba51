//! The node's HTTP API (any node answers): cluster status, the keyed store, and a watch stream of
//! committed changes (server-sent events). Every `/v1/` request needs `Authorization: Bearer
//! <token>`. Errors are JSON `{"error": "..."}` with a status a client can act on: 401 bad token,
//! 404 missing key, 409 failed condition, 410 compacted watch revision, 503 no quorum or outcome
//! unknown (retry).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cluster::agent::Agent;
use crate::cluster::gossip::PeerInfo;
use crate::cluster::raft_node::{ask, Input, RequestError};
use crate::cluster::state::{ApplyOutcome, KeyValue, Op, WatchEvent, RESERVED_PREFIX, SETTINGS_PREFIX};

/// Largest value accepted for one key.
pub const MAX_VALUE: usize = 1 << 20;

pub fn router(agent: Arc<Agent>) -> Router {
    let v1 = Router::new()
        .route("/v1/cluster/status", get(status))
        .route("/v1/kv", get(list))
        .route("/v1/kv/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/v1/watch", get(watch))
        .route("/v1/cluster/settings", get(list_settings))
        .route("/v1/cluster/settings/{name}", get(get_setting).put(put_setting).delete(delete_setting))
        .layer(axum::middleware::from_fn_with_state(agent.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_VALUE));
    Router::new().route("/health", get(|| async { "ok\n" })).merge(v1).with_state(agent)
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

fn request_error(e: RequestError) -> Response {
    let status = match e {
        RequestError::NoLeader | RequestError::Timeout | RequestError::NotMember | RequestError::Stopped => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    error(status, e)
}

async fn auth(State(agent): State<Arc<Agent>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), agent.config.api_token.as_bytes()) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Serialize)]
struct Member {
    #[serde(flatten)]
    info: PeerInfo,
    id_hex: String,
    /// Gossip's verdict: alive or dead.
    state: &'static str,
    /// Raft role in the configuration: voter, learner or none.
    role: &'static str,
}

async fn status(State(agent): State<Arc<Agent>>) -> Response {
    let st = agent.shared.status();
    let (cluster_id, revision) = {
        let s = agent.shared.state();
        (s.cluster_id.clone(), s.revision)
    };
    let members: Vec<Member> = agent
        .peers()
        .into_iter()
        .map(|(info, live)| {
            let role = if st.voters.contains(&info.id) {
                "voter"
            } else if st.learners.contains(&info.id) {
                "learner"
            } else {
                "none"
            };
            Member { id_hex: format!("{:016x}", info.id), info, state: if live { "alive" } else { "dead" }, role }
        })
        .collect();
    let hex = |ids: &[u64]| ids.iter().map(|i| format!("{i:016x}")).collect::<Vec<_>>();
    Json(json!({
        "cluster_id": cluster_id,
        "node_id": format!("{:016x}", agent.id),
        "leader_id": if st.leader_id == 0 { None } else { Some(format!("{:016x}", st.leader_id)) },
        "role": st.role,
        "term": st.term,
        "commit_index": st.commit_index,
        "applied_index": st.applied_index,
        "revision": revision,
        "voters": hex(&st.voters),
        "learners": hex(&st.learners),
        "members": members,
    }))
    .into_response()
}

#[derive(Deserialize, Default)]
struct ReadParams {
    /// Serve from local state without confirming leadership (may be stale).
    #[serde(default)]
    stale: bool,
    #[serde(default)]
    prefix: String,
}

/// Waits until a linearizable read may be served locally, unless a stale read was asked for.
async fn read_barrier(agent: &Agent, stale: bool) -> Result<(), Response> {
    if stale {
        return Ok(());
    }
    ask(&agent.inbox, |reply| Input::Read { reply }).await.map_err(request_error)
}

async fn get_key(State(agent): State<Arc<Agent>>, Path(key): Path<String>, Query(p): Query<ReadParams>) -> Response {
    if let Err(r) = read_barrier(&agent, p.stale).await {
        return r;
    }
    let s = agent.shared.state();
    match s.get(&key) {
        Some(kv) => Json(json!({ "kv": kv, "revision": s.revision })).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("key {key:?} not found")),
    }
}

async fn list(State(agent): State<Arc<Agent>>, Query(p): Query<ReadParams>) -> Response {
    if let Err(r) = read_barrier(&agent, p.stale).await {
        return r;
    }
    let s = agent.shared.state();
    let kvs: Vec<&KeyValue> = s.range(&p.prefix).collect();
    Json(json!({ "kvs": kvs, "revision": s.revision })).into_response()
}

#[derive(Deserialize, Default)]
struct WriteParams {
    /// Apply only if the key's mod_revision equals this (0: only if absent).
    prev_revision: Option<u64>,
}

fn check_key(key: &str) -> Result<(), Box<Response>> {
    if key.is_empty() || key.len() > 1024 {
        return Err(Box::new(error(StatusCode::BAD_REQUEST, "keys are 1 to 1024 bytes")));
    }
    if key.starts_with(RESERVED_PREFIX) {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            format!("keys under {RESERVED_PREFIX:?} are managed by the cluster"),
        )));
    }
    Ok(())
}

async fn write(agent: &Agent, op: Op) -> Response {
    match ask(&agent.inbox, |reply| Input::Propose { op, reply }).await {
        Ok(ApplyOutcome::Applied { revision }) => Json(json!({ "revision": revision })).into_response(),
        Ok(ApplyOutcome::Conflict { current_revision }) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": "revision condition failed", "current_revision": current_revision })),
        )
            .into_response(),
        Ok(ApplyOutcome::NotFound) => error(StatusCode::NOT_FOUND, "key not found"),
        Err(e) => request_error(e),
    }
}

async fn put_key(
    State(agent): State<Arc<Agent>>,
    Path(key): Path<String>,
    Query(p): Query<WriteParams>,
    body: String,
) -> Response {
    if let Err(r) = check_key(&key) {
        return *r;
    }
    write(&agent, Op::Put { key, value: body, prev_revision: p.prev_revision }).await
}

async fn delete_key(
    State(agent): State<Arc<Agent>>,
    Path(key): Path<String>,
    Query(p): Query<WriteParams>,
) -> Response {
    if let Err(r) = check_key(&key) {
        return *r;
    }
    write(&agent, Op::Delete { key, prev_revision: p.prev_revision }).await
}

/// Cluster settings are keys under `shoal/settings/`: replicated, revisioned and watchable like
/// any key, but written only through this endpoint. Names are `[a-z0-9_.-]`, values any text.
fn setting_key(name: &str) -> Result<String, Box<Response>> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if !ok {
        return Err(Box::new(error(StatusCode::BAD_REQUEST, "setting names are 1 to 128 of [a-z0-9_.-]")));
    }
    Ok(format!("{SETTINGS_PREFIX}{name}"))
}

async fn list_settings(State(agent): State<Arc<Agent>>, Query(p): Query<ReadParams>) -> Response {
    if let Err(r) = read_barrier(&agent, p.stale).await {
        return r;
    }
    let s = agent.shared.state();
    let settings: serde_json::Map<String, serde_json::Value> = s
        .range(SETTINGS_PREFIX)
        .map(|kv| (kv.key[SETTINGS_PREFIX.len()..].to_string(), serde_json::Value::String(kv.value.clone())))
        .collect();
    Json(json!({ "settings": settings, "revision": s.revision })).into_response()
}

async fn get_setting(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    Query(p): Query<ReadParams>,
) -> Response {
    match setting_key(&name) {
        Ok(key) => get_key(State(agent), Path(key), Query(p)).await,
        Err(r) => *r,
    }
}

async fn put_setting(State(agent): State<Arc<Agent>>, Path(name): Path<String>, body: String) -> Response {
    match setting_key(&name) {
        Ok(key) => write(&agent, Op::Put { key, value: body, prev_revision: None }).await,
        Err(r) => *r,
    }
}

async fn delete_setting(State(agent): State<Arc<Agent>>, Path(name): Path<String>) -> Response {
    match setting_key(&name) {
        Ok(key) => write(&agent, Op::Delete { key, prev_revision: None }).await,
        Err(r) => *r,
    }
}

#[derive(Deserialize, Default)]
struct WatchParams {
    /// Deliver changes with a revision greater than this (default: only new changes).
    from_revision: Option<u64>,
    #[serde(default)]
    prefix: String,
}

fn sse_event(e: &WatchEvent) -> Result<Event, Infallible> {
    Ok(Event::default()
        .id(e.revision.to_string())
        .event(match e.kind {
            crate::cluster::state::EventKind::Put => "put",
            crate::cluster::state::EventKind::Delete => "delete",
        })
        .data(serde_json::to_string(e).unwrap_or_default()))
}

/// Server-sent events: every committed change after `from_revision`, in order. Subscribes before
/// reading the history so nothing falls between the two; a watcher too slow for the live channel
/// catches up from the history again.
async fn watch(State(agent): State<Arc<Agent>>, Query(p): Query<WatchParams>) -> Response {
    let mut live = agent.shared.events.subscribe();
    let after = p.from_revision.unwrap_or_else(|| agent.shared.state().revision);
    let backlog = match agent.shared.state().changes_after(after) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::GONE, e),
    };
    let prefix = p.prefix;
    let mut last = backlog.last().map(|e| e.revision).unwrap_or(after);
    let agent2 = agent.clone();
    let stream = async_stream(move |tx| async move {
        for e in backlog.iter().filter(|e| e.key.starts_with(&prefix)) {
            if tx.send(sse_event(e)).await.is_err() {
                return;
            }
        }
        loop {
            let events: Vec<WatchEvent> = match live.recv().await {
                Ok(e) => vec![e],
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    match agent2.shared.state().changes_after(last) {
                        Ok(b) => b,
                        Err(_) => return, // Fell behind the retained history: the client resumes.
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            for e in events {
                if e.revision <= last {
                    continue;
                }
                last = e.revision;
                if e.key.starts_with(&prefix) && tx.send(sse_event(&e)).await.is_err() {
                    return;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(5))).into_response()
}

/// A stream fed by a task through a bounded channel (the task ends when the client goes away).
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) }).boxed()
}
