//! The node's HTTP API (any node answers; writes go through the leader, reads are linearizable
//! unless `?stale=true`): cluster status and settings, the keyed store and its watch stream, and
//! the workload objects (tenants, images, deployments, instances, nodes).
//!
//! Every `/v1/` request needs `Authorization: Bearer <token>`: the cluster token (or the peer
//! token nodes use among themselves) may do anything; a tenant token only reads and writes its
//! own tenant's objects. Errors are JSON `{"error": "..."}` with a status a client can act on:
//! 400 malformed, 401 bad token, 403 not allowed for this token, 404 missing, 409 conflict, 410
//! compacted watch revision, 413 too large, 422 valid but cannot be honoured, 503 no quorum or
//! outcome unknown (retry).

// Handlers return ready-made error responses through `Result`; they are built once per failed
// request, so their size does not matter.
#![allow(clippy::result_large_err)]

mod console;
mod images;
pub mod tls_listener;
mod workloads;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::cluster::gossip::PeerInfo;
use crate::cluster::raft_node::RequestError;
use crate::local::LocalNode;
use crate::state::{
    ApplyOutcome, Command, KeyValue, Op, RejectKind, StateError, WatchEvent, RESERVED_PREFIX, SETTINGS_PREFIX,
};

/// Largest value accepted for one key, and largest JSON body.
pub const MAX_VALUE: usize = 1 << 20;

type Node = Arc<LocalNode>;

/// Who is asking, from the bearer token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The cluster token (or a peer's): everything.
    Cluster,
    /// A tenant-scoped token: that tenant's objects only.
    Tenant(String),
}

impl Principal {
    fn require_cluster(&self) -> Result<(), Response> {
        match self {
            Principal::Cluster => Ok(()),
            Principal::Tenant(t) => {
                Err(error(StatusCode::FORBIDDEN, format!("a token of tenant {t:?} cannot do this")))
            }
        }
    }

    fn require_tenant(&self, tenant: &str) -> Result<(), Response> {
        match self {
            Principal::Tenant(t) if t != tenant => {
                Err(error(StatusCode::FORBIDDEN, format!("a token of tenant {t:?} cannot see tenant {tenant:?}")))
            }
            _ => Ok(()),
        }
    }
}

pub fn router(node: Node) -> Router {
    let v1 = Router::new()
        .route("/v1/cluster/status", get(status))
        .route("/v1/kv", get(list))
        .route("/v1/kv/{*key}", get(get_key).put(put_key).delete(delete_key))
        .route("/v1/watch", get(watch))
        .route("/v1/cluster/settings", get(list_settings))
        .route("/v1/cluster/settings/{name}", get(get_setting).put(put_setting).delete(delete_setting))
        .merge(workloads::routes())
        .merge(console::routes())
        .merge(images::routes())
        .layer(axum::extract::DefaultBodyLimit::max(MAX_VALUE))
        .merge(images::upload_routes())
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(node.clone(), auth));
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        // Authenticated by its proof of the cluster secret, not by a token.
        .route("/v1/cluster/join", axum::routing::post(join))
        // Public: the CA with this node's proof that it holds the secret (how a client with the
        // secret and nothing else comes to trust the cluster).
        .route("/v1/cluster/ca", get(cluster_ca))
        .merge(v1)
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(node)
}

/// The purpose of the key that proves a CA to a client (`GET /v1/cluster/ca`).
pub const CA_PROOF_PURPOSE: &str = "ca-proof";

/// `GET /v1/cluster/ca`: `{"ca": PEM, "proof": hex HMAC of the PEM under the secret's ca-proof
/// key}`. A client that holds the secret checks the proof and then verifies the API with the
/// CA, so its first contact needs no CA file and trusts nothing unproven (`shoalctl config
/// set-context --secret-file`). Only secret holders can make a proof; a replayed one names the
/// same, real CA.
async fn cluster_ca(State(node): State<Node>) -> Response {
    let ca = node.agent.shared.state().pki.ca_cert.clone();
    if ca.is_empty() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the cluster has not formed yet: no CA".to_string());
    }
    let proof = hex::encode(node.agent.config.secret.key(CA_PROOF_PURPOSE).tag(ca.as_bytes()));
    Json(json!({"ca": ca, "proof": proof})).into_response()
}

/// `POST /v1/cluster/join`: a node without a certificate asks for one (see `cluster::join`).
async fn join(State(node): State<Node>, body: axum::body::Bytes) -> Response {
    let req: crate::cluster::join::JoinRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a join request: {e}")),
    };
    let pki = {
        let state = node.agent.shared.state();
        (state.cluster_id.clone(), state.pki.ca_cert.clone(), state.pki.ca_key_sealed.clone())
    };
    let propose = |c| {
        let node = node.clone();
        async move { node.propose(c).await.map_err(|e| e.to_string()) }
    };
    match crate::cluster::join::answer(&node.agent.config.secret, pki, &req, propose).await {
        Ok(ans) => {
            tracing::info!(node = %req.node, "issued a node certificate");
            Json(ans).into_response()
        }
        Err(r) => {
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::CONFLICT {
                tracing::warn!(node = %req.node, reason = %r.message, "join refused");
            }
            error(status, r.message)
        }
    }
}

pub(crate) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

/// Answers that are not JSON already (axum's own rejections: bad path, query or body, no
/// route, wrong method) become `{"error": ...}` like every other error.
async fn json_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let body = axum::body::to_bytes(res.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_lowercase() } else { text };
    error(status, message)
}

/// An error with its causes, on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// 503 for every Raft failure, with `outcome` saying what a client may do: `not_applied`
/// (nothing was proposed or the read changed nothing: safe to retry as is) or `unknown` (a
/// write may or may not have been applied: retry with `prev_revision` for exactly-once).
fn request_error(e: RequestError) -> Response {
    let outcome = match e {
        RequestError::NoLeader | RequestError::NotMember | RequestError::Busy => "not_applied",
        RequestError::Timeout | RequestError::Stopped => "unknown",
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": e.to_string(), "outcome": outcome }))).into_response()
}

/// The response for a refused or conditional command; `Ok(revision)` when applied.
pub(crate) fn outcome(o: Result<ApplyOutcome, RequestError>) -> Result<u64, Response> {
    match o {
        Ok(ApplyOutcome::Applied { revision }) => Ok(revision),
        Ok(ApplyOutcome::Conflict { current_revision }) => Err((
            StatusCode::CONFLICT,
            Json(json!({ "error": "revision condition failed", "current_revision": current_revision })),
        )
            .into_response()),
        Ok(ApplyOutcome::NotFound) => Err(error(StatusCode::NOT_FOUND, "not found")),
        Ok(ApplyOutcome::Rejected { kind, reason }) => {
            let status = match kind {
                RejectKind::Invalid => StatusCode::BAD_REQUEST,
                RejectKind::NotFound => StatusCode::NOT_FOUND,
                RejectKind::Conflict | RejectKind::Stale => StatusCode::CONFLICT,
                RejectKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
                RejectKind::Unsupported => StatusCode::SERVICE_UNAVAILABLE,
            };
            Err(error(status, reason))
        }
        Err(e) => Err(request_error(e)),
    }
}

/// Proposes a deletion: `{"revision": R}`, or 404 saying `missing` when there was nothing.
pub(crate) async fn delete_object(node: &LocalNode, command: Command, missing: String) -> Response {
    match outcome(node.propose(command).await) {
        Ok(revision) => Json(json!({ "revision": revision })).into_response(),
        Err(r) if r.status() == StatusCode::NOT_FOUND => error(StatusCode::NOT_FOUND, missing),
        Err(r) => r,
    }
}

pub(crate) fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

async fn auth(State(node): State<Node>, headers: HeaderMap, mut req: Request, next: Next) -> Response {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let principal = if constant_time_eq(presented.as_bytes(), node.agent.config.api_token.as_bytes())
        || constant_time_eq(presented.as_bytes(), node.peer_token.as_bytes())
    {
        Some(Principal::Cluster)
    } else if presented.is_empty() {
        None
    } else {
        node.agent.shared.state().tenant_of_token(&token_hash(presented)).map(|t| Principal::Tenant(t.to_string()))
    };
    let Some(principal) = principal else {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(node): State<Node>, Extension(who): Extension<Principal>) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics.render()).into_response()
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

async fn status(State(node): State<Node>, Extension(who): Extension<Principal>) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    let agent = &node.agent;
    let st = agent.shared.status();
    let (cluster_id, revision, format) = {
        let s = agent.shared.state();
        (s.cluster_id.clone(), s.revision, s.format)
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
    let mut body = json!({
        "cluster_id": cluster_id,
        "node_id": format!("{:016x}", agent.id),
        "leader_id": if st.leader_id == 0 { None } else { Some(format!("{:016x}", st.leader_id)) },
        "role": st.role,
        "term": st.term,
        "commit_index": st.commit_index,
        "applied_index": st.applied_index,
        "revision": revision,
        "format": format,
        "voters": hex(&st.voters),
        "learners": hex(&st.learners),
        "members": members,
    });
    // A node booted from the host image: PID 1's boot phases (`[{phase, detail, at_s}]`).
    if let Some(file) = std::env::var_os("SHOAL_BOOT_PHASES") {
        let phases = std::fs::read(file).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        body["boot_phases"] = phases.unwrap_or(serde_json::Value::Null);
    }
    Json(body).into_response()
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
pub(crate) async fn read_barrier(node: &LocalNode, stale: bool) -> Result<(), Response> {
    if stale {
        return Ok(());
    }
    node.read_barrier().await.map_err(request_error)
}

async fn get_key(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(key): Path<String>,
    Query(p): Query<ReadParams>,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    match s.get(&key) {
        Some(kv) => Json(json!({ "kv": kv, "revision": s.revision })).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("key {key:?} not found")),
    }
}

async fn list(State(node): State<Node>, Extension(who): Extension<Principal>, Query(p): Query<ReadParams>) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    // Copied under the read lock, encoded after it: the Raft thread's apply waits for no JSON.
    let (kvs, revision) = {
        let s = node.agent.shared.state();
        (s.range(&p.prefix).cloned().collect::<Vec<KeyValue>>(), s.revision)
    };
    let body = serde_json::to_vec(&json!({ "kvs": kvs, "revision": revision })).unwrap_or_default();
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
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

async fn write(node: &LocalNode, command: Command) -> Response {
    match outcome(node.propose(command).await) {
        Ok(revision) => Json(json!({ "revision": revision })).into_response(),
        Err(r) => r,
    }
}

async fn put_key(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(key): Path<String>,
    Query(p): Query<WriteParams>,
    body: String,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(r) = check_key(&key) {
        return *r;
    }
    write(&node, Command::Kv(Op::Put { key, value: body, prev_revision: p.prev_revision })).await
}

async fn delete_key(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(key): Path<String>,
    Query(p): Query<WriteParams>,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(r) = check_key(&key) {
        return *r;
    }
    write(&node, Command::Kv(Op::Delete { key, prev_revision: p.prev_revision })).await
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

async fn list_settings(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Query(p): Query<ReadParams>,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    let settings: serde_json::Map<String, serde_json::Value> = s
        .range(SETTINGS_PREFIX)
        .map(|kv| (kv.key[SETTINGS_PREFIX.len()..].to_string(), serde_json::Value::String(kv.value.clone())))
        .collect();
    Json(json!({ "settings": settings, "revision": s.revision })).into_response()
}

async fn get_setting(
    State(node): State<Node>,
    who: Extension<Principal>,
    Path(name): Path<String>,
    q: Query<ReadParams>,
) -> Response {
    match setting_key(&name) {
        Ok(key) => get_key(State(node), who, Path(key), q).await,
        Err(r) => *r,
    }
}

async fn put_setting(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    body: String,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(r) = check_network_setting(&node, &name, Some(&body)) {
        return *r;
    }
    match setting_key(&name) {
        Ok(key) => write(&node, Command::Kv(Op::Put { key, value: body, prev_revision: None })).await,
        Err(r) => *r,
    }
}

/// The cluster network's settings change only while no node holds a subnet of it (every
/// address handed out would otherwise be wrong), and only to a network that can serve.
fn check_network_setting(node: &Node, name: &str, value: Option<&str>) -> Result<(), Box<Response>> {
    use crate::state::network::{parse_network, CIDR_SETTING, NODE_PREFIX_SETTING};
    if name != CIDR_SETTING && name != NODE_PREFIX_SETTING {
        return Ok(());
    }
    let s = node.agent.shared.state();
    let (cidr, prefix) =
        if name == CIDR_SETTING { (value, s.setting(NODE_PREFIX_SETTING)) } else { (s.setting(CIDR_SETTING), value) };
    let net = parse_network(cidr, prefix).map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e.to_string())))?;
    s.check_network(&net).map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, &e)))?;
    if s.subnets_assigned() && s.cluster_network().ok() != Some(net) {
        let msg = "the cluster network cannot change while nodes hold subnets of it (instances have addresses from it)";
        return Err(Box::new(error(StatusCode::CONFLICT, msg)));
    }
    Ok(())
}

async fn delete_setting(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(r) = check_network_setting(&node, &name, None) {
        return *r;
    }
    match setting_key(&name) {
        Ok(key) => write(&node, Command::Kv(Op::Delete { key, prev_revision: None })).await,
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
            crate::state::EventKind::Put => "put",
            crate::state::EventKind::Delete => "delete",
        })
        .data(serde_json::to_string(e).unwrap_or_default()))
}

async fn watch(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Query(p): Query<WatchParams>,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    let prefix = p.prefix;
    watch_stream(&node, p.from_revision, move |e| e.key.starts_with(&prefix).then(|| sse_event(e)))
}

/// Server-sent events: every committed change after `from` that `pick` turns into an event, in
/// order. Subscribes before reading the history so nothing falls between the two; a watcher too
/// slow for the live channel, or on a node that installed a snapshot (a jump in the state no
/// live event describes), catches up from the history again. Where the history no longer
/// reaches back, the watcher gets a `compacted` event (`{"type": "compacted", "revision",
/// "requested", "oldest"}`) and the stream ends: it must list again and watch from there. A
/// watcher never misses a change silently.
pub(crate) fn watch_stream<F>(node: &Node, from: Option<u64>, pick: F) -> Response
where
    F: Fn(&WatchEvent) -> Option<Result<Event, Infallible>> + Send + 'static,
{
    let mut live = node.agent.shared.events.subscribe();
    let mut installs = node.agent.shared.installs.subscribe();
    let after = from.unwrap_or_else(|| node.agent.shared.state().revision);
    let backlog = match node.agent.shared.state().changes_after(after) {
        Ok(b) => b,
        Err(e @ StateError::Compacted { .. }) => return error(StatusCode::GONE, e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let mut last = backlog.last().map(|e| e.revision).unwrap_or(after);
    let node = node.clone();
    let stream = async_stream(move |tx| async move {
        for e in &backlog {
            if let Some(ev) = pick(e) {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
        loop {
            let catch_up = |last: u64| node.agent.shared.state().changes_after(last);
            let refill = tokio::select! {
                r = live.recv() => match r {
                    Ok(e) => Ok(vec![e]),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => catch_up(last),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                r = installs.recv() => match r {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => catch_up(last),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            };
            let events: Vec<WatchEvent> = match refill {
                Ok(b) => b,
                Err(e) => {
                    // Fell behind the retained history: say so, then end; the client lists again.
                    let (requested, oldest) = match e {
                        StateError::Compacted { requested, oldest } => (requested, oldest),
                        _ => (last + 1, 0),
                    };
                    let revision = node.agent.shared.state().revision;
                    let data = serde_json::json!({"type": "compacted", "revision": revision, "requested": requested, "oldest": oldest});
                    let _ = tx.send(Ok(Event::default().event("compacted").data(data.to_string()))).await;
                    return;
                }
            };
            for e in events {
                if e.revision <= last {
                    continue;
                }
                last = e.revision;
                if let Some(ev) = pick(&e) {
                    if tx.send(ev).await.is_err() {
                        return;
                    }
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
