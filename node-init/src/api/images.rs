//! Images: uploads (streamed to the store, hashed on the way; several GiB fit), the list with
//! the nodes holding each image, and the blob itself, which nodes fetch from one another.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};

use super::workloads::Params;
use super::{delete_object, error, outcome, read_barrier, Node, Principal};
use crate::images::ImageError;
use crate::state::objects::{check_digest, Image};
use crate::state::Command;

pub(super) fn routes() -> Router<Node> {
    Router::new()
        .route("/v1/images", get(list_images))
        .route("/v1/images/{digest}", get(get_image).delete(delete_image))
        .route("/v1/images/{digest}/blob", get(get_blob))
}

/// The upload route, with no body limit of its own (the store bounds the size).
pub(super) fn upload_routes() -> Router<Node> {
    Router::new().route("/v1/images", post(upload)).layer(axum::extract::DefaultBodyLimit::disable())
}

fn view(i: &Image) -> Value {
    serde_json::to_value(i).unwrap_or_default()
}

async fn upload(State(node): State<Node>, Extension(who): Extension<Principal>, body: Body) -> Response {
    let tenant = match &who {
        Principal::Tenant(t) => Some(t.clone()),
        Principal::Cluster => None,
    };
    let (digest, size) = match node.images.ingest(body, None).await {
        Ok(r) => r,
        Err(e @ ImageError::TooLarge) => return error(StatusCode::PAYLOAD_TOO_LARGE, e),
        Err(e @ (ImageError::Empty | ImageError::Body(_) | ImageError::DigestMismatch { .. })) => {
            return error(StatusCode::BAD_REQUEST, e)
        }
        Err(e @ ImageError::Io(_)) => return error(StatusCode::INTERNAL_SERVER_ERROR, super::chain(&e)),
    };
    let cmd = Command::ImageStored { digest: digest.clone(), size, node: node.id(), tenant };
    match outcome(node.propose(cmd).await) {
        Ok(revision) => {
            (StatusCode::CREATED, Json(json!({"digest": digest, "size": size, "revision": revision}))).into_response()
        }
        Err(r) => r,
    }
}

async fn list_images(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Query(p): Query<Params>,
) -> Response {
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    let visible = match &who {
        Principal::Cluster => None,
        Principal::Tenant(t) => Some(s.images_of_tenant(t)),
    };
    let items: Vec<Value> =
        s.images.values().filter(|i| visible.as_ref().is_none_or(|v| v.contains(&i.digest))).map(view).collect();
    Json(json!({"images": items, "revision": s.revision})).into_response()
}

fn digest_param(d: &str) -> Result<(), Response> {
    check_digest("image", d).map_err(|e| error(StatusCode::BAD_REQUEST, e))
}

async fn get_image(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(digest): Path<String>,
    Query(p): Query<Params>,
) -> Response {
    if let Err(r) = digest_param(&digest) {
        return r;
    }
    if let Err(r) = read_barrier(&node, p.stale).await {
        return r;
    }
    let s = node.agent.shared.state();
    let visible = match &who {
        Principal::Cluster => true,
        Principal::Tenant(t) => s.images_of_tenant(t).contains(&digest),
    };
    match s.images.get(&digest).filter(|_| visible) {
        Some(i) => Json(view(i)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("image {digest} is unknown")),
    }
}

async fn delete_image(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(digest): Path<String>,
) -> Response {
    if let Err(r) = who.require_cluster().and_then(|_| digest_param(&digest)) {
        return r;
    }
    let missing = format!("image {digest} is unknown");
    delete_object(&node, Command::DeleteImage { digest }, missing).await
}

/// The image's bytes from this node's store (nodes fetch what they lack from each other).
async fn get_blob(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path(digest): Path<String>,
) -> Response {
    if let Err(r) = who.require_cluster().and_then(|_| digest_param(&digest)) {
        return r;
    }
    let Some(path) = node.images.path(&digest).filter(|p| p.is_file()) else {
        return error(StatusCode::NOT_FOUND, format!("this node does not hold image {digest}"));
    };
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read image {digest}: {e}")),
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024));
    (
        [
            (axum::http::header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (axum::http::header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response()
}
