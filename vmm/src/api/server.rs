//! The API server: one thread that accepts connections on the Unix socket, parses requests with
//! `http`, answers them from `routes::ApiState`, and hands an InstanceStart to the VMM thread
//! (which owns the microVM) over a channel. Each connection gets a thread (at most
//! MAX_CONNECTIONS at once), so an idle or stalled client holds up nobody; a client that stalls
//! mid-request is dropped after a read timeout.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::http::{self, Response};
use super::routes::{ApiState, InstanceState, Outcome, SnapshotLoad};
use super::VmConfig;
use crate::metrics::MetricsSnapshot;
use crate::seccomp::{Seccomp, ThreadKind};
use crate::snapshot::SnapshotKind;
use std::path::PathBuf;

const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 16;

/// Errors setting up the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {0} already exists (remove it, or pick another path)")]
    SocketExists(String),
    #[error("cannot listen on API socket {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// The VMM thread's answer to a start: Ok carries a sender the API thread signals once the
/// 204 is on the wire, so that a guest which ends at once cannot end the process first.
pub type StartReply = Result<Sender<()>, String>;

/// What the API asks of the VMM thread.
#[derive(Debug)]
pub enum ApiRequest {
    /// Build and start a microVM.
    Start { config: VmConfig, reply: Sender<StartReply> },
    /// Pause (true) or resume (false) the running microVM.
    SetPaused { paused: bool, reply: Sender<Result<(), String>> },
    /// Write a snapshot of the paused microVM.
    CreateSnapshot { kind: SnapshotKind, state_path: PathBuf, mem_path: PathBuf, reply: Sender<Result<(), String>> },
    /// Build a microVM from a snapshot and start it (paused unless `load.resume`).
    LoadSnapshot { load: SnapshotLoad, reply: Sender<StartReply> },
    /// Collect the counters.
    Metrics { reply: Sender<MetricsSnapshot> },
    /// Change the log level and/or send logs to a file.
    Logger {
        level: Option<tracing_subscriber::filter::LevelFilter>,
        path: Option<PathBuf>,
        reply: Sender<Result<(), String>>,
    },
    /// Open the metrics file (before the start).
    MetricsFile { path: PathBuf, reply: Sender<Result<(), String>> },
    /// Append the counters to the metrics file.
    FlushMetrics { reply: Sender<Result<(), String>> },
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel { reply: Sender<Result<(), String>> },
}

/// The API thread's line to the VMM thread: requests, and an eventfd that wakes the VMM's
/// event loop when one is queued.
#[derive(Debug)]
pub struct VmmLink {
    pub tx: Sender<ApiRequest>,
    pub wake: vmm_sys_util::eventfd::EventFd,
}

impl VmmLink {
    fn send(&self, request: ApiRequest) -> bool {
        let ok = self.tx.send(request).is_ok();
        let _ = self.wake.write(1);
        ok
    }
}

/// Listens on `path`, which must not exist yet. The socket is bound under a temporary name and
/// renamed into place once it listens, so a client that waits for the path to appear never
/// finds a socket that refuses connections.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if path.exists() {
        return Err(ApiError::SocketExists(path.display().to_string()));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let bind_err = |source| ApiError::Bind { path: path.display().to_string(), source };
    let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(bind_err(e));
    }
    Ok(listener)
}

/// Serves the API on its own thread.
pub fn spawn(listener: UnixListener, link: VmmLink, seccomp: Seccomp) -> Result<std::thread::JoinHandle<()>, ApiError> {
    let starts = Arc::new(link);
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Connection threads started from here inherit the filter.
            if let Err(e) = crate::seccomp::install(ThreadKind::Api, seccomp) {
                tracing::error!(error = %crate::api::error_chain(&e), "api thread stops");
                return;
            }
            let state = Arc::new(Mutex::new(ApiState::default()));
            let open = Arc::new(AtomicUsize::new(0));
            for conn in listener.incoming() {
                let mut stream = match conn {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "api accept failed");
                        continue;
                    }
                };
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    let _ = stream.write_all(&Response::fault(503, "Too many API connections.").to_bytes());
                    continue;
                }
                let (state, starts, open2) = (state.clone(), starts.clone(), open.clone());
                let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
                    serve_connection(stream, &state, &starts);
                    open2.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    open.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .map_err(ApiError::Thread)
}

fn start(state: &mut ApiState, config: VmConfig, starts: &VmmLink) -> (Response, Option<Sender<()>>) {
    let (tx, rx) = channel();
    if !starts.send(ApiRequest::Start { config, reply: tx }) {
        return (Response::fault(500, "The VMM is not accepting a start."), None);
    }
    match rx.recv() {
        Ok(Ok(written)) => {
            state.state = InstanceState::Running;
            (Response::no_content(), Some(written))
        }
        Ok(Err(message)) => (Response::fault(400, message), None),
        Err(_) => (Response::fault(500, "The VMM stopped before answering."), None),
    }
}

fn load_snapshot(state: &mut ApiState, load: SnapshotLoad, link: &VmmLink) -> (Response, Option<Sender<()>>) {
    let (tx, rx) = channel();
    let resume = load.resume;
    if !link.send(ApiRequest::LoadSnapshot { load, reply: tx }) {
        return (Response::fault(500, "The VMM is not accepting requests."), None);
    }
    match rx.recv() {
        Ok(Ok(written)) => {
            state.state = if resume { InstanceState::Running } else { InstanceState::Paused };
            (Response::no_content(), Some(written))
        }
        Ok(Err(message)) => (Response::fault(400, message), None),
        Err(_) => (Response::fault(500, "The VMM stopped before answering."), None),
    }
}

fn create_snapshot(kind: SnapshotKind, state_path: PathBuf, mem_path: PathBuf, link: &VmmLink) -> Response {
    let (tx, rx) = channel();
    if !link.send(ApiRequest::CreateSnapshot { kind, state_path, mem_path, reply: tx }) {
        return Response::fault(500, "The VMM is not accepting requests.");
    }
    match rx.recv() {
        Ok(Ok(())) => Response::no_content(),
        Ok(Err(message)) => Response::fault(400, message),
        Err(_) => Response::fault(500, "The VMM stopped before answering."),
    }
}

fn ask(link: &VmmLink, make: impl FnOnce(Sender<Result<(), String>>) -> ApiRequest) -> Response {
    let (tx, rx) = channel();
    if !link.send(make(tx)) {
        return Response::fault(500, "The VMM is not accepting requests.");
    }
    match rx.recv() {
        Ok(Ok(())) => Response::no_content(),
        Ok(Err(message)) => Response::fault(400, message),
        Err(_) => Response::fault(500, "The VMM stopped before answering."),
    }
}

fn metrics(prometheus: bool, link: &VmmLink) -> Response {
    let (tx, rx) = channel();
    if !link.send(ApiRequest::Metrics { reply: tx }) {
        return Response::fault(500, "The VMM is not accepting requests.");
    }
    match rx.recv() {
        Ok(m) if prometheus => Response::prometheus(m.to_prometheus()),
        Ok(m) => Response::json(200, m.to_json()),
        Err(_) => Response::fault(500, "The VMM stopped before answering."),
    }
}

fn set_paused(state: &mut ApiState, paused: bool, link: &VmmLink) -> Response {
    let (tx, rx) = channel();
    if !link.send(ApiRequest::SetPaused { paused, reply: tx }) {
        return Response::fault(500, "The VMM is not accepting requests.");
    }
    match rx.recv() {
        Ok(Ok(())) => {
            state.state = if paused { InstanceState::Paused } else { InstanceState::Running };
            Response::no_content()
        }
        Ok(Err(message)) => Response::fault(400, message),
        Err(_) => Response::fault(500, "The VMM stopped before answering."),
    }
}

fn serve_connection(mut stream: UnixStream, state: &Mutex<ApiState>, starts: &VmmLink) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match http::parse(&buf) {
            Ok(Some((req, used))) => {
                buf.drain(..used);
                // The lock is held through a start, so no request sees a half-started VM.
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                let (response, written) = match st.handle(&req) {
                    Outcome::Reply(r) => (r, None),
                    Outcome::Start(config) => start(&mut st, config, starts),
                    Outcome::SetPaused(paused) => (set_paused(&mut st, paused, starts), None),
                    Outcome::CreateSnapshot { kind, state_path, mem_path } => {
                        (create_snapshot(kind, state_path, mem_path, starts), None)
                    }
                    Outcome::LoadSnapshot(load) => load_snapshot(&mut st, load, starts),
                    Outcome::Metrics { prometheus } => (metrics(prometheus, starts), None),
                    Outcome::MetricsFile(path) => (ask(starts, |reply| ApiRequest::MetricsFile { path, reply }), None),
                    Outcome::FlushMetrics => (ask(starts, |reply| ApiRequest::FlushMetrics { reply }), None),
                    Outcome::SendCtrlAltDel => (ask(starts, |reply| ApiRequest::SendCtrlAltDel { reply }), None),
                    Outcome::Logger { level, path } => {
                        (ask(starts, |reply| ApiRequest::Logger { level, path, reply }), None)
                    }
                };
                drop(st);
                tracing::debug!(method = %req.method, path = %req.path, status = response.status, "api request");
                let ok = stream.write_all(&response.to_bytes()).is_ok();
                if let Some(written) = written {
                    let _ = written.send(());
                }
                if !ok || req.close {
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = stream.write_all(&Response::fault(e.status(), &e).to_bytes());
                return;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return, // closed, or stalled past the timeout: drop the client
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
