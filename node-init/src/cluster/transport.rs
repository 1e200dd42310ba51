//! Raft messages between nodes over TCP. Each frame is `[u32 length][32-byte HMAC][protobuf
//! message]`; a frame whose tag does not verify under the cluster secret closes the connection, so
//! a node without the secret cannot take part in consensus. Sending never blocks the Raft thread:
//! each peer has a queue drained by its own task, and messages that cannot be delivered are
//! dropped (Raft retries) and reported as unreachable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::raft_node::Input;
use super::secret::{PurposeKey, TAG_LEN};

/// Largest frame accepted (a snapshot of the whole state travels in one message).
pub const MAX_FRAME: usize = 64 << 20;
const QUEUE_LEN: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Raft ids to the addresses their Raft listeners advertise (from gossip and node records).
pub type AddressBook = Arc<RwLock<HashMap<u64, SocketAddr>>>;

#[derive(Debug)]
pub struct RaftTransport {
    key: PurposeKey,
    addrs: AddressBook,
    peers: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    runtime: tokio::runtime::Handle,
    reports: std::sync::mpsc::Sender<Input>,
}

impl RaftTransport {
    pub fn new(
        key: PurposeKey,
        addrs: AddressBook,
        runtime: tokio::runtime::Handle,
        reports: std::sync::mpsc::Sender<Input>,
    ) -> Self {
        RaftTransport { key, addrs, peers: Mutex::new(HashMap::new()), runtime, reports }
    }

    /// Queues a message for its destination; never blocks.
    pub fn send(&self, msg: Message) {
        let to = msg.to;
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let tx = peers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE_LEN);
            let link = PeerLink { to, key: self.key.clone(), addrs: self.addrs.clone(), reports: self.reports.clone() };
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

fn report_failure(reports: &std::sync::mpsc::Sender<Input>, msg: &Message) {
    let _ = reports.send(Input::Unreachable(msg.to));
    if msg.get_msg_type() == MessageType::MsgSnapshot {
        let _ = reports.send(Input::SnapshotStatus { to: msg.to, ok: false });
    }
}

struct PeerLink {
    to: u64,
    key: PurposeKey,
    addrs: AddressBook,
    reports: std::sync::mpsc::Sender<Input>,
}

impl PeerLink {
    async fn connect(&self) -> Option<BufWriter<TcpStream>> {
        let addr = self.addrs.read().unwrap_or_else(|e| e.into_inner()).get(&self.to).copied()?;
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Some(BufWriter::new(s))
            }
            Ok(Err(e)) => {
                debug!(to = self.to, %addr, error = %e, "raft peer unreachable");
                None
            }
            Err(_) => None,
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut conn: Option<BufWriter<TcpStream>> = None;
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
                if write_frame(stream, &self.key, m).await.is_err() {
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
            for m in batch.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot) {
                let _ = self.reports.send(Input::SnapshotStatus { to: m.to, ok: true });
            }
        }
    }
}

async fn write_frame(stream: &mut BufWriter<TcpStream>, key: &PurposeKey, m: &Message) -> std::io::Result<()> {
    let payload = m.write_to_bytes().map_err(std::io::Error::other)?;
    stream.write_all(&(payload.len() as u32).to_be_bytes()).await?;
    stream.write_all(&key.tag(&payload)).await?;
    stream.write_all(&payload).await
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("frame tag does not verify: the sender does not hold the cluster secret")]
    BadTag,
    #[error("frame is not a raft message")]
    Decode(#[source] protobuf::ProtobufError),
    #[error("connection")]
    Io(#[from] std::io::Error),
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R, key: &PurposeKey) -> Result<Option<Message>, FrameError> {
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
    let mut tag = [0u8; TAG_LEN];
    r.read_exact(&mut tag).await?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if !key.verify(&payload, &tag) {
        return Err(FrameError::BadTag);
    }
    Message::parse_from_bytes(&payload).map(Some).map_err(FrameError::Decode)
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
async fn read_frame_within<R: AsyncReadExt + Unpin>(
    r: &mut R,
    key: &PurposeKey,
    limits: &ListenerLimits,
) -> Result<Option<Message>, FrameError> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.idle, r.read(&mut first)).await {
        Err(_) | Ok(Ok(0)) => return Ok(None),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) => {}
    }
    let mut whole = (&first[..]).chain(&mut *r);
    match tokio::time::timeout(limits.frame, read_frame(&mut whole, key)).await {
        Ok(Ok(Some(m))) => Ok(Some(m)),
        Ok(Ok(None)) => Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(FrameError::Io(std::io::ErrorKind::TimedOut.into())),
    }
}

/// Accepts Raft connections and hands verified messages addressed to `me` to the Raft thread.
pub async fn serve(listener: TcpListener, key: PurposeKey, inbox: std::sync::mpsc::Sender<Input>, me: u64) {
    serve_within(listener, key, inbox, me, ListenerLimits::default()).await
}

/// `serve` with explicit limits.
pub async fn serve_within(
    listener: TcpListener,
    key: PurposeKey,
    inbox: std::sync::mpsc::Sender<Input>,
    me: u64,
    limits: ListenerLimits,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, max = limits.max_connections, "raft connection refused: too many connections");
            drop(stream);
            continue;
        };
        let key = key.clone();
        let inbox = inbox.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut misaddressed = false;
            loop {
                match read_frame_within(&mut stream, &key, &limits).await {
                    // A message for another node (an address gossip had wrong, or a replay
                    // aimed elsewhere) must not count here: raft-rs counts votes by `from`.
                    Ok(Some(m)) if m.to != me => {
                        if !misaddressed {
                            warn!(%peer, to = m.to, me, "raft message for another node dropped");
                            misaddressed = true;
                        }
                    }
                    Ok(Some(m)) => {
                        if inbox.send(Input::Message(m)).is_err() {
                            return;
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
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::secret::ClusterSecret;

    fn frame(key: &PurposeKey, m: &Message) -> Vec<u8> {
        let payload = m.write_to_bytes().unwrap();
        let mut out = (payload.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&key.tag(&payload));
        out.extend_from_slice(&payload);
        out
    }

    /// Whether the listener closed `s` (EOF or reset) within `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(within, s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_listener_bounds_connections_and_time_and_drops_messages_for_other_nodes() {
        let key = ClusterSecret::new("s").key("raft");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let limits =
            ListenerLimits { max_connections: 2, idle: Duration::from_millis(300), frame: Duration::from_millis(300) };
        tokio::spawn(serve_within(listener, key.clone(), tx, 7, limits));

        // Addressed to us: delivered; to node 8: dropped, the connection kept.
        let mut a = TcpStream::connect(addr).await.unwrap();
        for (to, term) in [(7, 1), (8, 2), (7, 3)] {
            a.write_all(&frame(&key, &Message { from: 1, to, term, ..Default::default() })).await.unwrap();
        }
        let mut terms = Vec::new();
        for _ in 0..2 {
            match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
                Input::Message(m) => terms.push(m.term),
                other => panic!("unexpected input {other:?}"),
            }
        }
        assert_eq!(terms, [1, 3]);
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "the message for node 8 was delivered");

        // A frame that starts and never ends is dropped after `frame`.
        let mut b = TcpStream::connect(addr).await.unwrap();
        b.write_all(&[0, 0, 1, 0]).await.unwrap();
        // Two connections are open: a third is closed at once.
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut c, Duration::from_millis(200)).await, "a third connection was served");
        assert!(closed_within(&mut b, Duration::from_secs(2)).await, "a stalled frame kept its connection");
        // A quiet connection is closed after `idle`, and frees its slot.
        assert!(closed_within(&mut a, Duration::from_secs(2)).await, "an idle connection stayed open");
        let mut d = TcpStream::connect(addr).await.unwrap();
        d.write_all(&frame(&key, &Message { from: 1, to: 7, term: 9, ..Default::default() })).await.unwrap();
        assert!(matches!(rx.recv_timeout(Duration::from_secs(5)), Ok(Input::Message(m)) if m.term == 9));
    }

    #[tokio::test]
    async fn frames_from_a_node_without_the_secret_are_refused() {
        let key = ClusterSecret::new("right").key("raft");
        let m = Message { from: 1, to: 2, term: 5, ..Default::default() };
        let good = frame(&key, &m);
        assert_eq!(read_frame(&mut &good[..], &key).await.unwrap().unwrap().term, 5);
        let bad = frame(&ClusterSecret::new("wrong").key("raft"), &m);
        assert!(matches!(read_frame(&mut &bad[..], &key).await, Err(FrameError::BadTag)));
        let huge = [0xffu8, 0xff, 0xff, 0xff];
        assert!(matches!(read_frame(&mut &huge[..], &key).await, Err(FrameError::TooLarge(_))));
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 1);
        assert!(matches!(read_frame(&mut &truncated[..], &key).await, Err(FrameError::Io(_))));
        // A valid tag over bytes that are not a message.
        let junk = b"\x0a\xff\xff\xff\xff\xff";
        let mut f = (junk.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&key.tag(junk));
        f.extend_from_slice(junk);
        assert!(matches!(read_frame(&mut &f[..], &key).await, Err(FrameError::Decode(_))));
        assert!(read_frame(&mut &[][..], &key).await.unwrap().is_none());
    }
}
