//! An instance's serial console: the output its node keeps in the instance directory, served by
//! any node (a node that does not run the instance asks the one that does). `?follow=true`
//! keeps the answer open and streams new output as it comes, across the file's rotation, until
//! the instance has ended for good (or is gone, or lost) or the client leaves. A `POST` types its
//! body on the guest's console (what `shoalctl attach` sends as you type).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

use super::{error, read_barrier, Node, Principal};
use crate::supervisor::layout::InstanceDir;

pub(super) fn routes() -> Router<Node> {
    Router::new().route("/v1/tenants/{tenant}/instances/{id}/console", get(console).post(type_input))
}

#[derive(Debug, Deserialize, Default)]
struct ConsoleParams {
    #[serde(default)]
    follow: bool,
    #[serde(default)]
    stale: bool,
    /// Set by the node that forwards a request: answer from here or not at all.
    #[serde(default)]
    local: bool,
    /// Start with only the last this many bytes of what is kept (default: all of it).
    tail_bytes: Option<u64>,
}

/// Most bytes one input request may type.
pub const MAX_INPUT: usize = 64 << 10;

const POLL: Duration = Duration::from_millis(100);

/// Where an instance is: its uid, its node, and that node's API address.
fn locate(node: &Node, tenant: &str, id: &str) -> Result<(String, Option<u64>, Option<String>), Response> {
    let s = node.agent.shared.state();
    let Some(inst) = s.instances.get(&(tenant.to_string(), id.to_string())) else {
        let shown: String = id.chars().take(80).collect();
        return Err(error(StatusCode::NOT_FOUND, format!("instance {shown:?} of tenant {tenant:?} does not exist")));
    };
    let api_addr = inst.node.and_then(|n| s.nodes.get(&n)).map(|n| n.api_addr.clone());
    Ok((inst.uid.clone(), inst.node, api_addr))
}

async fn console(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path((tenant, id)): Path<(String, String)>,
    Query(p): Query<ConsoleParams>,
) -> Response {
    if let Err(r) = who.require_tenant(&tenant) {
        return r;
    }
    if !p.local {
        if let Err(r) = read_barrier(&node, p.stale).await {
            return r;
        }
    }
    let (uid, on, api_addr) = match locate(&node, &tenant, &id) {
        Ok(found) => found,
        Err(r) => return r,
    };
    let dir = InstanceDir::new(&node.instances_dir, &uid);
    if on == Some(node.id()) || p.local {
        if !dir.path.exists() {
            return error(StatusCode::NOT_FOUND, format!("instance {id} has no console on this node yet"));
        }
        return local_console(node.clone(), tenant, id, dir, p.follow, p.tail_bytes);
    }
    let (Some(on), Some(addr)) = (on, api_addr) else {
        return error(StatusCode::CONFLICT, format!("instance {id} has not been placed on a node yet"));
    };
    let tail = p.tail_bytes.map(|t| format!("&tail_bytes={t}")).unwrap_or_default();
    let path = format!("/v1/tenants/{tenant}/instances/{id}/console?local=true&follow={}{tail}", p.follow);
    let tls = match node.peer_tls() {
        Ok(t) => t,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    match crate::peer::get(&addr, &path, &node.peer_token, &tls).await {
        Ok(res) => {
            let status = res.status();
            let content_type = res.headers().get(axum::http::header::CONTENT_TYPE).cloned();
            let mut out = Response::new(Body::new(res.into_body()));
            *out.status_mut() = status;
            if let Some(ct) = content_type {
                out.headers_mut().insert(axum::http::header::CONTENT_TYPE, ct);
            }
            out
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("node {on:016x}, which holds the console, is unreachable: {}", super::chain(&e)),
        ),
    }
}

fn keep_tail(mut all: Vec<u8>, tail: Option<u64>) -> Vec<u8> {
    if let Some(t) = tail.and_then(|t| usize::try_from(t).ok()) {
        if all.len() > t {
            all.drain(..all.len() - t);
        }
    }
    all
}

fn local_console(
    node: Node,
    tenant: String,
    id: String,
    dir: InstanceDir,
    follow: bool,
    tail: Option<u64>,
) -> Response {
    let text = [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !follow {
        return (text, keep_tail(dir.read_console(), tail)).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut reader = Tail::default();
        let mut first = true;
        loop {
            // Whether the instance has ended for good (or is gone): then what is left is sent
            // and the answer ends, as `kubectl logs -f` ends with its container.
            let ended = {
                let state = node.agent.shared.state();
                state
                    .instances
                    .get(&(tenant.clone(), id.clone()))
                    .is_none_or(|i| i.is_final() || i.state == crate::state::objects::InstanceState::Lost)
            };
            let mut chunk = reader.read(&dir);
            if first {
                chunk = keep_tail(chunk, tail);
                first = false;
            }
            if !chunk.is_empty() && tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
            if ended {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    (text, Body::from_stream(stream)).into_response()
}

/// Follows the console files: what was read of the current file, and which file that was.
#[derive(Debug, Default)]
struct Tail {
    started: bool,
    inode: u64,
    offset: u64,
}

impl Tail {
    /// Everything new since the last read (on the first read, everything kept).
    fn read(&mut self, dir: &InstanceDir) -> Vec<u8> {
        use std::os::unix::fs::MetadataExt;
        if !self.started {
            self.started = true;
            let all = dir.read_console();
            if let Ok(m) = std::fs::metadata(dir.console()) {
                self.inode = m.ino();
                self.offset = m.len();
            }
            return all;
        }
        let Ok(m) = std::fs::metadata(dir.console()) else { return Vec::new() };
        let mut out = Vec::new();
        if m.ino() != self.inode {
            // Rotated: the rest of the file we were reading is now the previous one.
            if let Ok(prev) = std::fs::metadata(dir.console_previous()) {
                if prev.ino() == self.inode {
                    out.extend(read_from(&dir.console_previous(), self.offset));
                }
            }
            self.inode = m.ino();
            self.offset = 0;
        }
        if m.len() < self.offset {
            self.offset = 0;
        }
        let new = read_from(&dir.console(), self.offset);
        self.offset += new.len() as u64;
        out.extend(new);
        out
    }
}

fn read_from(path: &std::path::Path, offset: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.take(4 << 20).read_to_end(&mut out);
        }
    }
    out
}

/// Types the body on the guest's console, through the shim that feeds the VMM's terminal.
async fn type_input(
    State(node): State<Node>,
    Extension(who): Extension<Principal>,
    Path((tenant, id)): Path<(String, String)>,
    Query(p): Query<ConsoleParams>,
    body: Bytes,
) -> Response {
    if let Err(r) = who.require_tenant(&tenant) {
        return r;
    }
    if body.len() > MAX_INPUT {
        return error(StatusCode::PAYLOAD_TOO_LARGE, format!("at most {MAX_INPUT} bytes of input at a time"));
    }
    let (uid, on, api_addr) = match locate(&node, &tenant, &id) {
        Ok(found) => found,
        Err(r) => return r,
    };
    if on == Some(node.id()) || p.local {
        let socket = InstanceDir::new(&node.instances_dir, &uid).console_input();
        let typed = async {
            let mut s = crate::supervisor::vmm_api::connect_unix(&socket).await?;
            s.write_all(&body).await?;
            s.shutdown().await
        };
        return match typed.await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => {
                error(StatusCode::CONFLICT, format!("instance {id} takes no console input now (is it running?): {e}"))
            }
        };
    }
    let (Some(on), Some(addr)) = (on, api_addr) else {
        return error(StatusCode::CONFLICT, format!("instance {id} has not been placed on a node yet"));
    };
    let path = format!("/v1/tenants/{tenant}/instances/{id}/console?local=true");
    let tls = match node.peer_tls() {
        Ok(t) => t,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    match crate::peer::post(&addr, &path, &node.peer_token, body, &tls).await {
        Ok(res) => {
            let status = res.status();
            let bytes =
                http_body_util::BodyExt::collect(res.into_body()).await.map(|c| c.to_bytes()).unwrap_or_default();
            let mut out = Response::new(Body::from(bytes));
            *out.status_mut() = status;
            out.headers_mut()
                .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
            out
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("node {on:016x}, which runs the instance, is unreachable: {}", super::chain(&e)),
        ),
    }
}
