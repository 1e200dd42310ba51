//! Raft messages between nodes over mutual TLS 1.3. Each side presents its node certificate of
//! the cluster CA; the listener takes a connection's messages only if their `from` is the node
//! its certificate names (and that node is not revoked) and their `to` is this node. Frames are
//! `[u32 length][u8 kind][payload]`. Sending never blocks the Raft thread: each peer has a queue
//! drained by its own task, and messages that cannot be delivered are dropped (Raft retries) and
//! reported as unreachable.
//!
//! A snapshot travels on a connection of its own, so heartbeats and appends never wait behind
//! it: a head (the message without its data, and the data's length), the data in 1 MiB chunks
//! (TCP's window is the flow control: a slow receiver slows the sender, nothing piles up), and
//! an end. The receiver hands the whole message to its Raft thread and answers only once the
//! snapshot is applied there (or refused); the sender reports the outcome to Raft then.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::pki;
use super::raft_node::{InboxSender, Input};
use super::tls::{self, Tls};

/// Largest frame accepted (appends are at most 1 MiB of entries; a snapshot goes in chunks).
pub const MAX_FRAME: usize = 64 << 20;
/// Bytes of snapshot data per chunk frame.
pub const CHUNK: usize = 1 << 20;
/// Largest snapshot a receiver assembles (it is held in memory to be applied).
pub const MAX_SNAPSHOT: u64 = 16 << 30;
/// How long a sender waits for the receiver to apply a snapshot it has received whole.
const SNAPSHOT_APPLY_TIMEOUT: Duration = Duration::from_secs(120);

const KIND_MESSAGE: u8 = 0;
const KIND_SNAPSHOT_HEAD: u8 = 1;
const KIND_SNAPSHOT_CHUNK: u8 = 2;
const KIND_SNAPSHOT_END: u8 = 3;
const KIND_SNAPSHOT_ACK: u8 = 4;
const QUEUE_LEN: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest a TLS handshake may take (either side).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a connection re-checks that its peer is still admitted (not removed).
const RECHECK: Duration = Duration::from_secs(1);

/// Whether a peer presenting a certificate for node `id` with key hash `key` may speak.
pub type Admit = Arc<dyn Fn(u64, &str) -> bool + Send + Sync>;

/// Raft ids to the addresses their Raft listeners advertise (from gossip and node records).
pub type AddressBook = Arc<RwLock<HashMap<u64, SocketAddr>>>;

#[derive(Debug)]
pub struct RaftTransport {
    tls: Arc<Tls>,
    addrs: AddressBook,
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    runtime: tokio::runtime::Handle,
    reports: InboxSender,
}

impl RaftTransport {
    pub fn new(tls: Arc<Tls>, addrs: AddressBook, runtime: tokio::runtime::Handle, reports: InboxSender) -> Self {
        RaftTransport { tls, addrs, peers: Mutex::new(HashMap::new()), runtime, reports }
    }

    /// Queues a message for its destination; never blocks.
    pub fn send(&self, msg: Message) {
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            let link = PeerLink {
                to: msg.to,
                tls: self.tls.clone(),
                addrs: self.addrs.clone(),
                reports: self.reports.clone(),
            };
            self.runtime.spawn(async move { link.send_snapshot(msg).await });
            return;
        }
        let to = msg.to;
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let tx = peers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE_LEN);
            let link = PeerLink { to, tls: self.tls.clone(), addrs: self.addrs.clone(), reports: self.reports.clone() };
            self.runtime.spawn(link.run(rx));
            tx
        });
        if let Err(e) = tx.try_send(msg) {
            let msg = match e {
                mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
            };
            report_failure(&self.reports, &msg);
        }
    }
}

fn report_failure(reports: &InboxSender, msg: &Message) {
    // A full inbox drops the report: Raft probes an unreachable peer again by itself.
    let _ = reports.try_send(Input::Unreachable(msg.to));
    if msg.get_msg_type() == MessageType::MsgSnapshot {
        let _ = reports.try_send(Input::SnapshotStatus { to: msg.to, ok: false });
    }
}

type PeerStream = BufWriter<tokio_rustls::client::TlsStream<TcpStream>>;

struct PeerLink {
    to: u64,
    tls: Arc<Tls>,
    addrs: AddressBook,
    reports: InboxSender,
}

impl PeerLink {
    /// TCP, then TLS verifying that the listener is node `to` of this cluster's CA.
    async fn connect(&self) -> Option<PeerStream> {
        let configs = self.tls.configs()?;
        let addr = self.addrs.read().unwrap_or_else(|e| e.into_inner()).get(&self.to).copied()?;
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(to = self.to, %addr, error = %e, "raft peer unreachable");
                return None;
            }
            Err(_) => return None,
        };
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(configs.client.clone());
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(tls::peer_name(self.to), tcp)).await {
            Ok(Ok(s)) => Some(BufWriter::new(s)),
            Ok(Err(e)) => {
                warn!(to = %format!("{:016x}", self.to), %addr, error = %e, "raft peer refused: TLS handshake failed");
                None
            }
            Err(_) => None,
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut conn: Option<PeerStream> = None;
        while let Some(first) = rx.recv().await {
            if conn.is_none() {
                conn = self.connect().await;
            }
            let Some(stream) = conn.as_mut() else {
                // Drop what queued up while we were failing: Raft resends what still matters.
                report_failure(&self.reports, &first);
                while let Ok(m) = rx.try_recv() {
                    report_failure(&self.reports, &m);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let mut batch = vec![first];
            while batch.len() < 64 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let mut failed = false;
            for m in &batch {
                if write_frame(stream, m).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if !failed && stream.flush().await.is_err() {
                failed = true;
            }
            if failed {
                conn = None;
                for m in &batch {
                    report_failure(&self.reports, m);
                }
                continue;
            }
        }
    }

    /// Streams a snapshot on its own connection and reports whether the receiver applied it.
    async fn send_snapshot(self, msg: Message) {
        let to = msg.to;
        let ok = match self.stream_snapshot(msg).await {
            Ok(applied) => applied,
            Err(e) => {
                warn!(to = %format!("{to:016x}"), error = %e, "snapshot not delivered");
                let _ = self.reports.try_send(Input::Unreachable(to));
                false
            }
        };
        let _ = self.reports.try_send(Input::SnapshotStatus { to, ok });
    }

    async fn stream_snapshot(&self, mut msg: Message) -> std::io::Result<bool> {
        let mut stream = self.connect().await.ok_or_else(|| std::io::Error::other("peer unreachable"))?;
        let data = std::mem::take(&mut msg.mut_snapshot().data);
        let head = msg.write_to_bytes().map_err(std::io::Error::other)?;
        let mut payload = (data.len() as u64).to_be_bytes().to_vec();
        payload.extend_from_slice(&head);
        write_raw(&mut stream, KIND_SNAPSHOT_HEAD, &payload).await?;
        for chunk in data.chunks(CHUNK) {
            write_raw(&mut stream, KIND_SNAPSHOT_CHUNK, chunk).await?;
        }
        write_raw(&mut stream, KIND_SNAPSHOT_END, &[]).await?;
        stream.flush().await?;
        let mut ack = [0u8; 6];
        tokio::time::timeout(SNAPSHOT_APPLY_TIMEOUT, stream.read_exact(&mut ack))
            .await
            .map_err(|_| std::io::Error::other("the receiver did not apply the snapshot in time"))??;
        if ack[..5] != [0, 0, 0, 2, KIND_SNAPSHOT_ACK] {
            return Err(std::io::Error::other("not a snapshot acknowledgement"));
        }
        Ok(ack[5] == 1)
    }
}

async fn write_raw<W: AsyncWrite + Unpin>(stream: &mut W, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    stream.write_all(&((payload.len() + 1) as u32).to_be_bytes()).await?;
    stream.write_all(&[kind]).await?;
    stream.write_all(payload).await
}

async fn write_frame<W: AsyncWrite + Unpin>(stream: &mut W, m: &Message) -> std::io::Result<()> {
    let payload = m.write_to_bytes().map_err(std::io::Error::other)?;
    if payload.len() >= MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "a raft message of {} bytes is over the frame limit",
            payload.len()
        )));
    }
    write_raw(stream, KIND_MESSAGE, &payload).await
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("frame is not a raft message")]
    Decode(#[source] protobuf::ProtobufError),
    #[error("frame of unknown kind {0}, or out of order")]
    Kind(u8),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("connection")]
    Io(#[from] std::io::Error),
}

/// One frame: its kind and payload; `Ok(None)` at a clean end of stream.
pub async fn read_raw<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(u8, Vec<u8>)>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Kind(0xff));
    }
    let mut kind = [0u8; 1];
    r.read_exact(&mut kind).await?;
    let mut payload = vec![0u8; len - 1];
    r.read_exact(&mut payload).await?;
    Ok(Some((kind[0], payload)))
}

/// Reads one message frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>, FrameError> {
    match read_raw(r).await? {
        None => Ok(None),
        Some((KIND_MESSAGE, payload)) => Message::parse_from_bytes(&payload).map(Some).map_err(FrameError::Decode),
        Some((kind, _)) => Err(FrameError::Kind(kind)),
    }
}

/// What arrives on a connection: a message, or a whole snapshot message.
enum Incoming {
    Message(Message),
    Snapshot(Message),
}

/// Reads the next message, assembling a snapshot from its chunks (each frame within `limits`).
async fn read_incoming<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &ListenerLimits,
) -> Result<Option<Incoming>, FrameError> {
    let Some((kind, payload)) = read_raw_within(r, limits).await? else { return Ok(None) };
    match kind {
        KIND_MESSAGE => {
            Message::parse_from_bytes(&payload).map(|m| Some(Incoming::Message(m))).map_err(FrameError::Decode)
        }
        KIND_SNAPSHOT_HEAD => {
            if payload.len() < 8 {
                return Err(FrameError::Snapshot("truncated head".into()));
            }
            let total = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
            if total > MAX_SNAPSHOT {
                return Err(FrameError::Snapshot(format!("{total} bytes is over the {MAX_SNAPSHOT}-byte limit")));
            }
            let mut msg = Message::parse_from_bytes(&payload[8..]).map_err(FrameError::Decode)?;
            if msg.get_msg_type() != MessageType::MsgSnapshot {
                return Err(FrameError::Snapshot("the head is not a snapshot message".into()));
            }
            // Grows with what arrives: a head cannot make the receiver reserve memory by itself.
            let mut data = Vec::with_capacity((total as usize).min(MAX_FRAME));
            loop {
                match read_raw_within(r, limits).await? {
                    Some((KIND_SNAPSHOT_CHUNK, chunk)) if data.len() as u64 + chunk.len() as u64 <= total => {
                        data.extend_from_slice(&chunk)
                    }
                    Some((KIND_SNAPSHOT_CHUNK, _)) => {
                        return Err(FrameError::Snapshot("more data than announced".into()))
                    }
                    Some((KIND_SNAPSHOT_END, _)) if data.len() as u64 == total => break,
                    Some((KIND_SNAPSHOT_END, _)) => {
                        return Err(FrameError::Snapshot("less data than announced".into()))
                    }
                    Some((k, _)) => return Err(FrameError::Kind(k)),
                    None => return Err(FrameError::Snapshot("the connection ended inside a snapshot".into())),
                }
            }
            msg.mut_snapshot().data = data.into();
            Ok(Some(Incoming::Snapshot(msg)))
        }
        k => Err(FrameError::Kind(k)),
    }
}

/// What the Raft listener allows a peer before the connection is closed.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Connections served at once; one more is closed on accept.
    pub max_connections: usize,
    /// Longest wait for the next frame to start (a follower's link to another follower may be
    /// quiet for long; a closed one is reopened by the sender on its next message).
    pub idle: Duration,
    /// Longest a started frame may take to arrive whole.
    pub frame: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits { max_connections: 128, idle: Duration::from_secs(300), frame: Duration::from_secs(60) }
    }
}

/// Reads one frame within `limits`: `Ok(None)` at a clean end of stream or after `idle`.
async fn read_raw_within<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &ListenerLimits,
) -> Result<Option<(u8, Vec<u8>)>, FrameError> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.idle, r.read(&mut first)).await {
        Err(_) | Ok(Ok(0)) => return Ok(None),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    let mut whole = (&first[..]).chain(&mut *r);
    match tokio::time::timeout(limits.frame, read_raw(&mut whole)).await {
        Ok(Ok(Some(f))) => Ok(Some(f)),
        Ok(Ok(None)) => Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(FrameError::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

/// What the listener needs: this node's TLS, who it is, who may speak, where messages go.
#[derive(Clone)]
pub struct ListenerParts {
    pub tls: Arc<Tls>,
    pub me: u64,
    pub admit: Admit,
    pub inbox: InboxSender,
}

impl std::fmt::Debug for ListenerParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerParts").field("me", &self.me).finish_non_exhaustive()
    }
}

/// Accepts Raft connections and hands authenticated messages addressed to `me` to the Raft thread.
pub async fn serve(listener: TcpListener, parts: ListenerParts) {
    serve_within(listener, parts, ListenerLimits::default()).await
}

/// `serve` with explicit limits.
pub async fn serve_within(listener: TcpListener, parts: ListenerParts, limits: ListenerLimits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, max = limits.max_connections, "raft connection refused: too many connections");
            drop(stream);
            continue;
        };
        let parts = parts.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, peer, parts, limits).await;
        });
    }
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, parts: ListenerParts, limits: ListenerLimits) {
    // Without an identity (not yet joined) nobody is served: there is nothing to verify with.
    let Some(configs) = parts.tls.configs() else { return };
    let acceptor = tokio_rustls::TlsAcceptor::from(configs.raft_server.clone());
    let mut stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "raft connection refused: TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
    let identity = cert.as_deref().and_then(|c| Some((pki::cert_node_id(c)?, pki::cert_key_hash(c)?)));
    let Some((from, key)) = identity else {
        warn!(%peer, "raft connection refused: the certificate names no node");
        return;
    };
    let admitted = |parts: &ListenerParts| (parts.admit)(from, &key);
    if !admitted(&parts) {
        warn!(%peer, node = %format!("{from:016x}"), "raft connection refused: the node was removed from the cluster");
        return;
    }
    let mut checked = Instant::now();
    let mut misaddressed = false;
    loop {
        let m = match read_incoming(&mut stream, &limits).await {
            Ok(Some(Incoming::Snapshot(m))) if m.to == parts.me && m.from == from => {
                // Handed over whole; answered once the Raft thread has applied it (or not).
                let (tx, rx) = tokio::sync::oneshot::channel();
                if parts.inbox.try_send(Input::Snapshot { msg: m, applied: tx }).is_err() {
                    return;
                }
                let applied =
                    tokio::time::timeout(SNAPSHOT_APPLY_TIMEOUT, rx).await.ok().and_then(|r| r.ok()).unwrap_or(false);
                if write_raw(&mut stream, KIND_SNAPSHOT_ACK, &[applied as u8]).await.is_err()
                    || stream.flush().await.is_err()
                {
                    return;
                }
                continue;
            }
            Ok(Some(Incoming::Snapshot(m))) => {
                warn!(%peer, node = %format!("{from:016x}"), to = m.to, claimed = %format!("{:016x}", m.from),
                    "raft connection closed: a snapshot not from its peer or not for this node");
                return;
            }
            Ok(Some(Incoming::Message(m))) => Ok(Some(m)),
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match m {
            // A message for another node (an address gossip had wrong) must not count here:
            // raft-rs counts votes by `from` and `to`.
            Ok(Some(m)) if m.to != parts.me => {
                if !misaddressed {
                    warn!(%peer, to = m.to, me = parts.me, "raft message for another node dropped");
                    misaddressed = true;
                }
            }
            Ok(Some(m)) if m.from != from => {
                warn!(%peer, node = %format!("{from:016x}"), claimed = %format!("{:016x}", m.from),
                    "raft connection closed: its peer spoke for another node");
                return;
            }
            Ok(Some(m)) => {
                if checked.elapsed() >= RECHECK {
                    if !admitted(&parts) {
                        warn!(%peer, node = %format!("{from:016x}"), "raft connection closed: the node was removed");
                        return;
                    }
                    checked = Instant::now();
                }
                match parts.inbox.try_send(Input::Message(m)) {
                    Ok(()) => {}
                    // A full inbox sheds the message: Raft resends what still matters.
                    Err(std::sync::mpsc::TrySendError::Full(_)) => {}
                    Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
                }
            }
            Ok(None) => return,
            Err(FrameError::Io(_)) => return,
            Err(e) => {
                warn!(%peer, error = %e, "raft connection refused");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::pki::Identity;
    use crate::cluster::tls::Configs;

    struct Ca(pki::NewCa);

    impl Ca {
        fn new() -> Ca {
            Ca(pki::new_ca("test").unwrap())
        }

        fn identity(&self, node: u64) -> Identity {
            let key = pki::new_node_key().unwrap();
            let csr = pki::csr_der(node, &key).unwrap();
            let cert = pki::issue(&self.0.cert_pem, &self.0.key_pem, node, &csr, &[]).unwrap();
            Identity { node, ca_pem: self.0.cert_pem.clone(), cert_pem: cert, key_pem: key.serialize_pem() }
        }

        fn tls(&self, node: u64) -> (tempfile::TempDir, Arc<Tls>) {
            let dir = tempfile::tempdir().unwrap();
            let tls = Tls::open(dir.path(), node, vec![]).unwrap();
            tls.install(self.identity(node), &crate::cluster::secret::ClusterSecret::new("transport-test")).unwrap();
            (dir, Arc::new(tls))
        }
    }

    fn frame(m: &Message) -> Vec<u8> {
        let payload = m.write_to_bytes().unwrap();
        let mut out = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        out.push(KIND_MESSAGE);
        out.extend_from_slice(&payload);
        out
    }

    type Client = tokio_rustls::client::TlsStream<TcpStream>;

    /// Connects to the listener at `addr` (node `to`) as the holder of `identity`.
    async fn dial(addr: SocketAddr, to: u64, identity: Identity) -> std::io::Result<Client> {
        let configs = Configs::new(identity).unwrap();
        let tcp = TcpStream::connect(addr).await?;
        tokio_rustls::TlsConnector::from(configs.client.clone()).connect(tls::peer_name(to), tcp).await
    }

    /// Whether the listener closed `s` (EOF or reset) within `within`.
    async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(within, s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }

    fn msg(from: u64, to: u64, term: u64) -> Message {
        Message { from, to, term, ..Default::default() }
    }

    struct Listening {
        addr: SocketAddr,
        rx: std::sync::mpsc::Receiver<Input>,
        revoked: Arc<Mutex<Vec<u64>>>,
        _dir: tempfile::TempDir,
    }

    async fn listen(ca: &Ca, me: u64, limits: ListenerLimits) -> Listening {
        let (dir, tls) = ca.tls(me);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        let revoked = Arc::new(Mutex::new(Vec::new()));
        let r = revoked.clone();
        let admit: Admit = Arc::new(move |id, _key| !r.lock().unwrap().contains(&id));
        tokio::spawn(serve_within(listener, ListenerParts { tls, me, admit, inbox: tx }, limits));
        Listening { addr, rx, revoked, _dir: dir }
    }

    fn terms(rx: &std::sync::mpsc::Receiver<Input>, n: usize) -> Vec<u64> {
        (0..n)
            .map(|_| match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
                Input::Message(m) => m.term,
                other => panic!("unexpected input {other:?}"),
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_speaks_only_for_the_node_its_certificate_names() {
        let ca = Ca::new();
        let l = listen(&ca, 7, ListenerLimits::default()).await;
        let mut a = dial(l.addr, 7, ca.identity(1)).await.unwrap();
        // From node 1, to us: delivered; to node 8: dropped, the connection kept.
        for m in [msg(1, 7, 1), msg(1, 8, 2), msg(1, 7, 3)] {
            a.write_all(&frame(&m)).await.unwrap();
        }
        a.flush().await.unwrap();
        assert_eq!(terms(&l.rx, 2), [1, 3]);
        assert!(l.rx.recv_timeout(Duration::from_millis(100)).is_err(), "the message for node 8 was delivered");
        // Node 1 claiming to be node 2 (a forged vote grant): not delivered, connection closed.
        a.write_all(&frame(&msg(2, 7, 4))).await.unwrap();
        a.flush().await.unwrap();
        assert!(closed_within(&mut a, Duration::from_secs(2)).await, "a peer spoke for another node");
        assert!(l.rx.recv_timeout(Duration::from_millis(100)).is_err(), "the forged message was delivered");

        // A certificate of another CA, and no certificate at all, get no connection.
        let stranger = Ca::new().identity(1);
        let mut s = dial(l.addr, 7, stranger).await;
        if let Ok(s) = s.as_mut() {
            let _ = s.write_all(&frame(&msg(1, 7, 5))).await;
            let _ = s.flush().await;
            assert!(closed_within(s, Duration::from_secs(2)).await);
        }
        let tcp = TcpStream::connect(l.addr).await.unwrap();
        let anonymous = tls::client_trusting(&ca.0.cert_pem).unwrap();
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(anonymous)).connect(tls::peer_name(7), tcp).await;
        if let Ok(s) = s.as_mut() {
            let _ = s.write_all(&frame(&msg(1, 7, 6))).await;
            let _ = s.flush().await;
            assert!(closed_within(s, Duration::from_secs(2)).await);
        }
        assert!(l.rx.recv_timeout(Duration::from_millis(200)).is_err(), "a stranger's message was delivered");

        // Dialing node 7's address expecting node 9: our side refuses the listener.
        assert!(dial(l.addr, 9, ca.identity(1)).await.is_err(), "a listener was taken for another node");

        // A removed node: its open connection closes, and it cannot connect again.
        let mut b = dial(l.addr, 7, ca.identity(3)).await.unwrap();
        b.write_all(&frame(&msg(3, 7, 10))).await.unwrap();
        b.flush().await.unwrap();
        assert_eq!(terms(&l.rx, 1), [10]);
        l.revoked.lock().unwrap().push(3);
        tokio::time::sleep(RECHECK + Duration::from_millis(100)).await;
        b.write_all(&frame(&msg(3, 7, 11))).await.unwrap();
        b.flush().await.unwrap();
        assert!(closed_within(&mut b, Duration::from_secs(2)).await, "a removed node's connection stayed open");
        let mut c = dial(l.addr, 7, ca.identity(3)).await.unwrap();
        let _ = c.write_all(&frame(&msg(3, 7, 12))).await;
        let _ = c.flush().await;
        assert!(closed_within(&mut c, Duration::from_secs(2)).await);
        assert!(l.rx.recv_timeout(Duration::from_millis(100)).is_err(), "a removed node's message was delivered");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_listener_bounds_connections_and_time() {
        let ca = Ca::new();
        let limits =
            ListenerLimits { max_connections: 2, idle: Duration::from_millis(300), frame: Duration::from_millis(300) };
        let l = listen(&ca, 7, limits).await;
        let mut a = dial(l.addr, 7, ca.identity(1)).await.unwrap();
        a.write_all(&frame(&msg(1, 7, 1))).await.unwrap();
        a.flush().await.unwrap();
        assert_eq!(terms(&l.rx, 1), [1]);
        // A frame that starts and never ends is dropped after `frame`.
        let mut b = dial(l.addr, 7, ca.identity(2)).await.unwrap();
        b.write_all(&[0, 0, 1, 0]).await.unwrap();
        b.flush().await.unwrap();
        // Two connections are open: a third is closed at once (before any handshake).
        let mut c = TcpStream::connect(l.addr).await.unwrap();
        assert!(closed_within(&mut c, Duration::from_millis(300)).await, "a third connection was served");
        assert!(closed_within(&mut b, Duration::from_secs(2)).await, "a stalled frame kept its connection");
        // A quiet connection is closed after `idle`, and frees its slot.
        assert!(closed_within(&mut a, Duration::from_secs(2)).await, "an idle connection stayed open");
        let mut d = dial(l.addr, 7, ca.identity(1)).await.unwrap();
        d.write_all(&frame(&msg(1, 7, 9))).await.unwrap();
        d.flush().await.unwrap();
        assert_eq!(terms(&l.rx, 1), [9]);
    }

    /// A snapshot larger than any frame arrives whole on its own connection, and the sender
    /// learns that it was applied only when the receiver says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_over_the_frame_limit_streams_in_chunks_and_reports_the_receivers_outcome() {
        let ca = Ca::new();
        let l = listen(&ca, 7, ListenerLimits::default()).await;
        let (_dir, tls) = ca.tls(1);
        let addrs: AddressBook = Arc::new(RwLock::new([(7, l.addr)].into()));
        let (reports, report_rx) = std::sync::mpsc::sync_channel(64);
        let transport = RaftTransport::new(tls, addrs, tokio::runtime::Handle::current(), reports);
        // An ordinary message goes on the peer's own connection.
        transport.send(msg(1, 7, 2));
        assert!(matches!(l.rx.recv_timeout(Duration::from_secs(10)), Ok(Input::Message(m)) if m.term == 2));
        let data: Vec<u8> = (0..(MAX_FRAME + 5 * CHUNK + 123)).map(|i| (i % 251) as u8).collect();
        for applied in [true, false] {
            let mut m = Message { from: 1, to: 7, term: 3, ..Default::default() };
            m.set_msg_type(MessageType::MsgSnapshot);
            m.mut_snapshot().mut_metadata().index = 42;
            m.mut_snapshot().data = data.clone().into();
            transport.send(m);
            // Blocking one of the two workers: the transfer runs on the other.
            let got = l.rx.recv_timeout(Duration::from_secs(30)).unwrap();
            let Input::Snapshot { msg, applied: ack } = got else { panic!("not a snapshot: {got:?}") };
            assert_eq!((msg.from, msg.get_snapshot().get_metadata().index), (1, 42));
            assert!(msg.get_snapshot().data[..] == data[..], "the snapshot data differs");
            // Nothing is reported before the receiver has answered.
            assert!(report_rx.recv_timeout(Duration::from_millis(200)).is_err());
            ack.send(applied).unwrap();
            match report_rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                Input::SnapshotStatus { to: 7, ok } => assert_eq!(ok, applied),
                other => panic!("unexpected report {other:?}"),
            }
        }
    }

    fn raw(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
        out.push(kind);
        out.extend_from_slice(payload);
        out
    }

    fn head(total: u64, m: &Message) -> Vec<u8> {
        let mut p = total.to_be_bytes().to_vec();
        p.extend_from_slice(&m.write_to_bytes().unwrap());
        raw(KIND_SNAPSHOT_HEAD, &p)
    }

    #[tokio::test]
    async fn a_snapshot_stream_that_lies_about_its_size_or_kind_is_refused() {
        let limits = ListenerLimits::default();
        let mut snap = Message::default();
        snap.set_msg_type(MessageType::MsgSnapshot);
        let whole = [
            head(3, &snap),
            raw(KIND_SNAPSHOT_CHUNK, b"ab"),
            raw(KIND_SNAPSHOT_CHUNK, b"c"),
            raw(KIND_SNAPSHOT_END, b""),
        ]
        .concat();
        match read_incoming(&mut &whole[..], &limits).await {
            Ok(Some(Incoming::Snapshot(m))) => assert_eq!(&m.get_snapshot().data[..], b"abc"),
            _ => panic!("a well-formed snapshot was refused"),
        }
        let cases: [(&str, Vec<u8>); 5] = [
            ("more data", [head(2, &snap), raw(KIND_SNAPSHOT_CHUNK, b"abc")].concat()),
            ("less data", [head(4, &snap), raw(KIND_SNAPSHOT_CHUNK, b"abc"), raw(KIND_SNAPSHOT_END, b"")].concat()),
            ("too large", head(MAX_SNAPSHOT + 1, &snap)),
            ("not a snapshot head", head(1, &Message::default())),
            ("cut off", [head(3, &snap), raw(KIND_SNAPSHOT_CHUNK, b"ab")].concat()),
        ];
        for (what, bytes) in cases {
            assert!(read_incoming(&mut &bytes[..], &limits).await.is_err(), "{what} was taken");
        }
        let stray = raw(KIND_SNAPSHOT_CHUNK, b"x");
        assert!(matches!(read_incoming(&mut &stray[..], &limits).await, Err(FrameError::Kind(KIND_SNAPSHOT_CHUNK))));
    }

    #[tokio::test]
    async fn frames_are_bounded_and_must_decode() {
        let good = frame(&msg(1, 2, 5));
        assert_eq!(read_frame(&mut &good[..]).await.unwrap().unwrap().term, 5);
        let huge = [0xffu8, 0xff, 0xff, 0xff];
        assert!(matches!(read_frame(&mut &huge[..]).await, Err(FrameError::TooLarge(_))));
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 1);
        assert!(matches!(read_frame(&mut &truncated[..]).await, Err(FrameError::Io(_))));
        let junk = b"\x0a\xff\xff\xff\xff\xff";
        let mut f = ((junk.len() + 1) as u32).to_be_bytes().to_vec();
        f.push(KIND_MESSAGE);
        f.extend_from_slice(junk);
        assert!(matches!(read_frame(&mut &f[..]).await, Err(FrameError::Decode(_))));
        assert!(read_frame(&mut &[][..]).await.unwrap().is_none());
    }
}
