//! The API server: one thread that serves every connection on the Unix socket from its own poll
//! loop (as Firecracker's does), parses requests with `http`, answers them from
//! `routes::ApiState`, and hands what needs the microVM to the VMM thread over a channel.
//!
//! No thread is started once the thread's seccomp filter is on: a new thread's first allocation
//! creates a malloc arena, which makes glibc read `/sys/devices/system/cpu/online` — a call the
//! filter does not allow (a keep-alive client pool got the VMM killed that way). Connections are
//! non-blocking; an idle keep-alive connection holds up nobody, one that stalls in the middle of
//! a request is dropped after a timeout, and one beyond MAX_CONNECTIONS is answered 503.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::time::{Duration, Instant};

use super::http::{self, Response};
use super::routes::{ApiState, DevicePatch, InstanceState, Outcome, SnapshotLoad};
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
    /// Change a running device (another backing file, other rate limiters, a balloon target).
    PatchDevice { patch: DevicePatch, reply: Sender<Result<(), String>> },
    /// The balloon's state and the guest's statistics, as Firecracker's JSON.
    BalloonStats { reply: Sender<Result<String, String>> },
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
pub fn spawn(
    listener: UnixListener,
    link: VmmLink,
    seccomp: Seccomp,
    mmds: crate::devices::virtio::net::mmds::SharedStore,
) -> Result<std::thread::JoinHandle<()>, ApiError> {
    listener.set_nonblocking(true).map_err(ApiError::Thread)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Everything the loop allocates up front, and this thread's malloc arena, exist
            // before the filter goes on.
            let mut server = Server {
                listener,
                link,
                state: ApiState { mmds, ..ApiState::default() },
                conns: Vec::with_capacity(MAX_CONNECTIONS),
                fds: Vec::with_capacity(MAX_CONNECTIONS + 1),
                chunk: vec![0u8; 16 * 1024],
            };
            drop(vec![0u8; 1 << 20]);
            if let Err(e) = crate::seccomp::install(ThreadKind::Api, seccomp) {
                tracing::error!(error = %crate::api::error_chain(&e), "api thread stops");
                return;
            }
            server.run();
        })
        .map_err(ApiError::Thread)
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    /// Bytes received and not yet parsed.
    input: Vec<u8>,
    /// Bytes of answers not yet sent.
    output: Vec<u8>,
    /// Signalled once `output` is on the wire (the VMM thread waits for a start's 204).
    on_sent: Option<Sender<()>>,
    /// Close once `output` is sent.
    closing: bool,
    /// When the client last sent anything.
    active: Instant,
}

struct Server {
    listener: UnixListener,
    link: VmmLink,
    state: ApiState,
    conns: Vec<Conn>,
    fds: Vec<libc::pollfd>,
    chunk: Vec<u8>,
}

impl Server {
    fn run(&mut self) {
        loop {
            self.fds.clear();
            self.fds.push(libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            for c in &self.conns {
                let events = if c.output.is_empty() { libc::POLLIN } else { libc::POLLOUT };
                self.fds.push(libc::pollfd { fd: c.stream.as_raw_fd(), events, revents: 0 });
            }
            // SAFETY: fds is a valid array of pollfd structures of the length given.
            let n = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, 1000) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %std::io::Error::last_os_error(), "api poll failed; the api stops");
                return;
            }
            let ready: Vec<libc::c_short> = self.fds[1..].iter().map(|f| f.revents).collect();
            if self.fds[0].revents & libc::POLLIN != 0 {
                self.accept();
            }
            for (i, revents) in ready.into_iter().enumerate() {
                if revents != 0 {
                    self.serve(i, revents);
                }
            }
            let now = Instant::now();
            self.conns.retain(|c| {
                let stalled = !c.input.is_empty() && now.duration_since(c.active) > READ_TIMEOUT;
                let done = c.closing && c.output.is_empty();
                !(stalled || done)
            });
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "api accept failed");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                // Best effort: the client learns why, the connection goes.
                let _ = (&stream).write(&Response::fault(503, "Too many API connections.").to_bytes());
                continue;
            }
            if !set_nonblocking(&stream) {
                continue;
            }
            let conn = Conn {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                on_sent: None,
                closing: false,
                active: Instant::now(),
            };
            self.conns.push(conn);
        }
    }

    /// Reads what the client sent, answers every complete request, and sends what it can.
    fn serve(&mut self, i: usize, revents: libc::c_short) {
        if revents & libc::POLLIN != 0 || revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            loop {
                match self.conns[i].stream.read(&mut self.chunk) {
                    Ok(0) => {
                        self.conns[i].closing = true;
                        break;
                    }
                    Ok(n) => {
                        let c = &mut self.conns[i];
                        c.input.extend_from_slice(&self.chunk[..n]);
                        c.active = Instant::now();
                        if c.input.len() > http::MAX_HEAD + http::MAX_BODY + 1024 {
                            break; // Parse what is here; an over-long request is refused below.
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.conns[i].closing = true;
                        self.conns[i].output.clear();
                        return;
                    }
                }
            }
            // One request at a time: the next is parsed once this answer is sent.
            while self.conns[i].output.is_empty() && !self.conns[i].input.is_empty() {
                match http::parse(&self.conns[i].input) {
                    Ok(Some((req, used))) => {
                        self.conns[i].input.drain(..used);
                        let (response, on_sent) = handle(&mut self.state, &req, &self.link);
                        tracing::debug!(method = %req.method, path = %req.path, status = response.status, "api request");
                        let c = &mut self.conns[i];
                        c.output = response.to_bytes();
                        c.on_sent = on_sent;
                        c.closing |= req.close;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let c = &mut self.conns[i];
                        c.output = Response::fault(e.status(), &e).to_bytes();
                        c.input.clear();
                        c.closing = true;
                    }
                }
            }
        }
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        while !c.output.is_empty() {
            match c.stream.write(&c.output) {
                Ok(0) => break,
                Ok(n) => {
                    c.output.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    c.output.clear();
                    c.closing = true;
                    break;
                }
            }
        }
        if c.output.is_empty() {
            if let Some(sent) = c.on_sent.take() {
                let _ = sent.send(());
            }
        }
    }
}

/// O_NONBLOCK through fcntl: std's `set_nonblocking` uses an ioctl the filter does not allow.
fn set_nonblocking(stream: &UnixStream) -> bool {
    let fd = stream.as_raw_fd();
    // SAFETY: fcntl on a descriptor this thread owns, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    flags >= 0 && unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } == 0
}

/// Answers one request, handing what needs the microVM to the VMM thread.
fn handle(state: &mut ApiState, req: &http::Request, link: &VmmLink) -> (Response, Option<Sender<()>>) {
    match state.handle(req) {
        Outcome::Reply(r) => (r, None),
        Outcome::Start(config) => start(state, config, link),
        Outcome::SetPaused(paused) => (set_paused(state, paused, link), None),
        Outcome::CreateSnapshot { kind, state_path, mem_path } => {
            (create_snapshot(kind, state_path, mem_path, link), None)
        }
        Outcome::LoadSnapshot(load) => load_snapshot(state, load, link),
        Outcome::Metrics { prometheus } => (metrics(prometheus, link), None),
        Outcome::MetricsFile(path) => (ask(link, |reply| ApiRequest::MetricsFile { path, reply }), None),
        Outcome::FlushMetrics => (ask(link, |reply| ApiRequest::FlushMetrics { reply }), None),
        Outcome::SendCtrlAltDel => (ask(link, |reply| ApiRequest::SendCtrlAltDel { reply }), None),
        Outcome::Logger { level, path } => (ask(link, |reply| ApiRequest::Logger { level, path, reply }), None),
        Outcome::BalloonStats => {
            let (tx, rx) = channel();
            if !link.send(ApiRequest::BalloonStats { reply: tx }) {
                return (Response::fault(500, "The VMM is not accepting requests."), None);
            }
            let r = match rx.recv() {
                Ok(Ok(json)) => Response::json(200, json),
                Ok(Err(message)) => Response::fault(400, message),
                Err(_) => Response::fault(500, "The VMM stopped before answering."),
            };
            (r, None)
        }
        Outcome::PatchDevice(patch) => {
            let r = ask(link, |reply| ApiRequest::PatchDevice { patch: patch.clone(), reply });
            if r.status == 204 {
                state.applied(&patch);
            }
            (r, None)
        }
    }
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
