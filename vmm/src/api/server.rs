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
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::http::{self, Response};
pub use super::request::VmmLink;
use super::request::{Unanswered, VmmAction, VmmData};
use super::routes::{ApiState, Outcome};
use crate::seccomp::{Seccomp, ThreadKind};

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
    // SAFETY: F_GETFL on a descriptor `stream` owns and keeps open; integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return false;
    }
    // SAFETY: F_SETFL on the same open descriptor, with the flags just read plus O_NONBLOCK.
    let set = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    set == 0
}

/// Answers one request, handing what needs the microVM to the VMM thread. A start's answer
/// carries a sender to signal once the 204 is written.
fn handle(state: &mut ApiState, req: &http::Request, link: &VmmLink) -> (Response, Option<Sender<()>>) {
    let action = match state.handle(req) {
        Outcome::Reply(r) => return (r, None),
        Outcome::Ask(action) => action,
    };
    let prometheus = matches!(action, VmmAction::Metrics { prometheus: true });
    match link.ask(action.clone()) {
        Ok(Ok(data)) => {
            state.succeeded(&action);
            match data {
                VmmData::Done => (Response::no_content(), None),
                VmmData::Started { written, restored } => {
                    if let Some(r) = restored {
                        state.restored(*r);
                    }
                    (Response::no_content(), Some(written))
                }
                VmmData::Metrics(m) if prometheus => (Response::prometheus(m.to_prometheus()), None),
                VmmData::Metrics(m) => (Response::json(200, m.to_json()), None),
                VmmData::Json(json) => (Response::json(200, json), None),
            }
        }
        Ok(Err(message)) => (Response::fault(400, message), None),
        Err(Unanswered::NotAccepting) => (Response::fault(500, "The VMM is not accepting requests."), None),
        Err(Unanswered::Stopped) => (Response::fault(500, "The VMM stopped before answering."), None),
    }
}
