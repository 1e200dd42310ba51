//! An instance's serial console: the output its node keeps in the instance directory, served by
//! any node (a node that does not run the instance asks the one that does). `?follow=true`
//! keeps the answer open and streams new output as it comes, across the file's rotation, until
//! the instance is gone or the client leaves.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use serde::Deserialize;

use super::{error, read_barrier, Node, Principal};
use crate::supervisor::layout::InstanceDir;

pub(super) fn routes() -> Router<Node> {
    Router::new().route("/v1/tenants/{tenant}/instances/{id}/console", get(console))
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
}

const POLL: Duration = Duration::from_millis(200);

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
    let (uid, on, api_addr) = {
        let s = node.agent.shared.state();
        let Some(inst) = s.instances.get(&(tenant.clone(), id.clone())) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("instance {:?} of tenant {tenant:?} does not exist", id.chars().take(80).collect::<String>()),
            );
        };
        let api_addr = inst.node.and_then(|n| s.nodes.get(&n)).map(|n| n.api_addr.clone());
        (inst.uid.clone(), inst.node, api_addr)
    };
    let dir = InstanceDir::new(&node.instances_dir, &uid);
    if on == Some(node.id()) || p.local {
        if !dir.path.exists() {
            return error(StatusCode::NOT_FOUND, format!("instance {id} has no console on this node yet"));
        }
        return local_console(node.clone(), tenant, id, dir, p.follow);
    }
    let (Some(on), Some(addr)) = (on, api_addr) else {
        return error(StatusCode::CONFLICT, format!("instance {id} has not been placed on a node yet"));
    };
    let path = format!("/v1/tenants/{tenant}/instances/{id}/console?local=true&follow={}", p.follow);
    match crate::peer::get(&addr, &path, &node.peer_token).await {
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

fn local_console(node: Node, tenant: String, id: String, dir: InstanceDir, follow: bool) -> Response {
    let text = [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !follow {
        return (text, dir.read_console()).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut tail = Tail::default();
        loop {
            let chunk = tail.read(&dir);
            if !chunk.is_empty() && tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
            let gone = !node.agent.shared.state().instances.contains_key(&(tenant.clone(), id.clone()));
            if gone && !dir.path.exists() {
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
