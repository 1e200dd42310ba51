//! Tenants, deployments, instances, nodes and tenant tokens. Bodies are checked here (JSON shape,
//! names, bounds) before anything is proposed, so malformed requests never reach the log; what
//! depends on the state (quota, images, capacity, references) is checked when the command is
//! applied, identically on every node.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{delete_object, error, outcome, read_barrier, token_hash, watch_stream, Node, Principal};
use crate::state::objects::{
    check_deployment_name, check_tenant_name, DeploymentSpec, Instance, Node as NodeObject, NodeSpec, Tenant,
    TenantSpec,
};
use crate::state::{
    Command, EventKind, State as ClusterState, WatchEvent, DEPLOYMENTS_PREFIX, INSTANCES_PREFIX, NODES_PREFIX,
    TENANTS_PREFIX,
};

pub(super) fn routes() -> Router<Node> {
    Router::new()
        .route("/v1/tenants", get(list_tenants))
        .route("/v1/tenants/{tenant}", get(get_tenant).put(put_tenant).delete(delete_tenant))
        .route("/v1/tenants/{tenant}/tokens", post(create_token))
        .route("/v1/tenants/{tenant}/deployments", get(list_deployments))
        .route(
            "/v1/tenants/{tenant}/deployments/{name}",
            get(get_deployment).put(put_deployment).delete(delete_deployment),
        )
        .route("/v1/tenants/{tenant}/instances", get(list_instances))
        .route("/v1/tenants/{tenant}/instances/{id}", get(get_instance))
        .route("/v1/tenants/{tenant}/deployments/{name}/plan", post(plan_deployment))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(get_node).put(put_node).delete(delete_node))
        .route("/v1/nodes/{id}/cordon", put(cordon).delete(uncordon))
        .route("/v1/nodes/{id}/drain", post(drain).delete(undrain))
}

/// `?stale=true`, `?watch=true&from_revision=N`, `?deployment=NAME`, `?prev_revision=N`.
#[derive(Debug, Deserialize, Default)]
pub(super) struct Params {
    #[serde(default)]
    pub stale: bool,
    #[serde(default)]
    pub watch: bool,
    pub from_revision: Option<u64>,
    pub deployment: Option<String>,
    pub prev_revision: Option<u64>,
}

fn bad_request(e: impl std::fmt::Display) -> Response {
    error(StatusCode::BAD_REQUEST, e)
}

/// Parses a JSON body strictly (unknown fields are refused) into `T`.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}").map_err(|e| bad_request(format!("the body must be a JSON object: {e}")));
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("malformed JSON body: {e}")))
}

fn tenant_view(s: &ClusterState, t: &Tenant) -> Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    v["tokens"] =
        t.tokens.iter().map(|k| json!({"id": k.id, "created_at": crate::state::time::format(k.created_at)})).collect();
    v["usage"] = serde_json::to_value(s.usage(&t.name)).unwrap_or_default();
    v
}

fn node_view(node: &LocalNode, s: &ClusterState, n: &NodeObject) -> Value {
    let mut v = serde_json::to_value(n).unwrap_or_default();
    let peers = node.agent.peers();
    let peer = peers.iter().find(|(p, _)| p.id == n.id);
    let alive = n.id == node.id() || peer.is_some_and(|(_, live)| *live);
    let instances = s.instances_on(n.id).filter(|i| i.is_active()).count();
    v["allocated"] = serde_json::to_value(s.allocated(n.id)).unwrap_or_default();
    v["alive"] = json!(alive);
    v["stopping"] = json!(node.agent.stopping_nodes().contains(&n.id));
    v["instances"] = json!(instances);
    // `labels` is what placement sees: the node's own, with the operator's over them.
    v["agent_labels"] = json!(n.labels);
    v["labels"] = json!(n.effective_labels());
    v["taints"] = json!(n.taints);
    if let Some(d) = &n.drain {
        let remaining = s.instances_on(n.id).filter(|i| i.is_active()).count();
        v["drain"]["remaining"] = json!(remaining);
        v["drain"]["done"] = json!(d.finished_at.is_some());
    }
    v["version"] = json!(peer.map(|(p, _)| p.version.clone()));
    v
}

use crate::local::LocalNode;

/// An SSE event for one typed change: `{"type", "revision", "key", "object"}`.
fn object_event(e: &WatchEvent) -> Result<Event, Infallible> {
    let kind = match e.kind {
        EventKind::Put => "put",
        EventKind::Delete => "delete",
    };
    let object: Value = serde_json::from_str(&e.value).unwrap_or(Value::Null);
    let data = json!({"type": kind, "revision": e.revision, "key": e.key, "object": object});
    Ok(Event::default().id(e.revision.to_string()).event(kind).data(data.to_string()))
}

fn json_list(key: &str, items: Vec<Value>, revision: u64) -> Response {
    let mut m = serde_json::Map::new();
    m.insert(key.to_string(), Value::Array(items));
    m.insert("revision".into(), json!(revision));
    Json(Value::Object(m)).into_response()
}

// ---- tenants ----------------------------------------------------------------------------------

async fn list_tenants(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Query(p): Query<Params>,
) -> Response {
    if p.watch {
        let me = who.clone();
        return watch_stream(&node, p.from_revision, move |e| {
            let name = e.key.strip_prefix(TENANTS_PREFIX)?;
            (me.require_tenant(name).is_ok()).then(|| object_event(e))
        });
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    let items =
        s.tenants.values().filter(|t| who.require_tenant(&t.name).is_ok()).map(|t| tenant_view(&s, t)).collect();
    json_list("tenants", items, s.revision)
}

async fn get_tenant(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(tenant): Path<String>,
    Query(p): Query<Params>,
) -> Response {
    if let Err(r) = who.require_tenant(&tenant) {
        return r;
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    match s.tenants.get(&tenant) {
        Some(t) => Json(tenant_view(&s, t)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("tenant {tenant:?} does not exist")),
    }
}

async fn put_tenant(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(tenant): Path<String>,
    Query(p): Query<Params>,
    body: Bytes,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(e) = check_tenant_name(&tenant) {
        return bad_request(e);
    }
    let spec: TenantSpec = match parse(&body) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(e) = spec.validate() {
        return bad_request(e);
    }
    let created = !node.agent.shared.state().tenants.contains_key(&tenant);
    let cmd = Command::PutTenant { name: tenant.clone(), spec, prev_revision: p.prev_revision };
    put_object(&node, cmd, created, "tenant", |s| s.tenants.get(&tenant).map(|t| tenant_view(s, t))).await
}

/// Proposes a create-or-update: 201 when it created the object, else 200, with the revision and
/// the object as it is now under `kind`.
async fn put_object(
    node: &Node,
    command: Command,
    created: bool,
    kind: &str,
    view: impl FnOnce(&ClusterState) -> Option<Value>,
) -> Response {
    match outcome(node.propose(command).await) {
        Ok(revision) => {
            let object = view(&node.agent.shared.state());
            let code = if created { StatusCode::CREATED } else { StatusCode::OK };
            let mut body = json!({"revision": revision});
            body[kind] = object.unwrap_or(Value::Null);
            (code, Json(body)).into_response()
        }
        Err(r) => r,
    }
}

async fn delete_tenant(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(tenant): Path<String>,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(e) = check_tenant_name(&tenant) {
        return bad_request(e);
    }
    let missing = format!("tenant {tenant:?} does not exist");
    delete_object(&node, Command::DeleteTenant { name: tenant }, missing).await
}

/// A new token for the tenant, shown once; only its hash is kept.
async fn create_token(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(tenant): Path<String>,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if let Err(e) = check_tenant_name(&tenant) {
        return bad_request(e);
    }
    let token = format!("shoal-t-{}", hex::encode(rand::random::<[u8; 24]>()));
    let id = hex::encode(rand::random::<[u8; 4]>());
    let cmd = Command::AddTenantToken { tenant: tenant.clone(), id: id.clone(), sha256: token_hash(&token) };
    match outcome(node.propose(cmd).await) {
        Ok(revision) => {
            (StatusCode::CREATED, Json(json!({"token": token, "id": id, "tenant": tenant, "revision": revision})))
                .into_response()
        }
        Err(r) => r,
    }
}

// ---- deployments --------------------------------------------------------------------------------

fn names(tenant: &str, name: Option<&str>) -> Result<(), Response> {
    check_tenant_name(tenant).map_err(bad_request)?;
    if let Some(n) = name {
        check_deployment_name(n).map_err(bad_request)?;
    }
    Ok(())
}

async fn list_deployments(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(tenant): Path<String>,
    Query(p): Query<Params>,
) -> Response {
    if let Err(r) = who.require_tenant(&tenant).and_then(|_| names(&tenant, None)) {
        return r;
    }
    if p.watch {
        let prefix = format!("{DEPLOYMENTS_PREFIX}{tenant}/");
        return watch_stream(&node, p.from_revision, move |e| e.key.starts_with(&prefix).then(|| object_event(e)));
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    let items = s
        .deployments
        .range((tenant.clone(), String::new())..)
        .take_while(|((t, _), _)| *t == tenant)
        .map(|(_, d)| serde_json::to_value(d).unwrap_or_default())
        .collect();
    json_list("deployments", items, s.revision)
}

async fn get_deployment(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path((tenant, name)): Path<(String, String)>,
    Query(p): Query<Params>,
) -> Response {
    if let Err(r) = who.require_tenant(&tenant).and_then(|_| names(&tenant, Some(&name))) {
        return r;
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    match s.deployments.get(&(tenant.clone(), name.clone())) {
        Some(d) => Json(serde_json::to_value(d).unwrap_or_default()).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("deployment {name:?} of tenant {tenant:?} does not exist")),
    }
}

/// A deployment body for `tenant`/`name`, checked: who may write it, the names, the spec.
fn deployment_body(who: &Principal, tenant: &str, name: &str, body: &Bytes) -> Result<DeploymentSpec, Response> {
    who.require_tenant(tenant).and_then(|_| names(tenant, Some(name)))?;
    let spec: DeploymentSpec = parse(body)?;
    spec.validate().map_err(bad_request)?;
    Ok(spec)
}

async fn put_deployment(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path((tenant, name)): Path<(String, String)>,
    Query(p): Query<Params>,
    body: Bytes,
) -> Response {
    let spec = match deployment_body(&who, &tenant, &name, &body) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let key = (tenant.clone(), name.clone());
    let created = !node.agent.shared.state().deployments.contains_key(&key);
    let cmd = Command::PutDeployment { tenant, name, spec, prev_revision: p.prev_revision };
    put_object(&node, cmd, created, "deployment", |s| {
        s.deployments.get(&key).and_then(|d| serde_json::to_value(d).ok())
    })
    .await
}

async fn delete_deployment(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path((tenant, name)): Path<(String, String)>,
) -> Response {
    if let Err(r) = who.require_tenant(&tenant).and_then(|_| names(&tenant, Some(&name))) {
        return r;
    }
    let missing = format!("deployment {name:?} of tenant {tenant:?} does not exist");
    delete_object(&node, Command::DeleteDeployment { tenant, name }, missing).await
}

// ---- instances ----------------------------------------------------------------------------------

fn instance_view(i: &Instance) -> Value {
    serde_json::to_value(i).unwrap_or_default()
}

async fn list_instances(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(tenant): Path<String>,
    Query(p): Query<Params>,
) -> Response {
    if let Err(r) = who.require_tenant(&tenant).and_then(|_| names(&tenant, p.deployment.as_deref())) {
        return r;
    }
    if p.watch {
        let prefix = format!("{INSTANCES_PREFIX}{tenant}/");
        let deployment = p.deployment.clone();
        return watch_stream(&node, p.from_revision, move |e| {
            if !e.key.starts_with(&prefix) {
                return None;
            }
            if let Some(d) = &deployment {
                // Deletes carry no object: the id names the deployment it belonged to.
                let id = &e.key[prefix.len()..];
                let matches = match e.kind {
                    EventKind::Put => serde_json::from_str::<Value>(&e.value).ok()?["deployment"] == d.as_str(),
                    EventKind::Delete => {
                        id.strip_prefix(d.as_str()).is_some_and(|rest| rest.len() == 6 && rest.starts_with('-'))
                    }
                };
                if !matches {
                    return None;
                }
            }
            Some(object_event(e))
        });
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    let items = s
        .instances
        .range((tenant.clone(), String::new())..)
        .take_while(|((t, _), _)| *t == tenant)
        .filter(|(_, i)| p.deployment.as_ref().is_none_or(|d| &i.deployment == d))
        .map(|(_, i)| instance_view(i))
        .collect();
    json_list("instances", items, s.revision)
}

async fn get_instance(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path((tenant, id)): Path<(String, String)>,
    Query(p): Query<Params>,
) -> Response {
    if let Err(r) = who.require_tenant(&tenant).and_then(|_| names(&tenant, None)) {
        return r;
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    match s.instances.get(&(tenant.clone(), id.clone())) {
        Some(i) => Json(instance_view(i)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("instance {:?} of tenant {tenant:?} does not exist", id.chars().take(80).collect::<String>()),
        ),
    }
}

// ---- nodes --------------------------------------------------------------------------------------

fn node_id(id: &str) -> Result<u64, Response> {
    if id.len() != 16 {
        return Err(bad_request("node ids are 16 hex digits"));
    }
    u64::from_str_radix(id, 16).map_err(|_| bad_request("node ids are 16 hex digits"))
}

/// The prelude of the node handlers: a cluster token, and a well-formed node id.
fn cluster_node_id(who: &Principal, id: &str) -> Result<u64, Response> {
    who.require_cluster()?;
    node_id(id)
}

async fn list_nodes(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Query(p): Query<Params>,
) -> Response {
    if let Err(r) = who.require_cluster() {
        return r;
    }
    if p.watch {
        return watch_stream(&node, p.from_revision, move |e| e.key.starts_with(NODES_PREFIX).then(|| object_event(e)));
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    let items = s.nodes.values().map(|n| node_view(&node, &s, n)).collect();
    json_list("nodes", items, s.revision)
}

async fn get_node(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(p): Query<Params>,
) -> Response {
    let id = match cluster_node_id(&who, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    match s.nodes.get(&id) {
        Some(n) => Json(node_view(&node, &s, n)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("node {id:016x} is not a member")),
    }
}

async fn set_cordon(node: Node, who: Principal, id: String, cordoned: bool) -> Response {
    let id = match cluster_node_id(&who, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match outcome(node.propose(Command::Cordon { node: id, cordoned }).await) {
        Ok(revision) => {
            let s = node.agent.shared.state();
            let view = s.nodes.get(&id).map(|n| node_view(&node, &s, n));
            Json(json!({"revision": revision, "node": view})).into_response()
        }
        Err(r) => r,
    }
}

async fn cordon(State(node): State<Node>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Response {
    set_cordon(node, who, id, true).await
}

async fn uncordon(State(node): State<Node>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Response {
    set_cordon(node, who, id, false).await
}

/// The operator's labels and the node's taints (`no_execute` ones move off what does not
/// tolerate them).
async fn put_node(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let id = match cluster_node_id(&who, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let spec: NodeSpec = match parse(&body) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(e) = spec.validate() {
        return bad_request(e);
    }
    put_object(&node, Command::SetNodeSpec { node: id, spec }, false, "node", |s| {
        s.nodes.get(&id).map(|n| node_view(&node, s, n))
    })
    .await
}

/// Removes a node from the cluster for good (revokes its certificate; the leader takes its Raft
/// seat). Refused for the leader: hand leadership over first (or remove it from another node
/// once another leads).
async fn delete_node(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    let id = match cluster_node_id(&who, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if node.agent.shared.status().leader_id == id {
        return error(
            StatusCode::CONFLICT,
            format!("node {id:016x} leads the cluster; it cannot be removed while it leads"),
        );
    }
    match crate::api::outcome(node.propose(Command::RevokeNode { node: id }).await) {
        Ok(revision) => {
            tracing::info!(node = %format!("{id:016x}"), "node removed from the cluster by the operator");
            Json(json!({ "id": format!("{id:016x}"), "revoked": true, "revision": revision })).into_response()
        }
        Err(r) => r,
    }
}

async fn set_drain(node: Node, who: Principal, id: String, drain: bool) -> Response {
    let id = match cluster_node_id(&who, &id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    put_object(&node, Command::Drain { node: id, drain }, false, "node", |s| {
        s.nodes.get(&id).map(|n| node_view(&node, s, n))
    })
    .await
}

/// Cordons the node and moves its instances off, one at a time within each deployment's
/// disruption budget; the node's `drain` shows the progress.
async fn drain(State(node): State<Node>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Response {
    set_drain(node, who, id, true).await
}

/// Stops draining (the node stays cordoned).
async fn undrain(State(node): State<Node>, Extension(who): Extension<Principal>, Path(id): Path<String>) -> Response {
    set_drain(node, who, id, false).await
}

/// What the body would do as the deployment's new spec, without doing it.
async fn plan_deployment(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path((tenant, name)): Path<(String, String)>,
    Query(p): Query<Params>,
    body: Bytes,
) -> Response {
    let spec = match deployment_body(&who, &tenant, &name, &body) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let mut alive: std::collections::BTreeSet<u64> = node.alive_peers().into_keys().collect();
    alive.insert(node.id());
    let worker = node.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let state = worker.agent.shared.state().clone();
        let options = crate::scheduler::Options::from_settings(&state);
        crate::scheduler::plan::plan(&state, &alive, &tenant, &name, &spec, &options, crate::state::time::now_ms())
    })
    .await;
    match planned {
        Ok(Ok(plan)) => Json(serde_json::to_value(plan).unwrap_or_default()).into_response(),
        Ok(Err((kind, reason))) => super::outcome(Ok(crate::state::ApplyOutcome::Rejected { kind, reason }))
            .err()
            .unwrap_or_else(|| error(StatusCode::INTERNAL_SERVER_ERROR, "plan failed")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("plan failed: {e}")),
    }
}
