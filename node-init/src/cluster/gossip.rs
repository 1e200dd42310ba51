//! Membership by gossip (chitchat over UDP): what each node publishes about itself, how it reads
//! the others, and a transport that authenticates every packet.
//!
//! A packet is `[header][chitchat envelope]`, the header being a version byte, the sender's Raft
//! id, its process generation and a counter, and an HMAC-SHA256 under the cluster secret's
//! gossip key over all of it. Packets without a valid tag are dropped before chitchat sees them;
//! a valid packet whose (sender, generation, counter) was seen already, or that belongs to an
//! older generation of its sender, is a replay and dropped too (a 64-packet window per sender,
//! as IPsec keeps). Envelopes are encoded and decoded in process (Shoal's chitchat copy makes the
//! codec public and leaves room for the header in every datagram), so no local socket can feed
//! gossip in unauthenticated.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{ChitchatEnvelope, ChitchatId, NodeState};
use serde::Serialize;

pub use crate::state::objects::Resources;
use tokio::net::UdpSocket;
use tracing::warn;

use super::secret::{PurposeKey, TAG_LEN};

pub const KEY_RAFT_ID: &str = "raft_id";
pub const KEY_API: &str = "api_addr";
pub const KEY_RAFT: &str = "raft_addr";
pub const KEY_LABELS: &str = "labels";
pub const KEY_CAPACITY: &str = "capacity";
pub const KEY_FREE: &str = "free";
pub const KEY_VERSION: &str = "version";
pub const KEY_STATUS: &str = "status";
pub const KEY_CLUSTER: &str = "cluster";
pub const KEY_CANDIDATE: &str = "candidate";
/// Set (to "1") by a node that is shutting down: the leader moves its instances at once and
/// places nothing new there; it does not lead.
pub const KEY_STOPPING: &str = "stopping";
/// The newest log entry format the node's binary knows (absent: the first release, format 1).
pub const KEY_FORMAT: &str = "format";

/// One node as gossip describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerInfo {
    pub id: u64,
    pub gossip_addr: String,
    pub api_addr: String,
    pub raft_addr: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub free: Resources,
    pub version: String,
    /// The newest log entry format its binary knows.
    pub format: u32,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(skip)]
    pub candidate: Option<u64>,
    /// It is shutting down (its microVMs are being moved elsewhere).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
}

impl PeerInfo {
    pub fn from_state(cid: &ChitchatId, st: &NodeState) -> Option<PeerInfo> {
        let id = u64::from_str_radix(st.get(KEY_RAFT_ID)?, 16).ok()?;
        fn json<T: serde::de::DeserializeOwned + Default>(st: &NodeState, k: &str) -> T {
            st.get(k).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default()
        }
        Some(PeerInfo {
            id,
            gossip_addr: cid.gossip_advertise_addr.to_string(),
            api_addr: st.get(KEY_API).unwrap_or_default().to_string(),
            raft_addr: st.get(KEY_RAFT).unwrap_or_default().to_string(),
            labels: json(st, KEY_LABELS),
            capacity: json(st, KEY_CAPACITY),
            free: json(st, KEY_FREE),
            version: st.get(KEY_VERSION).unwrap_or_default().to_string(),
            format: st.get(KEY_FORMAT).and_then(|f| f.parse().ok()).unwrap_or(1),
            status: st.get(KEY_STATUS).unwrap_or_default().to_string(),
            cluster: st.get(KEY_CLUSTER).filter(|c| !c.is_empty()).map(str::to_string),
            candidate: st.get(KEY_CANDIDATE).and_then(|c| u64::from_str_radix(c, 16).ok()),
            stopping: st.get(KEY_STOPPING) == Some("1"),
        })
    }
}

/// Gossip timing: how often a node gossips and how suspicious the failure detector is.
#[derive(Debug, Clone, Copy)]
pub struct GossipTiming {
    pub interval: Duration,
    pub phi_threshold: f64,
}

impl Default for GossipTiming {
    fn default() -> Self {
        GossipTiming { interval: Duration::from_millis(100), phi_threshold: 5.0 }
    }
}

pub fn failure_detector(timing: &GossipTiming) -> chitchat::FailureDetectorConfig {
    chitchat::FailureDetectorConfig {
        phi_threshold: timing.phi_threshold,
        sampling_window_size: 1000,
        max_interval: Duration::from_secs(5),
        initial_interval: timing.interval * 4,
        dead_node_grace_period: Duration::from_secs(24 * 3600),
    }
}

/// Header bytes before the envelope: version, sender, generation, counter, tag.
pub const HEADER_LEN: usize = 1 + 8 + 8 + 8 + TAG_LEN;
const VERSION: u8 = 1;
/// How far below the highest counter seen a late (reordered) packet is still taken.
const WINDOW: u64 = 64;

// Our header must fit in the room chitchat leaves for the transport.
const _: () = assert!(HEADER_LEN <= chitchat::RESERVED_FOR_TRANSPORT);

/// The largest datagram a socket sends (IPv4 UDP's limit).
const MAX_DATAGRAM: usize = 65_507;

/// After this long without a packet, a generation's window may be forgotten.
const STALE_SECS: u64 = 60;
/// Generations (processes) kept per sender id: a restart, and a copy of a node's data directory
/// running beside it (which the agent detects and stops), must both stay visible meanwhile.
const GENERATIONS: usize = 4;

/// Replay protection for one process of a sender: the highest counter seen, which of the
/// `WINDOW` counters below it were seen, and when it was last heard (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    generation: u64,
    highest: u64,
    seen: u64,
    heard: u64,
}

impl Window {
    fn accept(&mut self, counter: u64, now: u64) -> bool {
        if counter > self.highest {
            let shift = counter - self.highest;
            self.seen = if shift >= WINDOW { 1 } else { (self.seen << shift) | 1 };
            self.highest = counter;
        } else {
            let back = self.highest - counter;
            if back >= WINDOW || self.seen & (1 << back) != 0 {
                return false;
            }
            self.seen |= 1 << back;
        }
        self.heard = now;
        true
    }
}

/// Replay protection for one sender id: a window per recent generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    windows: Vec<Window>,
}

impl ReplayWindow {
    /// Whether (generation, counter) is new at time `now` (seconds); records it if so. A
    /// generation older than every one kept (with all slots taken by live ones) is refused.
    pub fn accept(&mut self, generation: u64, counter: u64, now: u64) -> bool {
        if let Some(w) = self.windows.iter_mut().find(|w| w.generation == generation) {
            return w.accept(counter, now);
        }
        self.windows.retain(|w| now.saturating_sub(w.heard) < STALE_SECS);
        if self.windows.len() >= GENERATIONS {
            let Some(oldest) = self.windows.iter().map(|w| w.generation).min() else { return false };
            if generation < oldest {
                return false;
            }
            self.windows.retain(|w| w.generation != oldest);
        }
        self.windows.push(Window { generation, highest: counter, seen: 1, heard: now });
        true
    }
}

/// chitchat's UDP transport with every packet authenticated and replays dropped.
#[derive(Debug)]
pub struct SignedUdpTransport {
    key: PurposeKey,
    sender: u64,
}

impl SignedUdpTransport {
    /// `sender` is this node's Raft id.
    pub fn new(key: PurposeKey, sender: u64) -> Self {
        SignedUdpTransport { key, sender }
    }
}

#[async_trait::async_trait]
impl Transport for SignedUdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("failed to bind {listen_addr}/UDP for gossip"))?;
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let me = socket.local_addr()?;
        Ok(Box::new(SignedSocket {
            me,
            socket,
            key: self.key.clone(),
            sender: self.sender,
            generation,
            counter: 0,
            windows: HashMap::new(),
            buf: vec![0u8; MAX_DATAGRAM + 1],
            dropped: Dropped::default(),
            started: std::time::Instant::now(),
        }))
    }
}

/// Counts of dropped packets, reported at powers of two rather than on every packet.
#[derive(Debug, Default)]
struct Dropped {
    unauthenticated: u64,
    replayed: u64,
    undecodable: u64,
    too_large: u64,
}

fn note(count: &mut u64) -> bool {
    *count += 1;
    count.is_power_of_two()
}

struct SignedSocket {
    socket: UdpSocket,
    key: PurposeKey,
    sender: u64,
    generation: u64,
    counter: u64,
    windows: HashMap<u64, ReplayWindow>,
    buf: Vec<u8>,
    dropped: Dropped,
    started: std::time::Instant,
    /// The address peers send to (what they seal packets for).
    me: SocketAddr,
}

/// What the tag covers: the header, the recipient's address (a packet is good only where it
/// was sent: one captured on its way to another node does not replay here), the body.
fn mac_input(head: &[u8], to: SocketAddr, body: &[u8]) -> Vec<u8> {
    let to = to.to_string();
    let mut m = Vec::with_capacity(head.len() + 1 + to.len() + body.len());
    m.extend_from_slice(head);
    m.push(to.len() as u8);
    m.extend_from_slice(to.as_bytes());
    m.extend_from_slice(body);
    m
}

/// Seals an encoded envelope for `to`: header, tag, body.
pub fn seal(key: &PurposeKey, to: SocketAddr, sender: u64, generation: u64, counter: u64, body: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(HEADER_LEN + body.len());
    packet.push(VERSION);
    packet.extend_from_slice(&sender.to_be_bytes());
    packet.extend_from_slice(&generation.to_be_bytes());
    packet.extend_from_slice(&counter.to_be_bytes());
    let tag = key.tag(&mac_input(&packet, to, body));
    packet.extend_from_slice(&tag);
    packet.extend_from_slice(body);
    packet
}

/// The authenticated header and body of a packet received at `me`: `(sender, generation,
/// counter, body)`.
pub fn open<'a>(key: &PurposeKey, me: SocketAddr, packet: &'a [u8]) -> Option<(u64, u64, u64, &'a [u8])> {
    if packet.len() < HEADER_LEN || packet[0] != VERSION {
        return None;
    }
    let (head, rest) = packet.split_at(HEADER_LEN - TAG_LEN);
    let (tag, body) = rest.split_at(TAG_LEN);
    if !key.verify(&mac_input(head, me, body), tag) {
        return None;
    }
    let word = |i: usize| u64::from_be_bytes(head[i..i + 8].try_into().unwrap_or_default());
    Some((word(1), word(9), word(17), body))
}

#[async_trait::async_trait]
impl Socket for SignedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        self.counter += 1;
        let body = envelope.serialize_to_vec();
        let packet = seal(&self.key, to, self.sender, self.generation, self.counter, &body);
        if packet.len() > MAX_DATAGRAM {
            if note(&mut self.dropped.too_large) {
                warn!(%to, bytes = packet.len(), count = self.dropped.too_large, "gossip packet over the UDP limit not sent");
            }
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        match self.socket.send_to(&packet, to).await {
            Ok(n) => Ok(SendOutcome { num_bytes_sent: n }),
            // A packet the kernel refuses as too large is a bug of ours, not an unreachable peer.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                if note(&mut self.dropped.too_large) {
                    warn!(%to, bytes = packet.len(), count = self.dropped.too_large, "gossip packet refused as too large (EMSGSIZE)");
                }
                Ok(SendOutcome { num_bytes_sent: 0 })
            }
            // An unreachable peer is what gossip exists to detect, not a broken transport.
            Err(_) => Ok(SendOutcome { num_bytes_sent: 0 }),
        }
    }

    /// Cancellable: nothing is held across the await but the socket's own receive.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (n, from) = match self.socket.recv_from(&mut self.buf).await {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e).context("gossip socket failed"),
            };
            let Some((sender, generation, counter, mut body)) = open(&self.key, self.me, &self.buf[..n]) else {
                if note(&mut self.dropped.unauthenticated) {
                    warn!(%from, refused = self.dropped.unauthenticated, "gossip packet without a valid cluster-secret tag dropped");
                }
                continue;
            };
            let now = self.started.elapsed().as_secs() + STALE_SECS;
            if !self.windows.entry(sender).or_default().accept(generation, counter, now) {
                if note(&mut self.dropped.replayed) {
                    warn!(%from, sender = %format!("{sender:016x}"), replayed = self.dropped.replayed, "replayed gossip packet dropped");
                }
                continue;
            }
            // The tag holds, so the bytes come from a node of this cluster; a decode failure
            // means a chitchat version mismatch.
            match ChitchatEnvelope::deserialize(&mut body) {
                Ok(envelope) => return Ok(RecvOutcome { from_addr: from, envelope, num_bytes_received: n }),
                Err(e) => {
                    if note(&mut self.dropped.undecodable) {
                        warn!(%from, error = %e, "gossip packet undecodable");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::secret::ClusterSecret;
    use chitchat::{spawn_chitchat, ChitchatConfig, ProtocolVersion};

    async fn node(port_secret: &str, seeds: Vec<String>) -> chitchat::ChitchatHandle {
        let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
        let sock = std::net::UdpSocket::bind(addr).unwrap();
        let addr = sock.local_addr().unwrap();
        drop(sock);
        let id = ChitchatId::new(format!("n{}", addr.port()), 1, addr);
        let cfg = ChitchatConfig {
            chitchat_id: id,
            cluster_id: "shoal".into(),
            gossip_interval: Duration::from_millis(50),
            listen_addr: addr,
            seed_nodes: seeds,
            failure_detector_config: failure_detector(&GossipTiming::default()),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V0,
        };
        let transport = SignedUdpTransport::new(ClusterSecret::new(port_secret).key("gossip"), addr.port().into());
        spawn_chitchat(cfg, vec![("k".into(), port_secret.into())], &transport).await.unwrap()
    }

    async fn live_count(h: &chitchat::ChitchatHandle) -> usize {
        h.with_chitchat(|c| c.live_nodes().count()).await
    }

    #[tokio::test]
    async fn nodes_with_the_secret_see_each_other_and_a_stranger_is_not_seen() {
        let a = node("s", vec![]).await;
        let seed = a.chitchat_id().gossip_advertise_addr.to_string();
        let b = node("s", vec![seed.clone()]).await;
        let stranger = node("not-s", vec![seed]).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while live_count(&a).await < 2 || live_count(&b).await < 2 {
            assert!(tokio::time::Instant::now() < deadline, "a and b never saw each other");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(live_count(&a).await, 2, "the stranger must not join a's view");
        assert_eq!(live_count(&stranger).await, 1, "the stranger sees only itself");
        let seen_value = b
            .with_chitchat(|c| {
                c.node_states()
                    .iter()
                    .find(|(id, _)| id.node_id == a.chitchat_id().node_id)
                    .and_then(|(_, st)| st.get("k").map(str::to_string))
            })
            .await;
        assert_eq!(seen_value.as_deref(), Some("s"));
    }

    #[test]
    fn the_replay_window_takes_each_packet_once_and_no_older_generation() {
        let mut w = ReplayWindow::default();
        let t = 0;
        assert!(w.accept(5, 1, t));
        assert!(!w.accept(5, 1, t), "the same packet twice");
        assert!(w.accept(5, 3, t));
        assert!(w.accept(5, 2, t), "a reordered packet within the window");
        assert!(!w.accept(5, 2, t));
        assert!(w.accept(5, 100, t));
        assert!(!w.accept(5, 100 - WINDOW, t), "older than the window");
        assert!(w.accept(5, 100 - WINDOW + 1, t));
        // A restarted sender (and a copy beside it) is heard; each generation keeps its window.
        assert!(w.accept(6, 1, t + 1));
        assert!(w.accept(5, 101, t + 1));
        assert!(!w.accept(6, 1, t + 1) && !w.accept(5, 101, t + 1));
        // With every slot live, a generation older than all of them is refused.
        assert!(w.accept(7, 1, t + 2) && w.accept(8, 1, t + 2));
        assert!(!w.accept(4, 1_000, t + 2), "an older process of the same sender");
        assert!(w.accept(9, 1, t + 3), "a newer one replaces the oldest");
        assert!(!w.accept(5, 500, t + 3), "the replaced generation is gone for good");
        // Generations silent for a minute are forgotten: a clock that went back is heard again.
        assert!(w.accept(2, 1, t + 3 + STALE_SECS));
    }

    #[test]
    fn packets_open_only_under_the_same_key_and_unaltered() {
        let key = ClusterSecret::new("s").key("gossip");
        let me: SocketAddr = ([10, 0, 0, 1], 7400).into();
        let p = seal(&key, me, 7, 8, 9, b"body");
        assert_eq!(open(&key, me, &p), Some((7, 8, 9, &b"body"[..])));
        assert!(open(&ClusterSecret::new("t").key("gossip"), me, &p).is_none());
        assert!(open(&key, ([10, 0, 0, 2], 7400).into(), &p).is_none(), "a packet sealed for another node");
        for i in [0, 1, 12, 20, HEADER_LEN - 1, HEADER_LEN] {
            let mut q = p.clone();
            q[i] ^= 1;
            assert!(open(&key, me, &q).is_none(), "byte {i} altered");
        }
        assert!(open(&key, me, &p[..HEADER_LEN - 1]).is_none());
    }

    /// A packet captured off the wire and sent again is dropped; the original got through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replayed_packet_is_dropped() {
        let tap = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tap.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let a = node("s", vec![tap.local_addr().unwrap().to_string()]).await;
        let mut buf = vec![0u8; 70_000];
        let (n, _) = tap.recv_from(&mut buf).unwrap();
        let captured = buf[..n].to_vec();
        drop(a);
        // The node the packet was sent to takes it once, however often it comes.
        let to = tap.local_addr().unwrap();
        drop(tap);
        let transport = SignedUdpTransport::new(ClusterSecret::new("s").key("gossip"), 99);
        let mut b = transport.open(to).await.unwrap();
        let mut elsewhere = transport.open(([127, 0, 0, 1], 0).into()).await.unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(&captured, to).unwrap();
        sender.send_to(&captured, to).unwrap();
        sender.send_to(&captured, elsewhere.local_addr().unwrap()).unwrap();
        let other = tokio::time::timeout(Duration::from_millis(500), elsewhere.recv()).await;
        assert!(other.is_err(), "a packet sealed for another node was taken");
        let first = tokio::time::timeout(Duration::from_secs(5), b.recv()).await;
        assert!(matches!(first, Ok(Ok(_))), "the original packet was not taken");
        let again = tokio::time::timeout(Duration::from_millis(500), b.recv()).await;
        assert!(again.is_err(), "the replayed packet was taken");
    }
}
